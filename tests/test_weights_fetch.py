"""`launcher weights fetch` fills the caches an offline run reads; offline runs read them or say what to run.

No network: the two download functions (torch.hub's and huggingface_hub's) are replaced by copies of a
local file - the Hugging Face one writes the hub's real cache layout (blobs/, snapshots/, refs/) - and
sockets are refused, so any other download attempt fails the test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from launcher.models.fetch import main
from launcher.models.pretrained import WeightsUnavailableError
from launcher.models.resnet import create_resnet
from launcher.models.sources import parse_weights_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, object]:
    """Empty torch / Hugging Face caches, sockets refused (each attempt counted)."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise socket.gaierror(-2, "Name or service not known (network blocked by test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return {"root": tmp_path, "attempts": attempts}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state_dict with non-trivial values (stands in for the ImageNet weights)."""
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def assert_backbone(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, expected[key]), key


def fake_hub_download(source_file: Path, calls: list[tuple[str, str]]):
    """hf_hub_download that 'downloads' ``source_file`` into the hub's cache layout."""

    def download(repo_id: str, filename: str, *, cache_dir: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        commit = "c0ffee" * 6 + "beef"
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        blob = repo / "blobs" / hashlib.sha256(source_file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_file, blob)
        snapshot = repo / "snapshots" / commit / filename
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return str(snapshot)

    return download


def test_names_resolve_to_one_source() -> None:
    tv = parse_weights_spec("resnet50.IMAGENET1K_V2")
    assert (tv.library, tv.arch, tv.name) == ("torchvision", "resnet50", "resnet50.IMAGENET1K_V2")
    for spec, model in (("IMAGENET1K_V2", "resnet50"), ("DEFAULT", "resnet50"), ("ResNet50_Weights.DEFAULT", None),
                        ("imagenet1k_v2", "resnet50"), ("resnet50.DEFAULT", None)):
        assert parse_weights_spec(spec, model) == tv, spec
    timm_source = parse_weights_spec("a1_in1k", "resnet50")
    assert timm_source == parse_weights_spec("resnet50.a1_in1k")
    assert (timm_source.library, timm_source.hf_repo) == ("timm", "timm/resnet50.a1_in1k")
    with pytest.raises(ValueError, match="do not name the model.*--model"):
        parse_weights_spec("IMAGENET1K_V2")
    with pytest.raises(ValueError, match="another architecture than resnet18"):
        parse_weights_spec("resnet50.a1_in1k", "resnet18")


def test_fetch_torchvision_then_offline_run_reads_it(caches, weights, monkeypatch, capsys, tmp_path) -> None:
    source_file = tmp_path / "download.pth"
    torch.save(weights, source_file)
    calls: list[tuple[str, str, str | None]] = []

    def download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, dst, hash_prefix))
        shutil.copyfile(source_file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert main(["fetch", "resnet18.IMAGENET1K_V1", "--quiet"]) == 0
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    out = capsys.readouterr().out
    assert f"resnet18.IMAGENET1K_V1: downloaded to {cached}" in out and "loads offline" in out
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert calls == [(url, str(cached), "f37072fd")]  # torch.hub checks the sha256 prefix of the name

    # the same weights under another spelling are already there
    assert main(["fetch", "DEFAULT", "--model", "resnet18", "--quiet"]) == 0
    assert f"already cached at {cached}" in capsys.readouterr().out and len(calls) == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        assert_backbone(create_resnet("resnet18", 4, pretrained=spec), weights)
    assert caches["attempts"] == []


def test_fetch_timm_into_hub_cache_then_offline_run_reads_it(caches, weights, monkeypatch, capsys,
                                                              tmp_path) -> None:
    source_file = tmp_path / "model.safetensors"
    save_file(weights, str(source_file))
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub_download(source_file, calls))
    assert main(["fetch", "a1_in1k", "--model", "resnet18"]) == 0
    assert calls == [("timm/resnet18.a1_in1k", "model.safetensors")]
    snapshot = next((tmp_path / "hf_cache" / "models--timm--resnet18.a1_in1k" / "snapshots").glob("*/model.safetensors"))
    assert f"resnet18.a1_in1k: downloaded to {snapshot}" in capsys.readouterr().out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_resnet("resnet18", 3, pretrained="resnet18.a1_in1k")
    assert_backbone(model, weights)
    assert model.fc.out_features == 3 and caches["attempts"] == []


def test_offline_run_without_cache_names_the_fetch_command(caches, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = caches["root"]
    with pytest.raises(WeightsUnavailableError) as timm_error:
        create_resnet("resnet50", 5, pretrained="resnet50.a1_in1k")
    message = str(timm_error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message
    assert "run `launcher weights fetch resnet50.a1_in1k` on a machine with internet" in message
    assert f"this run reads {root / 'hf_cache' / 'models--timm--resnet50.a1_in1k'}" in message
    with pytest.raises(WeightsUnavailableError) as tv_error:
        create_resnet("resnet18", 5, pretrained="DEFAULT")
    message = str(tv_error.value)
    assert "`launcher weights fetch resnet18.IMAGENET1K_V1`" in message
    assert f"this run reads {root / 'torch_home' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'}" in message
    assert caches["attempts"] == []  # HF_HUB_OFFLINE: not even a connection test


def test_fetch_refuses_bad_names_and_offline_mode(caches, monkeypatch, capsys) -> None:
    assert main(["fetch", "resnet18.nonsense"]) == 2
    assert "unknown pretrained weights 'resnet18.nonsense'" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "resnet18.a1_in1k"]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_on_an_offline_node_fails_with_one_line(tmp_path: Path) -> None:
    """The real command in a fresh process, with the environment a compute node has."""
    from launcher.data.sample_data import make_digits_tree

    make_digits_tree(tmp_path / "imgs", size=16, per_class=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "TORCH_HOME": str(tmp_path / "torch_home"), "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "finetune", str(tmp_path / "imgs"), "--model", "resnet18.a1_in1k",
         "--epochs", "1", "--img-size", "32", "--workers", "0", "--output", str(tmp_path / "run"), "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("launcher finetune: pretrained weights resnet18.a1_in1k are not in the timm cache")
    assert "`launcher weights fetch resnet18.a1_in1k`" in last
    assert str(tmp_path / "hf_home" / "hub" / "models--timm--resnet18.a1_in1k") in last


def test_train_command_offline_fails_with_one_line(caches, monkeypatch, tmp_path, capsys) -> None:
    from launcher.data.sample_data import make_digits_tree
    from launcher.train.command import main as train_main

    make_digits_tree(tmp_path / "imgs", size=16, per_class=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    code = train_main(["--data", str(tmp_path / "imgs"), "--model", "resnet18", "--pretrained", "IMAGENET1K_V1",
                       "--img-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--global-batch", "8",
                       "--workers", "0", "--output", str(tmp_path / "run"), "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error[-1].startswith("error: pretrained weights resnet18.IMAGENET1K_V1 are not in")
    assert "`launcher weights fetch resnet18.IMAGENET1K_V1`" in error[-1] and "--pretrained" in error[-1]
    assert caches["attempts"] == []
