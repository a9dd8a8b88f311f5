"""`launcher export`: each format reproduces the checkpoint's logits; safetensors loads into plain torchvision/timm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_helpers import finetuned_run

from launcher.inference.evaluate import load_model
from launcher.inference.export import export_checkpoint, main
from launcher.models import create_resnet


def make_checkpoint(path: Path, name: str = "resnet18", classes: tuple[str, ...] = ("ant", "bee", "cat")) -> Path:
    """A checkpoint in the engine's format with non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(0)
    model = create_resnet(name, len(classes))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    config = {"model": name, "img_size": 64, "test_img_size": 0, "crop_pct": 0.9, "interpolation": "bicubic",
              "num_classes": len(classes)}
    torch.save({"model": model.state_dict(), "config": config, "classes": list(classes), "epoch": 1, "step": 10},
               path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("export") / "best.pt")


def test_safetensors_loads_into_plain_torchvision_and_timm(checkpoint: Path, tmp_path: Path) -> None:
    import timm
    import torchvision
    from safetensors.torch import load_file

    result = export_checkpoint(checkpoint, "safetensors", tmp_path / "model.safetensors")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    meta = json.loads(result.metadata_path.read_text())
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["model"] == "resnet18" and meta["crop_pct"] == 0.9
    state = load_file(str(result.path))
    reference = load_model(checkpoint, device="cpu")
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    expected = reference.logits(x)
    assert expected.std() > 0.1  # a real signal, not a zero-initialized head
    for plain in (torchvision.models.resnet18(num_classes=3), timm.create_model("resnet18", num_classes=3)):
        plain.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(reference.normalize(x)), expected, atol=1e-4, rtol=1e-4)


def test_torchscript_and_onnx_reproduce_logits(checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    scripted = export_checkpoint(checkpoint, "torchscript", tmp_path / "model.pt")
    reloaded = torch.jit.load(str(scripted.path))
    reference = load_model(checkpoint, device="cpu")
    x = torch.randint(0, 256, (2, 3, 80, 80), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(reference.normalize(x)), reference.logits(x), atol=1e-4, rtol=1e-4)

    exported = export_checkpoint(checkpoint, "onnx", tmp_path / "model.onnx")
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model)
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props["classes"] == ["ant", "bee", "cat"]
    assert exported.verified_with.startswith(("onnxruntime", "onnx.reference"))
    assert exported.max_abs_diff is not None and exported.max_abs_diff <= 1e-4


def test_export_errors(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--format", "tflite"])
    assert main([str(checkpoint), "--out", str(tmp_path / "x.safetensors")]) == 0
    assert "verified with torchvision.models.resnet18" in capsys.readouterr().out


def test_export_takes_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`launcher export RUN`: best.pt by default, exported next to the run; --checkpoint picks another."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    make_checkpoint(run / "checkpoints" / "best.pt")
    assert main([str(run)]) == 0
    assert (run / "exports" / "best.safetensors").is_file()
    meta = json.loads((run / "exports" / "best.safetensors.json").read_text())
    assert meta["source_checkpoint"] == str(run / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert main([str(run), "--checkpoint", "last"]) == 2
    assert f"checkpoint not found: {run / 'checkpoints' / 'last.pt'}: only best.pt is there" in capsys.readouterr().err


@pytest.mark.slow
def test_finetuned_checkpoint_round_trip(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """finetune -> best.pt -> export -> plain torchvision model: same logits on real validation images."""
    import torchvision
    from safetensors.torch import load_file

    from launcher.data.images import read_file_bytes

    output, _, _ = finetuned_run(tmp_path_factory.getbasetemp())
    best = output / "checkpoints" / "best.pt"
    assert main([str(best), "--format", "safetensors"]) == 0
    exported = output / "exports" / "best.safetensors"
    meta = json.loads((output / "exports" / "best.safetensors.json").read_text())
    plain = torchvision.models.resnet18(num_classes=meta["num_classes"])
    plain.load_state_dict(load_file(str(exported)), strict=True)
    reference = load_model(best, device="cpu")
    split_dir = Path(reference.config["data"])
    transform = reference.eval_transform()
    files = sorted((split_dir / "val").rglob("*.png"))[:16]
    images = torch.stack([transform(read_file_bytes(path)) for path in files])
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(reference.normalize(images)), reference.logits(images),
                                   atol=1e-4, rtol=1e-4)
    assert meta["classes"] == reference.classes == [f"digit_{d}" for d in range(5, 10)]
