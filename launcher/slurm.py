"""`launcher slurm`: an sbatch script for given nodes / GPUs / partition / time / recipe, from slurm/*.sh.

    launcher slurm --nodes 4 --partition gpu --time 2-00:00:00 --model resnet101 --data shards/imagenet --dry-run
    launcher slurm --nodes 2 --recipe a3 --model resnet50 --data shards/imagenet --submit -- --epochs 50
    launcher slurm --recipe finetune --model resnet18 --data photos/ --gpus-per-node 1 --out ft.sbatch

The script is one of the repository's templates (slurm/resnet101.sh, resnet50.sh, resnet18.sh,
finetune.sh) with its ``#SBATCH`` header and defaults replaced, so it launches, checkpoints on
preemption and requeues exactly like the template. Every baked-in value stays overridable from the
environment at submit time. Arguments after ``--`` are recipe flags (they become EXTRA_ARGS).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"  # shipped in the wheel
# A source checkout (slurm/common.sh next to the package) is where a rendered job runs and finds its venv;
# an installed package has none, and the job runs in its submit directory.
CHECKOUT = Path(__file__).resolve().parent.parent
IS_CHECKOUT = (CHECKOUT / "slurm" / "common.sh").is_file()
TEMPLATES = ("resnet101", "resnet50", "resnet18", "finetune")
KNOWN_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TRAIN_RECIPES = ("a1", "a2", "a3")
# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED.
TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$", re.I)
SAFE_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_.:,=+%@/\[\]-]+$")


class SlurmRenderError(ValueError):
    """A setting that cannot go into an sbatch script; the message names it."""


@dataclass
class SlurmJob:
    """What one rendered script asks for. ``None`` keeps the template's default."""

    template: str | None = None            # resnet101 | resnet50 | resnet18 | finetune (None: from model/recipe)
    job_name: str | None = None
    nodes: int = 1
    gpus_per_node: int | None = None       # 0 = CPU partition (no GPU request, DEVICE=cpu)
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclusive: bool = False
    signal_seconds: int = 120              # USR1 to the batch shell this long before the time limit
    log: str | None = None                 # --output pattern (template: %x-%j.out)
    recipe: str | None = None
    model: str | None = None
    data: str | None = None
    output: str | None = None
    runs_dir: str | None = None
    procs_per_node: int | None = None
    accelerate_config: str | None = None
    max_requeues: int | None = None
    pretrained: str | None = None
    python: str | None = None
    extra_args: list[str] = field(default_factory=list)

    def resolved_template(self) -> str:
        if self.template:
            return self.template
        if self.recipe == "finetune":
            return "finetune"
        return self.model if self.model in TEMPLATES else "resnet50"


def _check(job: SlurmJob) -> list[str]:
    """Raise on settings sbatch or the template would reject; return warnings for unusual ones."""
    warnings: list[str] = []
    template = job.resolved_template()
    if template not in TEMPLATES:
        raise SlurmRenderError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
    if job.nodes < 1:
        raise SlurmRenderError(f"--nodes {job.nodes}: needs at least 1 node")
    for name in ("gpus_per_node", "cpus_per_task", "procs_per_node", "max_requeues"):
        value = getattr(job, name)
        if value is not None and value < (0 if name in ("gpus_per_node", "max_requeues") else 1):
            raise SlurmRenderError(f"--{name.replace('_', '-')} {value}: out of range")
    if job.time is not None and not TIME_RE.match(job.time):
        raise SlurmRenderError(f"--time {job.time!r}: use Slurm's formats, e.g. 90, 4:00:00, 2-00:00:00")
    if job.signal_seconds < 1:
        raise SlurmRenderError(f"--signal-seconds {job.signal_seconds}: must be positive")
    for name in ("job_name", "partition", "account", "qos", "constraint", "mem", "log", "time"):
        value = getattr(job, name)
        if value is not None and not SAFE_SBATCH_VALUE.match(value):
            raise SlurmRenderError(f"--{name.replace('_', '-')} {value!r}: #SBATCH values cannot hold spaces or quotes")
    if job.model is not None and job.model not in KNOWN_MODELS:
        warnings.append(f"model {job.model!r} is not one of {', '.join(KNOWN_MODELS)}; the recipe will decide")
    if job.recipe is not None and job.recipe not in (*TRAIN_RECIPES, "finetune"):
        recipe_path = Path(job.recipe)
        if not recipe_path.is_file():
            raise SlurmRenderError(f"--recipe {job.recipe!r}: not a1/a2/a3/finetune and no such file")
    if template == "finetune" and job.recipe in TRAIN_RECIPES:
        warnings.append(f"template finetune with recipe {job.recipe}: the recipe wins")
    for arg in job.extra_args:
        if not arg or any(c.isspace() for c in arg):
            raise SlurmRenderError(f"recipe argument {arg!r}: EXTRA_ARGS is split on spaces, so arguments cannot contain any")
    local_data = job.data and not re.match(r"^[a-z]+://|^pipe:", job.data) and "{" not in job.data
    if local_data and not Path(job.data).exists():  # type: ignore[arg-type]
        warnings.append(f"data {job.data!r} does not exist here (fine if it exists on the cluster)")
    if job.accelerate_config and not (Path(job.accelerate_config).is_file() or (CHECKOUT / job.accelerate_config).is_file()):
        raise SlurmRenderError(f"--accelerate-config {job.accelerate_config!r}: no such file")
    return warnings


