"""Using a trained model: evaluate / predict (evaluate.py) and export (export.py)."""
