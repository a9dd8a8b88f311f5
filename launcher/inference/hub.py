"""`launcher export RUN --format hf`: a trained run as a timm / Hugging Face Hub model folder.

The folder is what timm itself writes and reads (``timm.models.save_for_hf``; ``push_to_hf_hub``
uploads the same): ``config.json`` (architecture, class count, ``label_names``, and the pretrained
config with the input size, crop, interpolation and normalization the run evaluated with),
``model.safetensors``, and a model card ``README.md`` (timm's ``generate_readme``) with the run's
metrics. It loads with ``timm.create_model("local-dir:DIR", pretrained=True)`` or, once pushed,
``timm.create_model("hf-hub:USER/REPO", pretrained=True)``; the export is checked by loading it
exactly like that and comparing logits with the checkpoint's.

The timm model a run trains still carries timm's default pretrained config (the ImageNet weights'
tag, license, paper); it describes other weights, so it is replaced by one describing these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from launcher.inference.evaluate import LoadedModel, load_model
from launcher.inference.runs import RunFiles, locate_run, read_json

__all__ = ["HfExport", "export_hf", "hub_credentials_error"]

TOLERANCE = 1e-4
VERIFY_SIZE = 64
MAX_LISTED_CLASSES = 50


@dataclass
class HfExport:
    folder: Path
    checkpoint: Path
    max_abs_diff: float
    pushed_to: str | None = None  # the commit URL on the Hub


def _pct(value: Any) -> str | None:
    return None if value is None else f"{float(value):.2f} %"


def run_metrics(files: RunFiles, checkpoint: dict[str, Any]) -> dict[str, str]:
    """The numbers a model card shows: validation top-1/top-5/loss of these weights, and of the run."""
    summary = files.summary()
    at_save = checkpoint.get("metrics") or {}
    evaluation = read_json(files.folder / "eval_validation" / "metrics.json")
    rows = {
        "validation top-1 (these weights)": _pct(at_save.get("top1")),
        "validation top-5 (these weights)": _pct(at_save.get("top5")),
        "validation loss (these weights)": None if at_save.get("loss") is None else f"{at_save['loss']:.4f}",
        "best validation top-1 of the run": _pct(summary.get("best_top1")),
        "final validation top-1 / top-5": (f"{summary['final_top1']:.2f} % / {summary['final_top5']:.2f} %"
                                           if summary.get("final_top1") is not None
                                           and summary.get("final_top5") is not None else None),
        "macro F1 (launcher evaluate)": (f"{evaluation['macro_f1']:.3f}" if "macro_f1" in evaluation else None),
        "training throughput": (f"{summary['img_per_s']:.0f} img/s on {summary.get('world_size', 1)} x "
                                f"{summary.get('device', '?')}" if summary.get("img_per_s") else None),
    }
    return {key: value for key, value in rows.items() if value is not None}


def model_card(loaded: LoadedModel, files: RunFiles, checkpoint: dict[str, Any], *, repo_id: str | None,
               license: str) -> dict[str, Any]:
    """timm's model-card dict (``generate_readme`` turns it into README.md)."""
    config = loaded.config
    arch = loaded.name.split(".")[0]
    classes = loaded.classes
    shown = ", ".join(classes[:MAX_LISTED_CLASSES]) + (" ..." if len(classes) > MAX_LISTED_CLASSES else "")
    params = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    where = f'"hf-hub:{repo_id}"' if repo_id else '"local-dir:/path/to/this/folder"'
    training = {label: config[key] for key, label in (("recipe", "recipe"), ("epochs", "epochs"),
                                                      ("global_batch", "global batch"), ("opt", "optimizer"),
                                                      ("lr", "learning rate")) if config.get(key) is not None}
    training["checkpoint"] = f"{files.checkpoint.name}, step {checkpoint.get('step', '?')}"
    details: dict[str, Any] = {
        "Model Type": "Image classification",
        "Architecture": f"{arch} (timm ResNet, torchvision key names)",
        "Model Stats": {"Params (M)": f"{params:.1f}", "Image size": f"{loaded.img_size} x {loaded.img_size}"},
        "Classes": f"{len(classes)}: {shown}",
    }
    if config.get("data"):
        details["Training data"] = Path(str(config["data"])).name or str(config["data"])
    details["Initial weights"] = config.get("pretrained") or "random init"
    details["Training"] = training
    details["Metrics"] = run_metrics(files, checkpoint) or {"(none recorded)": "-"}
    usage = (
        "```python\n"
        "import timm, torch\n"
        "from PIL import Image\n\n"
        f"model = timm.create_model({where}, pretrained=True).eval()\n"
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
        "labels = model.pretrained_cfg['label_names']\n"
        "with torch.no_grad():\n"
        "    probs = model(transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0)).softmax(-1)[0]\n"
        "print(labels[int(probs.argmax())], float(probs.max()))\n"
        "```\n"
    )
    return {
        "description": f"A {arch} image classifier for {len(classes)} classes, trained with resnet-launcher "
                       f"(run `{files.name}`).",
        "details": details, "usage": usage, "license": license,
        "tags": ["image-classification", "timm", "resnet-launcher"],
    }


