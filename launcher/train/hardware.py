"""What this process may use on this machine: CPU cores (for loader workers) and how many processes share it.

Every choice made from these is printed in the run's start block, with the reason.
"""

from __future__ import annotations

import os

MAX_WORKERS = 32


def local_processes() -> int:
    """Training processes on this machine (set by torchrun / accelerate launch), 1 when run directly."""
    for name in ("LOCAL_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def usable_cores() -> tuple[int, str]:
    """Cores this process may run on: its CPU affinity, capped by SLURM's --cpus-per-task when smaller."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    source = "CPU affinity"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cores:
        cores, source = int(slurm), "SLURM_CPUS_PER_TASK"
    return cores, source


def default_workers(device_type: str) -> tuple[int, str]:
    """Loader workers per process: the cores this process may use (shared by the processes on this machine),
    minus one on a GPU node, where the main process needs a core of its own to keep the GPU fed."""
    cores, source = usable_cores()
    local = local_processes()
    # An affinity that leaves room for the other local processes means each was bound to its own cores.
    bound_per_process = source == "CPU affinity" and cores * local <= (os.cpu_count() or cores) and cores < (os.cpu_count() or cores)
    if bound_per_process:
        local = 1
    per_process = max(1, cores // local)
    workers = max(1, per_process - 1) if device_type == "cuda" else per_process
    workers = min(workers, MAX_WORKERS)
    why = f"{cores} cores ({source})" + (f" / {local} processes on this machine" if local > 1 else "")
    if device_type == "cuda":
        why += ", one left for the main process"
    return workers, why
