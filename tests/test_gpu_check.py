"""benchmarks/gpu_check.py --smoke: every code path of the GPU check (shards, synthetic step, the product's
loop with and without --compile, the JSON) on a CPU, so the GPU run cannot fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_path_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--json", str(out),
                             "--workdir", str(tmp_path / "work")], cwd=tmp_path, env=subprocess_env(threads=2),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["machine"]["cores"] >= 1 and not report["skipped"]
    (case,) = report["cases"]
    for key in ("eager", "compile"):
        assert case[f"synthetic_{key}"]["img_per_s"] > 0
        assert case[f"end_to_end_{key}"]["img_per_s"] > 0 and case[f"end_to_end_{key}"]["steps"] == 3
        assert 0 <= case[f"end_to_end_{key}"]["data_wait_fraction"] <= 1
        assert case[f"ratio_{key}"] > 0
