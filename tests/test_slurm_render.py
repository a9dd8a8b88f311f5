"""The sbatch templates and `launcher slurm` without a cluster: rendering, shell syntax, shellcheck, and
the launch arithmetic of slurm/common.sh (run under bash with Slurm's variables set by hand)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.slurm import SlurmJob, SlurmRenderError, main, render

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = sorted((REPO / "slurm").glob("*.sh"))
JOB_TEMPLATES = [p for p in TEMPLATES if p.name != "common.sh"]


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S*))?$", script, re.M))


def test_every_template_is_there_and_parses() -> None:
    assert {p.name for p in JOB_TEMPLATES} == {"resnet101.sh", "resnet50.sh", "resnet18.sh", "finetune.sh"}
    for path in TEMPLATES:
        subprocess.run(["bash", "-n", str(path)], check=True)
    for path in JOB_TEMPLATES:
        options = sbatch_options(path.read_text())
        assert options["ntasks-per-node"] == "1", path.name
        assert options["signal"] == "B:USR1@120", path.name
        assert "requeue" in options and options["open-mode"] == "append", path.name
        assert options["output"] == "%x-%j.out", path.name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (.ci/slurm/cluster.sh installs it)")
def test_templates_pass_shellcheck(tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.sh"
    rendered.write_text(render(SlurmJob(nodes=2, recipe="a3", model="resnet50", data="shards/x"))[0])
    files = [str(p.relative_to(REPO)) for p in TEMPLATES] + [str(rendered)]
    result = subprocess.run(["shellcheck", "-x", *files], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_renders_the_requested_headers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu", "--time", "2-00:00:00",
            "--recipe", "a3", "--model", "resnet101", "--data", str(tmp_path), "--account", "proj1",
            "--dry-run", "--", "--epochs", "50", "--report-to", "wandb"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    options = sbatch_options(script)
    assert options["nodes"] == "4" and options["gpus-per-node"] == "4"
    assert options["partition"] == "gpu" and options["time"] == "2-00:00:00" and options["account"] == "proj1"
    assert options["job-name"] == "resnet101-a3"
    assert options["ntasks-per-node"] == "1" and options["signal"] == "B:USR1@120"
    assert f"DATA=${{DATA:-{tmp_path}}}" in script
    assert "RECIPE=${RECIPE:-a3}" in script and "MODEL=${MODEL:-resnet101}" in script
    assert "EXTRA_ARGS=${EXTRA_ARGS:-'--epochs 50 --report-to wandb'}" in script
    assert "slurm_main" in script.splitlines()[-1]
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_cpu_partition_drops_the_gpu_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gpus-per-node", "0", "--nodes", "2", "--model", "resnet18", "--data", "d", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "gpus-per-node" not in sbatch_options(script)
    assert "DEVICE=${DEVICE:-cpu}" in script


def test_write_and_refuse_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job.sbatch"
    assert main(["--recipe", "finetune", "--model", "resnet18", "--data", "d", "--out", str(out)]) == 0
    text = out.read_text()
    assert sbatch_options(text)["job-name"] == "resnet18-finetune" and "RECIPE=${RECIPE:-finetune}" in text
    out.write_text("mine")
    assert main(["--data", "d", "--out", str(out)]) == 2
    assert out.read_text() == "mine"
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (SlurmJob(nodes=0), "--nodes"),
        (SlurmJob(time="two days"), "--time"),
        (SlurmJob(partition="gpu a100"), "--partition"),
        (SlurmJob(recipe="a9"), "--recipe"),
        (SlurmJob(extra_args=["--name", "my run"]), "split on spaces"),
        (SlurmJob(accelerate_config="no/such.yaml"), "--accelerate-config"),
    ],
)
def test_bad_settings_are_named(job: SlurmJob, message: str) -> None:
    with pytest.raises(SlurmRenderError, match=re.escape(message)):
        render(job)


def run_resolve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run slurm_resolve from common.sh with fake Slurm variables (no GPU unless they say so)."""
    script = """
source "$LAUNCHER_HOME/slurm/common.sh"
scontrol() { echo n7; echo n8; }   # `scontrol show hostnames` on a fake allocation
slurm_resolve || exit $?
printf '%s\\0' "$NUM_PROCESSES" "$PROCS_PER_NODE" "$DEVICE" "$MASTER_ADDR" "$MASTER_PORT" "$OUTPUT" \
    "${ACCELERATE_USE_CPU:-}" "${#LAUNCH_ARGS[@]}" "${LAUNCH_ARGS[@]}" "${TRAIN_ARGS[@]}"
"""
    base = {"PATH": "/usr/bin:/bin", "LAUNCHER_HOME": str(REPO), "RECIPE": "a2", "DATA": str(tmp_path),
            "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "rn", "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "1",
            "SLURM_JOB_NODELIST": "n[7-8]", "PYTHON": "/usr/bin/python3", "RUNS_DIR": str(tmp_path / "runs"),
            "SLURM_GPUS_ON_NODE": "0"}  # what a CPU node says, whatever this machine has
    return subprocess.run(["bash", "-c", script], env={**base, **env}, cwd=tmp_path, capture_output=True, text=True)