def _describe_weights(loaded: LoadedModel) -> dict[str, Any]:
    """Replace timm's default pretrained config (it describes the ImageNet weights) with these weights'."""
    size = loaded.img_size
    cfg = {"architecture": loaded.name.split(".")[0], "custom_load": False, "input_size": (3, size, size),
           "fixed_input_size": False, "interpolation": str(loaded.config.get("interpolation", "bicubic")),
           "crop_pct": float(loaded.config.get("crop_pct", 0.95)), "crop_mode": "center",
           "mean": tuple(IMAGENET_DEFAULT_MEAN), "std": tuple(IMAGENET_DEFAULT_STD),
           "num_classes": len(loaded.classes), "pool_size": None, "first_conv": "conv1", "classifier": "fc"}
    loaded.model.pretrained_cfg = loaded.model.default_cfg = cfg
    return {key: cfg[key] for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")}


def hub_credentials_error() -> str | None:
    """Why an upload cannot work here (no token, offline), or None."""
    import huggingface_hub

    from launcher.models.sources import offline_requested

    if offline_requested():
        return "--push-to-hub: HF_HUB_OFFLINE is set; push from a machine with internet"
    if not huggingface_hub.get_token():
        return ("--push-to-hub needs Hugging Face credentials: set HF_TOKEN (a write token from "
                "huggingface.co/settings/tokens) or run `hf auth login`; without --push-to-hub the folder is "
                "only written")
    return None


def verify_folder(folder: Path, loaded: LoadedModel) -> float:
    """Load the folder the way its users will, and compare logits with the checkpoint's model."""
    import timm

    reloaded = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
    if reloaded.num_classes != len(loaded.classes):
        raise RuntimeError(f"{folder}: timm builds a {reloaded.num_classes}-way model, the checkpoint has "
                           f"{len(loaded.classes)} classes")
    if list(reloaded.pretrained_cfg.get("label_names") or []) != loaded.classes:
        raise RuntimeError(f"{folder}: label_names do not match the checkpoint's classes")
    x = torch.randn(2, 3, VERIFY_SIZE, VERIFY_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((reloaded(x) - loaded.model.eval()(x)).abs().max())


def export_hf(run: str | Path, out: str | Path | None = None, *, checkpoint: str = "best",
              push_to_hub: str | None = None, private: bool = False, license: str = "other") -> HfExport:
    """Write (and check, and optionally upload) the timm / Hub folder of a run's checkpoint."""
    from timm.models import push_to_hf_hub, save_for_hf
    from timm.models._hub import generate_readme

    from launcher.inference.evaluate import read_checkpoint

    files = locate_run(run, checkpoint)
    if push_to_hub and (problem := hub_credentials_error()):
        raise ValueError(problem)
    raw = read_checkpoint(files.checkpoint)
    loaded = load_model(files.checkpoint, device="cpu")
    folder = Path(out) if out else files.folder / "exports" / f"{files.checkpoint.stem}-hf"
    data_config = _describe_weights(loaded)
    model_config = {"label_names": list(loaded.classes)}
    card = model_card(loaded, files, raw, repo_id=push_to_hub, license=license)
    save_for_hf(loaded.model, str(folder), model_config=model_config, data_config=data_config,
                safe_serialization=True)
    readme = generate_readme(card, push_to_hub.split("/")[-1] if push_to_hub else files.name)
    (folder / "README.md").write_text(readme, encoding="utf-8")
    diff = verify_folder(folder, loaded)
    if not diff <= TOLERANCE:
        raise RuntimeError(f"{folder} does not reproduce the checkpoint: max |logit difference| {diff:.3g}")
    result = HfExport(folder, files.checkpoint, diff)
    if push_to_hub:
        # timm's uploader writes the same files (save_for_hf + generate_readme) and keeps a README already
        # on the Hub; it creates the repository when needed.
        commit = push_to_hf_hub(loaded.model, push_to_hub, commit_message=f"resnet-launcher run {files.name}",
                                private=private, model_config=model_config, model_card=card,
                                data_config=data_config, safe_serialization=True)
        result.pushed_to = str(getattr(commit, "commit_url", None) or commit)
    return result


def export_hf_command(run: str, fmt: str, out: str | None, *, push_to_hub: str, private: bool) -> int:
    """`launcher export RUN --format hf [--push-to-hub REPO]`: exit code 0, or 2 with a one-line error."""
    import sys

    try:
        if fmt != "hf":
            raise ValueError(f"--push-to-hub uploads a --format hf folder, not {fmt}")
        result = export_hf(run, out, push_to_hub=push_to_hub or None, private=private)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        print(f"launcher export: {error}", file=sys.stderr)
        return 2
    names = ", ".join(sorted(path.name for path in result.folder.iterdir()))
    print(f"exported {result.folder}/ ({names}) from {result.checkpoint}; verified with "
          f'timm.create_model("local-dir:{result.folder}", pretrained=True): max |logit difference| '
          f"{result.max_abs_diff:.2e}")
    if result.pushed_to:
        print(f"pushed to the Hugging Face Hub: {result.pushed_to}")
    return 0
