"""`launcher export`: a training checkpoint as safetensors, TorchScript or ONNX, checked on the spot.

* ``safetensors``: the bare state_dict with torchvision/timm key names. It loads unchanged into
  ``torchvision.models.<name>(num_classes=N)`` or ``timm.create_model("<name>", num_classes=N)``;
  the export is verified by doing exactly that with torchvision and comparing logits.
* ``torchscript``: ``torch.jit.trace`` of the eval-mode model (runs without this package, or Python
  through libtorch). TorchScript is deprecated upstream but still the way to load a model in C++.
* ``onnx``: the TorchScript-based exporter (``dynamo=False``; the dynamo exporter needs onnxscript),
  opset 17, dynamic batch / height / width. Checked with ``onnx.checker`` and run with onnxruntime
  when it is installed, otherwise with onnx's pure-Python reference evaluator.

Every export gets a ``<file>.json`` beside it with what a user needs to feed it: classes, input size,
crop fraction, interpolation and the normalization mean/std (inputs are normalized float RGB NCHW).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from launcher.inference.evaluate import LoadedModel, default_output, load_model
from launcher.train.runs import CHECKPOINT_HELP, WHICH_HELP, resolve_checkpoint

FORMATS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
# A small input keeps verification quick (the ONNX reference evaluator is pure numpy); ResNets are
# fully convolutional up to the global pool, so agreement here is agreement at any size.
VERIFY_SIZE = 64
TOLERANCE = 1e-4


@dataclass
class ExportResult:
    path: Path
    metadata_path: Path
    format: str
    max_abs_diff: float | None
    verified_with: str


def export_metadata(loaded: LoadedModel, fmt: str) -> dict[str, Any]:
    name = loaded.name.split(".")[0]
    n = len(loaded.classes)
    return {
        "format": fmt, "model": name, "num_classes": n, "classes": loaded.classes,
        "input_size": [3, loaded.img_size, loaded.img_size],
        "crop_pct": float(loaded.config.get("crop_pct", 0.95)),
        "interpolation": str(loaded.config.get("interpolation", "bicubic")),
        "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
        "input": "float32 RGB NCHW, (pixel / 255 - mean) / std",
        "load_torchvision": f"torchvision.models.{name}(num_classes={n})",
        "load_timm": f"timm.create_model('{name}', num_classes={n})",
        "source_checkpoint": str(loaded.path),
    }


def _reference_input(loaded: LoadedModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, VERIFY_SIZE, VERIFY_SIZE, generator=generator)


@torch.no_grad()
def _reference_logits(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    return loaded.model.cpu().float()(x).float()


def _export_safetensors(loaded: LoadedModel, path: Path, metadata: dict[str, Any]) -> tuple[float, str]:
    import torchvision
    from safetensors.torch import load_file, save_file

    state = {key: value.detach().cpu().contiguous() for key, value in loaded.model.state_dict().items()}
    save_file(state, str(path), metadata={key: json.dumps(value) for key, value in metadata.items()})
    plain = getattr(torchvision.models, metadata["model"])(num_classes=metadata["num_classes"])
    plain.load_state_dict(load_file(str(path)), strict=True)
    x = _reference_input(loaded)
    with torch.no_grad():
        diff = (plain.eval()(x) - _reference_logits(loaded, x)).abs().max()
    return float(diff), f"torchvision.models.{metadata['model']}"


def _export_torchscript(loaded: LoadedModel, path: Path) -> tuple[float, str]:
    x = torch.randn(1, 3, loaded.img_size, loaded.img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation notice
        traced = torch.jit.trace(loaded.model.cpu().float().eval(), x)
        torch.jit.save(traced, str(path))
        reloaded = torch.jit.load(str(path), map_location="cpu")
        probe = _reference_input(loaded)
        diff = (reloaded(probe) - _reference_logits(loaded, probe)).abs().max()
    return float(diff), "torch.jit.load"


def _run_onnx(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), "onnxruntime"
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        output = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
        return torch.from_numpy(output), "onnx.reference (onnxruntime not installed)"


def _export_onnx(loaded: LoadedModel, path: Path, metadata: dict[str, Any]) -> tuple[float, str]:
    import onnx

    x = torch.randn(1, 3, loaded.img_size, loaded.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(loaded.model.cpu().float().eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    for key in ("model", "classes", "mean", "std", "input_size", "interpolation", "crop_pct"):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(metadata[key])
    onnx.save(model, str(path))
    probe = _reference_input(loaded)
    output, runtime = _run_onnx(path, probe)
    return float((output - _reference_logits(loaded, probe)).abs().max()), runtime


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None) -> ExportResult:
    """Write the export and verify that it reproduces the checkpoint's logits (raises if not)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    loaded = load_model(checkpoint, device="cpu")
    path = Path(out) if out else default_output(loaded.path, "exports") / f"{loaded.path.stem}{FORMATS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = export_metadata(loaded, fmt)
    # Written under a temporary name and verified there: an existing export is replaced only by a good one.
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        if fmt == "safetensors":
            diff, verified_with = _export_safetensors(loaded, partial, metadata)
        elif fmt == "torchscript":
            diff, verified_with = _export_torchscript(loaded, partial)
        else:
            diff, verified_with = _export_onnx(loaded, partial, metadata)
        if not diff <= TOLERANCE:
            raise RuntimeError(f"export {path} does not reproduce the checkpoint: max |logit difference| {diff:.3g} "
                               f"with {verified_with}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    metadata_path = path.with_name(path.name + ".json")
    metadata["verified"] = {"with": verified_with, "max_abs_logit_diff": diff, "input": [2, 3, VERIFY_SIZE, VERIFY_SIZE]}
    tmp = metadata_path.with_name(f".{metadata_path.name}.tmp")
    tmp.write_text(json.dumps(metadata, indent=2) + "\n")
    os.replace(tmp, metadata_path)
    return ExportResult(path, metadata_path, fmt, diff, verified_with)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher export", description=(
        "Export a training checkpoint and check that the export gives the checkpoint's logits. "
        "safetensors loads into plain torchvision.models.<name>(num_classes=N) or timm.create_model."))
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--checkpoint", dest="which", default=None, help=WHICH_HELP)
    parser.add_argument("--format", choices=sorted([*FORMATS, "hf"]), default="safetensors",
                        help="hf: a timm / Hugging Face Hub folder (config.json + model.safetensors + README.md)")
    parser.add_argument("--out", default="", help="output file (default: <run>/exports/<checkpoint><ext>; "
                                                  "hf: a folder, default <run>/exports/<checkpoint>-hf)")
    parser.add_argument("--push-to-hub", metavar="REPO", default="",
                        help="with --format hf: also upload to this Hub repository (needs HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    args = parser.parse_args(argv)
    if args.format == "hf" or args.push_to_hub:
        from launcher.inference.hub import export_hf_command

        try:
            checkpoint = resolve_checkpoint(args.checkpoint, args.which)
        except (FileNotFoundError, ValueError) as error:
            print(f"launcher export: {error}", file=sys.stderr)
            return 2
        return export_hf_command(str(checkpoint), args.format, args.out or None, push_to_hub=args.push_to_hub,
                                 private=args.private)
    try:
        result = export_checkpoint(resolve_checkpoint(args.checkpoint, args.which), args.format, args.out or None)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"launcher export: {error}", file=sys.stderr)
        return 2
    print(f"exported {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB) + {result.metadata_path.name}; "
          f"verified with {result.verified_with}: max |logit difference| {result.max_abs_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