def resolve(tmp_path: Path, **env: str) -> dict[str, object]:
    """Run slurm_resolve from common.sh with fake Slurm variables; return what it decided."""
    result = run_resolve(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    fields = result.stdout.split("\0")[:-1]
    n_launch = int(fields[7])
    return {
        "num_processes": int(fields[0]), "procs_per_node": int(fields[1]), "device": fields[2],
        "master": (fields[3], fields[4]), "output": fields[5], "use_cpu": fields[6],
        "launch": fields[8 : 8 + n_launch], "train": fields[8 + n_launch :], "log": result.stderr,
    }


def test_launch_arithmetic_on_gpu_nodes(tmp_path: Path) -> None:
    got = resolve(tmp_path, SLURM_GPUS_ON_NODE="4", EXTRA_ARGS="--epochs 3 --lr 1e-3")
    assert got["num_processes"] == 8 and got["procs_per_node"] == 4 and got["device"] == "cuda"
    assert got["master"] == ("n7", str(10000 + 123456 % 20000))
    assert got["output"] == str(tmp_path / "runs" / "rn-123456")
    launch = got["launch"]
    assert launch[launch.index("--num_machines") + 1] == "2" and launch[launch.index("--num_processes") + 1] == "8"
    assert "--multi_gpu" in launch
    # The machine rank is decided on each node (slurm_node), never in the batch shell.
    assert "--machine_rank" not in launch
    assert got["train"][-4:] == ["--epochs", "3", "--lr", "1e-3"]
    assert "--resume=auto" in got["train"] and got["use_cpu"] == ""


def test_cpu_nodes_use_one_process_and_force_accelerate_cpu(tmp_path: Path) -> None:
    got = resolve(tmp_path, SLURM_GPUS_ON_NODE="8", DEVICE="cpu", MASTER_ADDR="10.0.0.5", MASTER_PORT="2345")
    assert got["num_processes"] == 2 and got["device"] == "cpu" and got["use_cpu"] == "true"
    assert got["master"] == ("10.0.0.5", "2345")
    assert "--device=cpu" in got["train"]
    single = resolve(tmp_path, DEVICE="cpu", SLURM_NNODES="1", DATA="shards/x", OUTPUT="runs/mine")
    assert single["num_processes"] == 1 and "--multi_gpu" not in single["launch"]
    # Relative paths are taken from the submit directory: the training itself runs in the repository root.
    train = single["train"]
    assert f"--data={tmp_path / 'shards' / 'x'}" in train
    assert single["output"] == str(tmp_path / "runs" / "mine")


@pytest.mark.parametrize("variable", ["GPUS_PER_NODE", "PROCS_PER_NODE"])
def test_zero_processes_per_node_on_cpu_means_one(tmp_path: Path, variable: str) -> None:
    """`GPUS_PER_NODE=0 DEVICE=cpu sbatch ...` on a CPU partition: one gloo rank per node, said in the log."""
    got = resolve(tmp_path, DEVICE="cpu", **{variable: "0"})
    assert got["procs_per_node"] == 1 and got["num_processes"] == 2 and got["use_cpu"] == "true"
    assert f"{variable}=0 with DEVICE=cpu: 1 process per node" in str(got["log"])
    # a CPU node without DEVICE set decides cpu by itself (no GPU visible)
    auto = resolve(tmp_path, GPUS_PER_NODE="0")
    assert auto["device"] == "cpu" and auto["procs_per_node"] == 1
    # PROCS_PER_NODE wins over its alias; an explicit count on CPU is kept
    both = resolve(tmp_path, DEVICE="cpu", PROCS_PER_NODE="3", GPUS_PER_NODE="0")
    assert both["procs_per_node"] == 3 and both["num_processes"] == 6


@pytest.mark.parametrize(("env", "message"), [
    ({"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "0"},
     "GPUS_PER_NODE=0 with DEVICE=cuda leaves no training process on this node (4 GPU(s) visible)"),
    ({"DEVICE": "cuda", "PROCS_PER_NODE": "0", "SLURM_GPUS_ON_NODE": "2"}, "PROCS_PER_NODE=0 with DEVICE=cuda"),
    ({"DEVICE": "cpu", "GPUS_PER_NODE": "two"}, "GPUS_PER_NODE=two is not a number of processes per node"),
    ({"DEVICE": "cuda"}, "DEVICE=cuda but no GPU is visible on this node"),
])
def test_bad_process_counts_are_named(tmp_path: Path, env: dict[str, str], message: str) -> None:
    result = run_resolve(tmp_path, **env)
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "not set" not in errors[0]  # the old message claimed both variables were unset


def test_deepspeed_config_goes_through_accelerate_without_ssh(tmp_path: Path) -> None:
    got = resolve(tmp_path, SLURM_GPUS_ON_NODE="8", ACCELERATE_CONFIG="recipes/accelerate/deepspeed_zero2.yaml")
    launch = got["launch"]
    assert launch[:2] == ["--config_file", str(REPO / "recipes" / "accelerate" / "deepspeed_zero2.yaml")]
    assert launch[launch.index("--deepspeed_multinode_launcher") + 1] == "standard"


def test_missing_data_fails_before_any_srun(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "-c", 'source "$LAUNCHER_HOME/slurm/common.sh"; slurm_resolve'],
        env={"PATH": "/usr/bin:/bin", "LAUNCHER_HOME": str(REPO), "RECIPE": "a2"}, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "DATA is not set" in result.stderr
    assert result.stdout == ""