def default_job_name(job: SlurmJob) -> str | None:
    """<model>-<recipe> when either differs from the template's defaults (it names the run folder)."""
    if job.job_name or (job.model is None and job.recipe is None):
        return job.job_name
    template = job.resolved_template()
    recipe = Path(job.recipe).stem if job.recipe else ("finetune" if template == "finetune" else "a2")
    model = job.model or {"resnet101": "resnet101", "resnet18": "resnet18"}.get(template, "resnet50")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model}-{recipe}")


def _sbatch_lines(job: SlurmJob, template_lines: list[str]) -> list[str]:
    """The template's #SBATCH lines with the requested values substituted, missing ones added."""
    wanted: dict[str, str | None] = {
        "job-name": default_job_name(job),
        "nodes": str(job.nodes),
        "cpus-per-task": None if job.cpus_per_task is None else str(job.cpus_per_task),
        "time": job.time,
        "output": job.log,
        "signal": f"B:USR1@{job.signal_seconds}",
        "partition": job.partition,
        "account": job.account,
        "qos": job.qos,
        "constraint": job.constraint,
        "mem": job.mem,
    }
    drop = set()
    if job.gpus_per_node == 0:
        drop.add("gpus-per-node")
    elif job.gpus_per_node is not None:
        wanted["gpus-per-node"] = str(job.gpus_per_node)
    lines, seen = [], set()
    for line in template_lines:
        match = re.match(r"^#SBATCH --([a-z-]+)(=(.*))?$", line)
        if not match:
            continue
        key = match.group(1)
        seen.add(key)
        if key in drop:
            continue
        value = wanted.get(key)
        lines.append(f"#SBATCH --{key}={value}" if value is not None else line)
    for key, value in wanted.items():
        if key not in seen and value is not None:
            lines.append(f"#SBATCH --{key}={value}")
    if job.exclusive and "exclusive" not in seen:
        lines.append("#SBATCH --exclusive")
    return lines


def _assign(name: str, value: str) -> str:
    # NAME=${NAME:-'value'}: baked in, still overridable from the environment at submit time.
    return f"{name}=${{{name}:-{shlex.quote(value)}}}"


def _defaults(job: SlurmJob, template: str) -> list[str]:
    values: dict[str, str | None] = {
        "RECIPE": job.recipe or ("finetune" if template == "finetune" else "a2"),
        "MODEL": job.model or {"resnet101": "resnet101", "resnet18": "resnet18"}.get(template, "resnet50"),
        "DATA": str(Path(job.data).resolve()) if job.data and Path(job.data).exists() else job.data,
        "OUTPUT": job.output,
        "RUNS_DIR": str(Path(job.runs_dir).resolve()) if job.runs_dir else None,
        "PROCS_PER_NODE": None if job.procs_per_node is None else str(job.procs_per_node),
        "DEVICE": "cpu" if job.gpus_per_node == 0 else None,
        "ACCELERATE_CONFIG": job.accelerate_config,
        "MAX_REQUEUES": None if job.max_requeues is None else str(job.max_requeues),
        "PYTHON": job.python,
        "EXTRA_ARGS": " ".join(job.extra_args) if job.extra_args else None,
    }
    lines = [_assign(name, value) for name, value in values.items() if value is not None]
    # recipes/finetune.py names its initial weights --weights; the training recipes --pretrained.
    flag = "--weights" if template == "finetune" else "--pretrained"
    if job.pretrained:
        lines.append(f'EXTRA_ARGS="{flag} {shlex.quote(job.pretrained)} ${{EXTRA_ARGS:-}}"')
    elif template == "finetune":
        lines.append(f'[[ -n "${{PRETRAINED:-}}" ]] && EXTRA_ARGS="{flag} $PRETRAINED ${{EXTRA_ARGS:-}}"')
    # The rendered file may live anywhere: point it at this checkout unless told otherwise.
    if IS_CHECKOUT:
        lines.append(_assign("LAUNCHER_HOME", str(CHECKOUT)))
    return lines


