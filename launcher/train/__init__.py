"""Training: the loop (loop.py), building a run's parts (build.py), the run's state and checkpoints
(state.py), global-batch arithmetic (batching.py), device/precision (precision.py), preemption
(preemption.py), metrics and trackers (tracking.py), and the `launcher train` command (command.py).

Imported lazily by the command line: ``from launcher.train.loop import train``.
"""
