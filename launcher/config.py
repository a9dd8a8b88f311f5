"""One flat, typed training configuration; command-line and YAML round-trips; validation.

Every knob of a run is a field of :class:`TrainConfig` with a default and a help string. Recipes
(``recipes/a1.py`` ...) are instances of it; ``parse_config(argv, base)`` turns every field into a
``--kebab-case`` flag whose default comes from ``base``, so ``python recipes/a2.py --epochs 50`` is the
recipe with one number changed. ``--config run.yaml`` loads a saved config (e.g. a run folder's
``config.yaml``) before the flags are applied.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting is invalid; the message names it and fits on one line."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("lamb", "adamw", "sgd")
LOSSES = ("bce", "ce")
TRACKERS = ("none", "wandb", "tensorboard")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
MIXUP_MODES = ("batch", "pair", "elem")
DIST_BN = ("reduce", "broadcast", "none")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------------
    data: str = _f("", "shard folder (shardify output), URL/brace pattern ('...{000..009}.tar|N'), or class-folder tree")
    train_split: str = _f("train", "name of the training split")
    val_split: str = _f("validation", "name of the validation split ('' = no evaluation)")
    workers: int | None = _f(None, "loader worker processes per rank (None = the cores this process may use, one "
                                   "fewer on GPUs; 0 = load in the main process)")
    pin_memory: bool = _f(True, "pin host memory for faster host-to-GPU copies (ignored on CPU)")
    # --- model ------------------------------------------------------------------------------------
    model: str = _f("resnet50", "ResNet variant (resnet18/34/50/101/152, ...)")
    num_classes: int = _f(0, "output classes (0 = number of classes in the dataset)")
    pretrained: str | None = _f(None, "initial weights: torchvision/timm name or local file (None = random init)")
    trainable_layers: str = _f("all", "'all' or N: train only the last N stages (1 = fc only)")
    drop_path: float = _f(0.0, "stochastic depth rate of the last block (linearly scaled per block)")
    zero_init_last: bool = _f(True, "zero-init the last BN gamma of each residual block")
    # --- batch and schedule -----------------------------------------------------------------------
    epochs: int = _f(100, "training epochs")
    global_batch: int = _f(2048, "images per optimizer step over all devices (micro x accumulation x world)")
    micro_batch: int = _f(0, "images per device per forward pass (0 = the largest that fits: probed on CUDA, "
                             "from a host-memory budget on CPU)")
    opt: str = _f("lamb", "optimizer", OPTIMIZERS)
    lr: float = _f(5e-3, "peak learning rate, valid for a global batch of --lr-ref-batch")
    lr_ref_batch: int = _f(
        2048,
        "global batch that --lr is given for; another --global-batch rescales the LR (sqrt for lamb/adamw, "
        "linear for sgd). Giving --lr alone sets this to 0 = use the LR as is",
    )
    weight_decay: float = _f(0.02, "weight decay (not applied to BN and bias)")
    momentum: float = _f(0.9, "SGD momentum (sgd only)")
    clip_grad: float | None = _f(None, "extra global grad-norm clip (LAMB already clips at 1.0 inside)")
    warmup_epochs: int = _f(5, "linear warmup epochs (inside --epochs, as in timm; shortened to epochs - 1 "
                               "when the run is not longer)")
    warmup_lr: float = _f(1e-4, "learning rate at the start of warmup")
    min_lr: float = _f(1e-6, "final learning rate of the cosine decay")
    sched_on_updates: bool = _f(False, "step the LR schedule every optimizer update instead of every epoch")
    # --- loss and regularization ------------------------------------------------------------------
    loss: str = _f("bce", "training loss: binary cross-entropy (RSB) or soft-target cross-entropy", LOSSES)
    bce_target_thresh: float | None = _f(0.2, "BCE: targets above this become 1, others 0 (None = keep soft)")
    smoothing: float = _f(0.0, "label smoothing")
    class_weights: str = _f("none", "per-class loss weights", CLASS_WEIGHTS)
    mixup: float = _f(0.0, "mixup alpha (0 = off)")
    cutmix: float = _f(0.0, "cutmix alpha (0 = off)")
    mixup_prob: float = _f(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = _f("batch", "one mix per batch, per pair or per element", MIXUP_MODES)
    model_ema: bool = _f(False, "keep an exponential moving average of the weights and evaluate it too")
    model_ema_decay: float = _f(0.9998, "EMA decay per optimizer update")
    # --- augmentation and resolution --------------------------------------------------------------
    img_size: int = _f(224, "training resolution")
    test_img_size: int = _f(0, "extra evaluation resolution (0 = none; A3 trains at 160, is evaluated at 224). "
                               "Changing --img-size alone scales the recipe's value by the same ratio")
    crop_pct: float = _f(0.95, "evaluation center-crop fraction (resize to img_size / crop_pct, then crop)")
    interpolation: str = _f("bicubic", "resize interpolation for train and eval", INTERPOLATIONS)
    auto_augment: str | None = _f("rand-m7-mstd0.5-inc1", "timm RandAugment string (None = off)")
    aug_repeats: int = _f(0, "repeated augmentation: each image seen N times per epoch (0 = off)")
    scale: tuple[float, float] = _f((0.08, 1.0), "random-resized-crop area range")
    ratio: tuple[float, float] = _f((3 / 4, 4 / 3), "random-resized-crop aspect-ratio range")
    hflip: float = _f(0.5, "horizontal flip probability")
    # --- hardware and speed -----------------------------------------------------------------------
    device: str = _f("auto", "cuda if available, else cpu; 'cpu' forces CPU", DEVICES)
    precision: str = _f("auto", "autocast dtype; auto = bf16 where supported (CPU, Ampere+), else fp16", PRECISIONS)
    channels_last: bool = _f(True, "NHWC memory layout (faster convolutions on GPUs and CPUs)")
    compile: bool = _f(False, "torch.compile the model")
    dist_bn: str = _f("reduce", "BN running stats across ranks at epoch end: average, copy rank 0, or keep", DIST_BN)
    sync_bn: bool = _f(False, "synchronize BN batch statistics across ranks (SyncBatchNorm)")
    threads: int = _f(0, "torch CPU threads per process (0 = torch default)")
    deterministic: bool = _f(False, "use deterministic algorithms (slower)")
    seed: int = _f(42, "random seed (model init, mixup, drop-path; data order uses it too)")
    # --- evaluation, checkpoints, logging ---------------------------------------------------------
    eval_every: int = _f(1, "evaluate every N epochs (and after the last)")
    eval_every_steps: int = _f(0, "also evaluate every N optimizer steps (0 = per epoch only)")
    test_eval_every: int = _f(0, "evaluate at --test-img-size every N epochs too (0 = only at the end of the run: "
                                 "the paper's number; it is not used to pick best.pt)")
    eval_batch: int = _f(0, "evaluation batch per device (0 = 2 x micro-batch)")
    early_stop_patience: int = _f(0, "stop after N evaluations without a better top-1 (0 = off)")
    checkpoint_every: int = _f(0, "also checkpoint every N optimizer steps (0 = at epoch ends only)")
    keep_checkpoints: int = _f(2, "step checkpoints to keep besides last.pt and best.pt")
    resume: str = _f("", "'auto' = continue <output>/checkpoints/last.pt if present; or a checkpoint path")
    log_every: int = _f(50, "log training metrics every N optimizer steps")
    report_to: str = _f("none", "experiment tracker (wandb runs offline without credentials)", TRACKERS)
    project: str = _f("resnet-launcher", "tracker project name")
    name: str = _f("", "run name (default: <recipe>-<model>-<time>)")
    output: str = _f("", "run folder (default: runs/<name>)")
    recipe: str = _f("custom", "recipe this config came from (informational)")
    progress: bool = _f(True, "progress on the main process: a bar on a terminal, one line per log interval "
                              "in a file (LAUNCHER_PROGRESS=bar|lines forces one)")
    # --- short runs -------------------------------------------------------------------------------
    max_train_steps: int = _f(0, "stop after N optimizer steps in total (0 = run all epochs)")
    limit_train_batches: int = _f(0, "at most N optimizer steps per epoch; the schedule follows (0 = all)")
    limit_eval_batches: int = _f(0, "at most N evaluation batches per rank (0 = all)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def resolved_lr(self) -> float:
        """The LR used at the configured global batch (see ``lr_ref_batch``)."""
        if self.lr_ref_batch <= 0 or self.lr_ref_batch == self.global_batch:
            return self.lr
        from launcher.models.optim import scaled_lr

        return float(scaled_lr(self.lr, self.lr_ref_batch, self.global_batch, self.opt))

    def lr_rule(self) -> str:
        if self.lr_ref_batch <= 0:
            return "as given"
        if self.lr_ref_batch == self.global_batch:
            return f"recipe value for global batch {self.global_batch}"
        kind = "linear" if self.opt == "sgd" else "sqrt"
        return f"{kind} scaling of {self.lr:g} from global batch {self.lr_ref_batch} to {self.global_batch}"

    def trainable_layers_value(self) -> int | str:
        return "all" if self.trainable_layers == "all" else int(self.trainable_layers)


_HINTS = typing.get_type_hints(TrainConfig)
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X`` or ``X | None``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the field's type; error names the field and where it came from."""
    base, optional = _base_type(_HINTS[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{source}: {name} may not be empty")
    try:
        if typing.get_origin(base) is tuple:
            items = list(value) if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
            item_type = typing.get_args(base)[0]
            if len(items) != len(typing.get_args(base)):
                raise ValueError(f"expected {len(typing.get_args(base))} values")
            return tuple(item_type(v) for v in items)
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        if base is str and name == "trainable_layers":
            return str(value)
        return base(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad value {value!r} for {name} ({exc})") from None


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    cfg = base or TrainConfig()
    return dataclasses.replace(cfg, **{k: _coerce(k, v, source) for k, v in values.items()})


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return config_from_dict(values, base, source=str(path))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(base: TrainConfig, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """Every field becomes a flag; defaults are SUPPRESSed so we know which flags were given."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="load settings from a YAML file, then apply flags")
    for f in fields(TrainConfig):
        base_type, optional = _base_type(_HINTS[f.name])
        default = getattr(base, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata['help']} (default: {shown})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_, "dest": f.name}
        if base_type is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base_type) is tuple:
            kwargs.update(nargs=len(typing.get_args(base_type)), metavar=f.name.upper())
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["metavar"] = ("X|none" if optional else base_type.__name__.upper())
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_config(argv: list[str] | None, base: TrainConfig | None = None, prog: str | None = None) -> TrainConfig:
    """``base`` (a recipe) <- ``--config`` YAML <- explicit flags; then validated.

    LR rule: giving ``--lr`` without ``--lr-ref-batch`` means "use this LR as is".
    Raises :class:`ConfigError` (one line, naming the setting) on bad input; ``--help`` exits 0.
    """
    base = base or TrainConfig()
    parser = build_parser(base, prog=prog)
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        raise ConfigError("bad command line (see the message above)") from None
    given = vars(namespace)
    config_file = given.pop("config", None)
    cfg = load_config(config_file, base) if config_file else base
    cfg = config_from_dict(given, cfg, source="command line")
    if "lr" in given and "lr_ref_batch" not in given:
        cfg = dataclasses.replace(cfg, lr_ref_batch=0)
    overridden = set(given) | (set(yaml.safe_load(Path(config_file).read_text()) or {}) if config_file else set())
    cfg = carry_test_resolution(cfg, base, overridden)
    validate(cfg)
    return cfg


def carry_test_resolution(cfg: TrainConfig, recipe: TrainConfig, overridden: set[str]) -> TrainConfig:
    """A recipe's extra test resolution follows a changed training resolution at the recipe's ratio.

    A3 trains at 160 and is also evaluated at 224; trained at 32 px, the matching extra evaluation is at
    45 px (32 x 224 / 160), not at 224, which would be both slow and meaningless for a 32-px model.
    """
    if "img_size" not in overridden or "test_img_size" in overridden or not recipe.test_img_size:
        return cfg
    carried = round(cfg.img_size * recipe.test_img_size / recipe.img_size)
    return dataclasses.replace(cfg, test_img_size=carried if carried != cfg.img_size else 0)


def validate(cfg: TrainConfig) -> None:
    """Checks that need no hardware; the engine adds world-size / device checks."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        if choices:
            need(getattr(cfg, f.name) in choices,
                 f"{f.name}={getattr(cfg, f.name)!r} is not one of {', '.join(choices)}")
    need(bool(cfg.data), "data is not set: pass --data (shard folder, URL pattern or class folder)")
    from launcher.models.registry import RESNET_NAMES

    need(cfg.model in RESNET_NAMES, f"model={cfg.model!r} is unknown; choose one of {', '.join(RESNET_NAMES)}")
    for name in ("epochs", "global_batch", "img_size", "eval_every"):
        need(getattr(cfg, name) > 0, f"{name} must be > 0 (got {getattr(cfg, name)})")
    need(cfg.workers is None or cfg.workers >= 0, f"workers must be >= 0 or none (got {cfg.workers})")
    for name in ("micro_batch", "aug_repeats", "warmup_epochs", "test_img_size", "eval_batch",
                 "eval_every_steps", "test_eval_every", "early_stop_patience", "checkpoint_every", "keep_checkpoints",
                 "max_train_steps", "limit_train_batches", "limit_eval_batches", "num_classes", "threads",
                 "lr_ref_batch"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0 (got {getattr(cfg, name)})")
    need(cfg.log_every > 0, f"log_every must be > 0 (got {cfg.log_every})")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"lr must be a positive number (got {cfg.lr})")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0 (got {cfg.weight_decay})")
    need(0 < cfg.crop_pct <= 1, f"crop_pct must be in (0, 1] (got {cfg.crop_pct})")
    need(0 <= cfg.drop_path < 1, f"drop_path must be in [0, 1) (got {cfg.drop_path})")
    need(0 <= cfg.smoothing < 1, f"smoothing must be in [0, 1) (got {cfg.smoothing})")
    need(0 <= cfg.hflip <= 1, f"hflip must be in [0, 1] (got {cfg.hflip})")
    need(cfg.mixup >= 0 and cfg.cutmix >= 0, "mixup and cutmix alphas must be >= 0")
    need(0 < cfg.scale[0] <= cfg.scale[1] <= 1, f"scale must satisfy 0 < min <= max <= 1 (got {cfg.scale})")
    need(0 < cfg.ratio[0] <= cfg.ratio[1], f"ratio must satisfy 0 < min <= max (got {cfg.ratio})")
    if cfg.bce_target_thresh is not None:
        need(0 <= cfg.bce_target_thresh < 1, f"bce_target_thresh must be in [0, 1) (got {cfg.bce_target_thresh})")
    need(cfg.trainable_layers == "all" or cfg.trainable_layers in ("1", "2", "3", "4", "5"),
         f"trainable_layers must be 'all' or 1..5 (1 = fc, 2 = layer4+fc, ..., 5 = layer1..fc; got "
         f"{cfg.trainable_layers!r})")
    if cfg.micro_batch:
        need(cfg.global_batch % cfg.micro_batch == 0,
             f"global_batch={cfg.global_batch} is not divisible by micro_batch={cfg.micro_batch}")
        need(not mixing_enabled(cfg) or cfg.micro_batch % 2 == 0,
             f"micro_batch={cfg.micro_batch} must be even when mixup/cutmix is on (pairs are mixed)")
    try:
        from launcher.progress import check_environment

        check_environment()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    need(cfg.resume in ("", "auto") or Path(cfg.resume).is_file(),
         f"resume={cfg.resume!r}: no such checkpoint file (use 'auto' or a path to a .pt file)")


def mixing_enabled(cfg: TrainConfig) -> bool:
    return cfg.mixup_prob > 0 and (cfg.mixup > 0 or cfg.cutmix > 0)