def render(job: SlurmJob, command: str = "") -> tuple[str, list[str]]:
    """The sbatch script for ``job`` and the warnings about it."""
    warnings = _check(job)
    template = job.resolved_template()
    path = TEMPLATE_DIR / f"{template}.sh"
    text = path.read_text()
    lines = text.splitlines()
    first_sbatch = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    header = lines[:first_sbatch]
    note = [f"# Rendered from launcher/templates/{template}.sh by `launcher slurm`" + (f": {command}" if command else ".")]
    # slurm_node runs on the nodes, called through srun's environment (export -f): not unreachable.
    lint = ["# shellcheck disable=SC2317"]
    out = [header[0], *lint, *note, *header[1:], *_sbatch_lines(job, lines[first_sbatch : last_sbatch + 1]), ""]
    out += _defaults(job, template) + [""] + _inlined_common()
    return "\n".join(out) + "\n", warnings


def _inlined_common() -> list[str]:
    """The shared part, inlined: the rendered script then needs no file of the repository at run time."""
    common = (TEMPLATE_DIR / "common.sh").read_text().splitlines()
    body = [line for line in common if not line.startswith("# shellcheck shell=")]
    return ['LAUNCHER_HOME="${LAUNCHER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"',
            "# ---- launcher/templates/common.sh (inlined) ----", *body,
            "# ---- end of common.sh ----", "slurm_main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launcher slurm",
        description="Render an sbatch script from the templates (slurm/*.sh in a checkout) for given resources and recipe; "
        "--dry-run prints it, otherwise it is written (and with --submit, submitted). "
        "Arguments after -- are recipe flags (e.g. -- --epochs 50 --report-to wandb).",
    )
    g = p.add_argument_group("resources (#SBATCH)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (one srun task each)")
    g.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (0 = CPU partition; default: template's)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node task, for loader workers (default: template's)")
    g.add_argument("--partition", "-p", default=None)
    g.add_argument("--time", "-t", default=None, help="time limit, e.g. 24:00:00 or 2-00:00:00 (the job requeues itself)")
    g.add_argument("--job-name", "-J", default=None, help="job name (also names the run folder)")
    g.add_argument("--account", "-A", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", "-C", default=None)
    g.add_argument("--mem", default=None, help="memory per node, e.g. 500G or 0 (all)")
    g.add_argument("--exclusive", action="store_true", help="whole nodes")
    g.add_argument("--signal-seconds", type=int, default=120, help="USR1 this long before the time limit")
    g.add_argument("--log", default=None, help="job log pattern (default %%x-%%j.out)")
    g = p.add_argument_group("training")
    g.add_argument("--template", choices=TEMPLATES, default=None, help="default: from --recipe/--model")
    g.add_argument("--recipe", default=None, help="a1 | a2 | a3 | finetune | path/to/recipe.py")
    g.add_argument("--model", default=None, help=f"{' | '.join(KNOWN_MODELS)}")
    g.add_argument("--data", default=None, help="shardify folder, URL pattern or class-folder tree")
    g.add_argument("--run-output", dest="output", default=None, help="run folder (default: RUNS_DIR/<job name>-<job id>)")
    g.add_argument("--runs-dir", default=None, help="parent of the default run folders (default: <repo>/runs)")
    g.add_argument("--procs-per-node", type=int, default=None, help="processes per node (default: GPUs per node)")
    g.add_argument("--accelerate-config", default=None, help="e.g. recipes/accelerate/deepspeed_zero2.yaml")
    g.add_argument("--max-requeues", type=int, default=None, help="requeue limit (default 20)")
    g.add_argument("--pretrained", default=None, help="initial weights (torchvision/timm name or file; --weights for finetune, --pretrained otherwise)")
    g.add_argument("--python", default=None, help="interpreter on the nodes with resnet-launcher installed (default: <repo>/.venv/bin/python in a checkout, else the python3 on PATH)")
    g = p.add_argument_group("what to do")
    g.add_argument("--dry-run", action="store_true", help="print the script and stop")
    g.add_argument("--out", "-o", default=None, help="write the script here (default: <job name>.sbatch)")
    g.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    g.add_argument("--submit", action="store_true", help="sbatch the written script")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("dry_run", "out", "force", "submit")}
    job = SlurmJob(**options, extra_args=extra)
    command = " ".join(shlex.quote(a) for a in ["launcher", "slurm", *argv, *(["--", *extra] if extra else [])])
    try:
        script, warnings = render(job, command)
    except SlurmRenderError as exc:
        print(f"launcher slurm: error: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"launcher slurm: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    name = re.search(r"^#SBATCH --job-name=(\S+)", script, re.M).group(1)  # type: ignore[union-attr]
    out = Path(args.out or f"{name}.sbatch")
    if out.exists() and not args.force:
        print(f"launcher slurm: error: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    out.chmod(0o755)
    print(f"wrote {out}")
    if not args.submit:
        print(f"submit with: sbatch {shlex.quote(str(out))}")
        return 0
    if shutil.which("sbatch") is None:
        print("launcher slurm: error: sbatch not found on PATH (is this a Slurm login node?)", file=sys.stderr)
        return 2
    result = subprocess.run(["sbatch", str(out)], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
