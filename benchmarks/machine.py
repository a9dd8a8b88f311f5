"""The machine description every benchmark result JSON carries (so numbers can be compared fairly)."""

from __future__ import annotations

import contextlib
import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def _proc_field(path: str, key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def describe_machine() -> dict[str, object]:
    """CPU, cores, memory, GPU, library versions, date and the 1-minute load average at the call."""
    import PIL
    import timm
    import torch
    import torchvision
    import webdataset

    memory_kb = _proc_field("/proc/meminfo", "MemTotal")
    usable = len(os.sched_getaffinity(0))
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": usable,
        "cores_online": os.cpu_count(),
        "cores_usable": usable,
        "memory_gb": round(int(memory_kb.split()[0]) / 1024**2, 1) if memory_kb else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "webdataset": getattr(webdataset, "__version__", "unknown"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }
