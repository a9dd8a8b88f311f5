"""Fine-tuning a pretrained ResNet on a small class-folder dataset: the model cards' parameters and
advice (modelcards.py) and the `launcher finetune` command (command.py)."""
