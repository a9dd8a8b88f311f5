"""The sbatch templates on a live Slurm cluster (.ci/slurm/cluster.sh start: two slurmd on this host).

Jobs of the real template slurm/resnet18.sh, configured only through the environment (plus
sbatch's --nodes), run side by side: tiny CPU trainings of the real engine on 60 sklearn digits.
  reference: 2 nodes x 1 process, uninterrupted           -> summary.json, world size 2
  drill:     the same job, sent USR1 mid-training, then    -> checkpoint, requeue, resume, twice; the
             TERM mid-way through the requeued attempt        final weights equal the reference's, bit for bit
             (scancel --signal=... --batch)
  killrank:  the same job; one rank SIGKILLed in epoch 2    -> the whole job FAILED within 60 s (no rank left
                                                              waiting in a collective); requeued, it resumes
                                                              from the epoch-1 checkpoint and ends with the
                                                              reference's weights, bit for bit
  shrink:    the same job, held and sent USR1 mid-epoch;  -> resumes on 1 node x 2 accumulation steps: says the
             requeued with NumNodes=1, released               shape changed, trains every step once, per-step
                                                              losses equal the reference's within 1e-4
  broken:    a data path that does not exist, submitted    -> FAILED, never requeued
             with `launcher slurm --submit`
  deepspeed: ACCELERATE_CONFIG=recipes/accelerate/           -> 2 ranks on 2 nodes meet (no ssh/pdsh)
             deepspeed_zero2.yaml, a stand-in script
             instead of the recipe
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "resnet18.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 420
# 60 images, global batch 8 -> ceil(60 / 8) = 8 steps per epoch; 4 epochs = 32 steps, long enough to signal mid-run.
TRAIN_ARGS = (
    "--img-size 32 --epochs 4 --warmup-epochs 0 --global-batch 8 --micro-batch 4 --workers 0 --no-progress "
    "--val-split= --log-every 1 --precision fp32 --aug-repeats 0 --mixup 0 --cutmix 0 --auto-augment none "
    "--threads 1 --seed 3"
)
FINAL_STEP = 32
# Stands in for a recipe to test the launch path alone: the ranks meet, all-reduce, rank 0 writes the summary.
ALLREDUCE_SCRIPT = """import argparse, json, os
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=True)
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), reduction="sum").item()
print(f"rank {acc.process_index} of {acc.num_processes}: all-reduce sum {total}", flush=True)
if acc.is_main_process:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output")
    out = parser.parse_known_args()[0].output
    summary = {"world_size": acc.num_processes, "sum": total, "deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED")}
    open(os.path.join(out, "summary.json"), "w").write(json.dumps(summary))
