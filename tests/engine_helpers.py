"""Helpers of the engine tests: free ports, subprocess environments, recipe command lines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def recipe_command(recipe: str, *args: str, processes: int = 1) -> list[str]:
    script = str(REPO / "recipes" / f"{recipe}.py")
    if processes == 1:
        return [sys.executable, script, *args]
    # --standalone: torchrun binds its own free port (a port picked here and released could be taken first)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            script, *args]


def run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
