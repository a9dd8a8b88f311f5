"""`launcher export RUN --format hf`: a timm / Hugging Face Hub folder that timm loads with the trained weights.

The upload is tested up to the Hub API: timm's own ``push_to_hf_hub`` runs, with its ``HfApi`` replaced
by a recorder (no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import timm
import timm.models._hub as timm_hub
import torch
import yaml
from test_export import make_checkpoint

from launcher.inference.evaluate import load_model
from launcher.inference.export import main
from launcher.inference.hub import export_hf

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as training leaves it: best.pt (with its metrics), config.yaml, summary.json."""
    run = tmp_path_factory.mktemp("hf") / "finetune-insects"
    (run / "checkpoints").mkdir(parents=True)
    best = make_checkpoint(run / "checkpoints" / "best.pt", classes=tuple(CLASSES))
    state = torch.load(best, weights_only=True)
    state["metrics"] = {"top1": 87.5, "top5": 100.0, "loss": 0.3125}
    state["config"].update(data="/data/insects", pretrained="resnet18.a1_in1k", recipe="finetune", epochs=6)
    torch.save(state, best)
    (run / "config.yaml").write_text(yaml.safe_dump(state["config"]))
    (run / "summary.json").write_text(json.dumps({"best_top1": 87.5, "final_top1": 85.0, "final_top5": 100.0,
                                                  "img_per_s": 123.4, "world_size": 1, "device": "cpu"}))
    return run


def test_hf_folder_loads_in_timm_with_trained_logits_and_labels(run_folder: Path) -> None:
    result = export_hf(run_folder)
    folder = run_folder / "exports" / "best-hf"
    assert result.folder == folder and result.checkpoint == run_folder / "checkpoints" / "best.pt"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert model.num_classes == 3 and model.pretrained_cfg["label_names"] == CLASSES
    reference = load_model(run_folder / "checkpoints" / "best.pt", device="cpu")
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    expected = reference.logits(x)
    assert expected.std() > 0.1  # trained-looking weights, not a zero head
    with torch.no_grad():
        torch.testing.assert_close(model(reference.normalize(x)), expected, atol=1e-4, rtol=1e-4)
    # the preprocessing timm derives from the folder is the run's evaluation preprocessing
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 64, 64) and data_cfg["crop_pct"] == 0.9
    assert data_cfg["interpolation"] == "bicubic"

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["label_names"] == CLASSES
    assert "a1_in1k" not in json.dumps(config["pretrained_cfg"])  # timm's ImageNet description is gone
    readme = (folder / "README.md").read_text()
    assert readme.startswith("---\n") and "library_name: timm" in readme and "license: other" in readme
    for text in ("  - validation top-1 (these weights): 87.50 %", "  - best validation top-1 of the run: 87.50 %",
                 "  - training throughput: 123 img/s on 1 x cpu", "**Initial weights:** resnet18.a1_in1k",
                 "**Classes:** 3: ant, bee, cat", "  - checkpoint: best.pt, step 10",
                 'timm.create_model("local-dir:'):
        assert text in readme, text


def test_export_command_writes_folder_for_a_checkpoint(run_folder: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "insects-hf"
    assert main([str(run_folder / "checkpoints" / "best.pt"), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported {out}/ (README.md, config.json, model.safetensors)" in printed
    assert "max |logit difference|" in printed and (out / "model.safetensors").is_file()


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi inside timm's push_to_hf_hub."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token: str | None = None, **kwargs: object) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs: object) -> object:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def file_exists(self, **kwargs: object) -> bool:
        return False

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: object) -> object:
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc123"})()


def test_push_to_hub_uploads_the_same_folder_through_timm(run_folder: Path, tmp_path: Path, monkeypatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    RecordingHfApi.calls = []
    monkeypatch.setattr(timm_hub, "HfApi", RecordingHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "pushed"
    assert main([str(run_folder), "--format", "hf", "--out", str(out), "--push-to-hub", "someone/insects",
                 "--private"]) == 0
    assert "pushed to the Hugging Face Hub: https://huggingface.co/someone/insects/commit/abc123" in \
        capsys.readouterr().out
    kinds = [kind for kind, _ in RecordingHfApi.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert RecordingHfApi.calls[0][1]["token"] is None  # huggingface_hub reads HF_TOKEN itself
    assert RecordingHfApi.calls[1][1]["private"] is True
    uploaded = RecordingHfApi.calls[2][1]["files"]
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config.json"] == (out / "config.json").read_bytes()
    assert uploaded["README.md"] == (out / "README.md").read_bytes()
    assert b'timm.create_model("hf-hub:someone/insects", pretrained=True)' in uploaded["README.md"]


def test_push_without_credentials_or_with_another_format_is_refused(run_folder: Path, tmp_path: Path,
                                                                    monkeypatch, capsys) -> None:
    RecordingHfApi.calls = []
    monkeypatch.setattr(timm_hub, "HfApi", RecordingHfApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    out = tmp_path / "never"
    assert main([str(run_folder), "--format", "hf", "--out", str(out), "--push-to-hub", "someone/insects"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--push-to-hub needs Hugging Face credentials: set HF_TOKEN" in error
    assert RecordingHfApi.calls == [] and not out.exists()
    assert main([str(run_folder), "--format", "onnx", "--push-to-hub", "someone/insects"]) == 2
    assert "--push-to-hub uploads a --format hf folder, not onnx" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--format", "hf"]) == 2
    assert "missing is neither a checkpoint file nor a run folder" in capsys.readouterr().err