"""


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "Slurm client tools not installed (run .ci/slurm/cluster.sh start as root)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer (scontrol ping timed out)"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        answer = (ping.stdout.strip() or ping.stderr.strip()).splitlines()
        return f"no slurmctld reachable (scontrol ping: {answer[0] if answer else ping.returncode}); start one with .ci/slurm/cluster.sh start"
    usable = [line for line in nodes.stdout.splitlines() if re.search(r" (idle|mix|alloc)$", line)]
    if len(usable) < 2:
        return f"fewer than 2 usable nodes: {nodes.stdout.strip()!r}"
    return None


_PROBLEM = cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@dataclass
class Job:
    name: str
    job_id: str
    log: Path
    run_dir: Path
    events: list[str] = field(default_factory=list)

    def wait(self, *, restarts: int = 0, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Poll scontrol until the job is in a terminal state after ``restarts`` requeues."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = job_info(self.job_id)
            if info.get("JobState") in TERMINAL and int(info.get("Restarts", 0)) >= restarts:
                return info
            time.sleep(1.0)
        subprocess.run(["scancel", self.job_id])
        pytest.fail(f"job {self.name} ({self.job_id}) not finished after {timeout:.0f} s: {info}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no job log)"
        return f"--- events: {self.events}\n--- job log {self.log}:\n{text[-6000:]}"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.pop("LAUNCHER_HOME", None)  # the scripts must find the repository by themselves
    return env


def submit(name: str, tmp: Path, **env: str) -> Job:
    """sbatch the real template, configured through the environment only (plus --nodes)."""
    unique = f"{name}-{uuid.uuid4().hex[:6]}"
    log = tmp / f"{unique}.out"
    job_env = clean_env()
    job_env.update(
        SBATCH_JOB_NAME=unique, SBATCH_OUTPUT=str(log), SBATCH_GPUS_PER_NODE="0", SBATCH_TIMELIMIT="15:00",
        RUNS_DIR=str(tmp / "runs"), DEVICE="cpu", MODEL="resnet18", PYTHON=sys.executable, EXTRA_ARGS=TRAIN_ARGS,
        **env,
    )
    result = subprocess.run(["sbatch", "--parsable", "--nodes=2", str(TEMPLATE)], cwd=tmp, env=job_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    job_id = result.stdout.strip().split(";")[0]
    return Job(unique, job_id, log, tmp / "runs" / f"{unique}-{job_id}")


def submit_rendered(name: str, tmp: Path, data: Path) -> Job:
    """`launcher slurm --submit`: a script rendered for a 2-node CPU partition, submitted as it is."""
    unique = f"{name}-{uuid.uuid4().hex[:6]}"
    log = tmp / f"{unique}.out"
    argv = [sys.executable, "-m", "launcher.cli", "slurm", "--nodes", "2", "--gpus-per-node", "0",
            "--time", "15:00", "--job-name", unique, "--log", str(log), "--model", "resnet18", "--data", str(data),
            "--runs-dir", str(tmp / "runs"), "--python", sys.executable, "--out", str(tmp / f"{unique}.sbatch"),
            "--submit", "--", *TRAIN_ARGS.split()]
    result = subprocess.run(argv, cwd=tmp, env=clean_env(), capture_output=True, text=True, timeout=120)
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert result.returncode == 0 and match, f"launcher slurm --submit failed: {result.stdout}{result.stderr}"
    return Job(unique, match.group(1), log, tmp / "runs" / f"{unique}-{match.group(1)}")


def trained_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:  # the last line may be half-written
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            steps.append(int(record.get("step", 0)))
    return max(steps)


def preempt_twice(job: Job, timeout: float = JOB_TIMEOUT_S) -> None:
    """Signal the batch shell mid-training twice: USR1 (what Slurm sends before the time limit, and at
    preemption with preempt_send_user_signal), then, in the requeued attempt, TERM (preemption)."""
    deadline = time.monotonic() + timeout
    plan = [("USR1", 0, 2), ("TERM", 1, 3)]  # (signal, attempt's restart count, steps into the attempt)
    start_step = 0
    while plan and time.monotonic() < deadline:
        info = job_info(job.job_id)
        if info.get("JobState") in TERMINAL:
            job.events.append(f"finished before SIG{plan[0][0]} could be sent")
            return
        signal, restarts, steps_in = plan[0]
        step = trained_steps(job.run_dir)
        if info.get("JobState") == "RUNNING" and int(info.get("Restarts", 0)) == restarts and step >= start_step + steps_in:
            subprocess.run(["scancel", f"--signal={signal}", "--batch", job.job_id], check=False)
            job.events.append(f"SIG{signal} sent at step {step}")
            start_step = step
            plan.pop(0)
        time.sleep(0.3)
    if plan:
        job.events.append(f"gave up waiting to send SIG{plan[0][0]}")


def running_past(job: Job, steps: int, deadline: float, what: str) -> bool:
    """Wait until the job runs and has trained ``steps`` steps; False (noted) if it ends first."""
    while time.monotonic() < deadline:
        info = job_info(job.job_id)
        if info.get("JobState") in TERMINAL:
            job.events.append(f"finished before {what}")
            return False
        if info.get("JobState") == "RUNNING" and trained_steps(job.run_dir) >= steps:
            return True
        time.sleep(0.3)
    job.events.append(f"gave up waiting for step {steps} before {what}")
    return False


def requeue_on_one_node(job: Job, timeout: float = JOB_TIMEOUT_S) -> None:
    """Preempt the 2-node job mid-epoch and bring it back on 1 node (as `sbatch --nodes=1-2` may): hold it
    (the hold applies once it is requeued), USR1 (checkpoint + requeue), then NumNodes=1 and release."""
    deadline = time.monotonic() + timeout
    if not running_past(job, 3, deadline, "it could be preempted"):
        return
    subprocess.run(["scontrol", "hold", job.job_id], check=False)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=False)
    job.events.append(f"held and SIGUSR1 sent at step {trained_steps(job.run_dir)}")
    while time.monotonic() < deadline:
        info = job_info(job.job_id)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1:
            break
        if info.get("JobState") in TERMINAL:
            job.events.append(f"ended {info.get('JobState')} instead of being requeued")
            subprocess.run(["scontrol", "release", job.job_id], check=False)
            return
        time.sleep(0.3)
    # one task per node (the template's --ntasks-per-node=1): the task count follows the node count
    update = subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "NumNodes=1", "NumTasks=1"],
                            capture_output=True, text=True)
    job.events.append(f"update NumNodes=1 NumTasks=1: rc {update.returncode} {update.stderr.strip()!r}")
    subprocess.run(["scontrol", "release", job.job_id], check=False)
    job.events.append("released")


def kill_one_rank(job: Job, timeout: float = JOB_TIMEOUT_S) -> None:
    """SIGKILL rank 1 of the job once epoch 2 is under way; record how long the job took to end after it."""
    import psutil

    deadline = time.monotonic() + timeout
    if not running_past(job, 10, deadline, "a rank could be killed"):  # epoch 1 (8 steps) is checkpointed
        return
    ranks = []
    for process in psutil.process_iter():
        try:
            environ = process.environ()
        except (psutil.Error, OSError):
            continue
        if environ.get("SLURM_JOB_ID") == job.job_id and environ.get("RANK") == "1":
            ranks.append(process)
    if len(ranks) != 1:
        job.events.append(f"found {len(ranks)} processes with RANK=1")
        return
    ranks[0].kill()
    killed = time.monotonic()
    job.events.append(f"rank 1 SIGKILLed at step {trained_steps(job.run_dir)}")
    while time.monotonic() < deadline and job_info(job.job_id).get("JobState") not in TERMINAL:
        time.sleep(0.2)
    job.events.append(f"job ended {time.monotonic() - killed:.1f} s after the kill")
    job.seconds_to_end = time.monotonic() - killed  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory):
    from launcher.data.sample_data import make_digits_tree

    tmp = tmp_path_factory.mktemp("slurm")
    data = tmp / "digits"
    make_digits_tree(data, size=32, per_class=6)
    (tmp / "allreduce.py").write_text(ALLREDUCE_SCRIPT)
    submitted = {
        # The repository's own DeepSpeed config, named as a user would (relative to the repository).
        "deepspeed": submit("ds", tmp, DATA=str(data), RECIPE=str(tmp / "allreduce.py"),
                            ACCELERATE_CONFIG="recipes/accelerate/deepspeed_zero2.yaml"),
        "reference": submit("ref", tmp, DATA=str(data)),
        "drill": submit("drill", tmp, DATA=str(data)),
        "killrank": submit("killrank", tmp, DATA=str(data)),
        "shrink": submit("shrink", tmp, DATA=str(data)),
        "broken": submit_rendered("broken", tmp, tmp / "no-such-dataset"),
    }
    signaller = threading.Thread(target=preempt_twice, args=(submitted["drill"],), daemon=True)
    signaller.start()
    submitted["signaller"] = signaller  # type: ignore[assignment]
    killer = threading.Thread(target=kill_one_rank, args=(submitted["killrank"],), daemon=True)
    killer.start()
    submitted["killer"] = killer  # type: ignore[assignment]
    shrinker = threading.Thread(target=requeue_on_one_node, args=(submitted["shrink"],), daemon=True)
    shrinker.start()
    submitted["shrinker"] = shrinker  # type: ignore[assignment]
    yield submitted
    for job in submitted.values():
        if isinstance(job, Job) and job_info(job.job_id).get("JobState") not in TERMINAL:
            subprocess.run(["scancel", job.job_id])


def test_two_node_training_through_the_template(jobs: dict[str, Job]) -> None:
    job = jobs["reference"]
    info = job.wait()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", job.diagnostics()
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2, summary
    assert summary["steps"] == FINAL_STEP and summary["stop_reason"] == "completed"
    log = job.log.read_text()
    assert "2 node(s) x 1 process(es) = 2 on cpu" in log
    assert not (job.run_dir / "PREEMPTED").exists()


def test_preemption_drill_requeues_and_resumes_exactly(jobs: dict[str, Job]) -> None:
    import torch

    job = jobs["drill"]
    jobs["signaller"].join(timeout=JOB_TIMEOUT_S)  # type: ignore[attr-defined]
    info = job.wait(restarts=2)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", job.diagnostics()
    preemptions = [json.loads(line) for line in (job.run_dir / "preemptions.jsonl").read_text().splitlines()]
    assert [p["signal"] for p in preemptions] == ["SIGUSR1", "SIGTERM"], job.diagnostics()
    stops = [p["step"] for p in preemptions]
    assert 0 < stops[0] < stops[1] < FINAL_STEP, job.diagnostics()
    log = job.log.read_text()
    assert log.count("requeueing job") == 2, job.diagnostics()
    # Resumed, not restarted: every optimizer step was trained (and logged) exactly once over the attempts.
    steps = [json.loads(line)["step"] for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    assert steps == list(range(1, FINAL_STEP + 1)), steps
    assert not (job.run_dir / "PREEMPTED").exists()

    reference = jobs["reference"]
    assert reference.wait()["JobState"] == "COMPLETED", reference.diagnostics()
    ours = torch.load(job.run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    theirs = torch.load(reference.run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ours["step"] == theirs["step"] == FINAL_STEP
    assert ours["model"].keys() == theirs["model"].keys()
    different = [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"
    assert json.loads((job.run_dir / "summary.json").read_text())["world_size"] == 2


def test_a_killed_rank_fails_the_job_fast_and_the_requeue_resumes_exactly(jobs: dict[str, Job]) -> None:
    import torch

    job = jobs["killrank"]
    jobs["killer"].join(timeout=JOB_TIMEOUT_S)  # type: ignore[attr-defined]
    info = job.wait()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", job.diagnostics()
    assert getattr(job, "seconds_to_end", 999) < 60, job.diagnostics()
    assert "not requeueing" in job.log.read_text(), job.diagnostics()
    # What an operator (or a job array's retry) does next: requeue; the job resumes from its last checkpoint.
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True, text=True)
    info = job.wait(restarts=1)
    assert info["JobState"] == "COMPLETED", job.diagnostics()
    assert "resumed from" in job.log.read_text(), job.diagnostics()
    reference = jobs["reference"]
    assert reference.wait()["JobState"] == "COMPLETED", reference.diagnostics()
    ours = torch.load(job.run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    theirs = torch.load(reference.run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ours["step"] == theirs["step"] == FINAL_STEP
    different = [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not different, f"{len(different)} tensors differ after the requeue, e.g. {different[:5]}"


def test_a_requeue_on_fewer_nodes_resumes_the_same_run(jobs: dict[str, Job]) -> None:
    job = jobs["shrink"]
    jobs["shrinker"].join(timeout=JOB_TIMEOUT_S)  # type: ignore[attr-defined]
    info = job.wait(restarts=1)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job.diagnostics()
    log = job.log.read_text()
    assert "1 node(s) x 1 process(es) = 1 on cpu" in log, job.diagnostics()
    assert "shape changed from 2 process(es) x micro-batch 4 x accumulation 1" in log, job.diagnostics()
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["accumulation"] == 2 and summary["steps"] == FINAL_STEP, summary
    records = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}
    assert sorted(losses) == list(range(1, FINAL_STEP + 1)), job.diagnostics()  # every step once
    reference = jobs["reference"]
    assert reference.wait()["JobState"] == "COMPLETED", reference.diagnostics()
    expected = {r["step"]: r["loss"] for r in (json.loads(line) for line in
                (reference.run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"}
    # The same global batches on the new shape; only the float summation order of the gradient changes.
    assert [losses[k] for k in sorted(losses)] == pytest.approx([expected[k] for k in sorted(losses)], rel=1e-4)


def test_a_real_error_fails_without_requeue(jobs: dict[str, Job]) -> None:
    job = jobs["broken"]
    info = job.wait()
    assert info["JobState"] == "FAILED", job.diagnostics()
    time.sleep(3)  # a (wrong) requeue would show up within a scheduling cycle
    info = job_info(job.job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", job.diagnostics()
    log = job.log.read_text()
    assert "no-such-dataset" in log and "not requeueing" in log, job.diagnostics()
    assert not (job.run_dir / "summary.json").exists()


def test_deepspeed_config_launches_two_nodes_without_ssh(jobs: dict[str, Job]) -> None:
    """ACCELERATE_CONFIG with a DeepSpeed config: accelerate's "standard" multi-node launcher, one per
    node started by srun (no pdsh/ssh). The ranks are CPU processes here, so they meet over gloo."""
    job = jobs["deepspeed"]
    info = job.wait()
    assert info["JobState"] == "COMPLETED", job.diagnostics()
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sum"] == 3.0, summary
    assert summary["deepspeed"] == "true", summary  # accelerate's DeepSpeed launcher started the ranks
    log = job.log.read_text()
    assert "rank 1 of 2: all-reduce sum 3.0" in log, job.diagnostics()
