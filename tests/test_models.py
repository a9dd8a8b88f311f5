"""ResNet factory: RSB model details, pretrained loading (files, caches, offline), frozen stages, export."""

from __future__ import annotations

import copy
import socket

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.layers import DropPath
from torch import nn

from launcher.models.optim import create_loss, create_optimizer
from launcher.models.pretrained import WeightsUnavailableError, load_weights_file
from launcher.models.registry import RESNET_NAMES, unwrap_model
from launcher.models.resnet import (
    FrozenStatsBatchNorm2d,
    FrozenStatsSyncBatchNorm,
    convert_sync_batchnorm,
    create_resnet,
    model_info,
    set_trainable_layers,
)

torch.set_num_threads(2)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """No network at the socket level and empty torchvision / Hugging Face caches."""

    def refuse(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known (network blocked by test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def test_drop_path_is_linear_per_block_from_zero_to_max():
    model = create_resnet("resnet50", 10, drop_path=0.05)
    blocks = _blocks(model)
    assert len(blocks) == 16
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    expected = [0.05 * i / 15 for i in range(16)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05)
    assert all(b.drop_path is None for b in _blocks(create_resnet("resnet18", 10)))


def test_zero_init_last_bn_gamma_in_every_block():
    model = create_resnet("resnet50", 10)
    for block in _blocks(model):
        assert torch.count_nonzero(block.bn3.weight) == 0
        assert torch.count_nonzero(block.bn1.weight) > 0
    basic = create_resnet("resnet18", 10)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in _blocks(basic))
    # A zero-initialised residual branch contributes nothing: each block is relu(shortcut(x)).
    block = basic.layer1[0].eval()
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(block(x), torch.relu(x))
    plain = create_resnet("resnet18", 10, zero_init_last=False)
    assert all(torch.count_nonzero(b.bn2.weight) > 0 for b in _blocks(plain))


def test_state_dict_keys_match_torchvision_for_every_depth():
    for name in RESNET_NAMES:
        with torch.device("meta"):  # structure only, skips the slow weight init
            ours = create_resnet(name, 7).state_dict()
            theirs = getattr(torchvision.models, name)(num_classes=7).state_dict()
        assert list(ours) == list(theirs), name
        assert all(ours[k].shape == theirs[k].shape for k in ours), name


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="resnet18, resnet34"):
        create_resnet("resnet99", 10)
    with pytest.raises(ValueError, match="trainable_layers"):
        create_resnet("resnet18", 10, trainable_layers=7)
    with pytest.raises(ValueError, match="unknown pretrained weights 'nonsense'.*a1_in1k"):
        create_resnet("resnet18", 10, pretrained="nonsense")
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        create_resnet("resnet18", 10, pretrained="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="another architecture"):
        create_resnet("resnet18", 10, pretrained="ResNet50_Weights.IMAGENET1K_V2")


@pytest.fixture(scope="module")
def tv_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BN statistics, so loading them is actually checked
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _assert_backbone_equal(model: nn.Module, reference: nn.Module) -> None:
    ref = reference.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, ref[key]), key


def test_pretrained_file_torchvision_keys_head_replaced(tmp_path, tv_resnet18):
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(tv_resnet18.state_dict(), path)
    model = create_resnet("resnet18", 5, pretrained=str(path))
    _assert_backbone_equal(model, tv_resnet18)
    assert model.fc.weight.shape == (5, 512)
    # Same class count: the head is loaded too and the logits equal torchvision's.
    full = create_resnet("resnet18", 1000, pretrained=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(full(x), tv_resnet18(x), rtol=1e-5, atol=1e-5)


def test_pretrained_checkpoint_dict_with_prefixes_and_safetensors(tmp_path, tv_resnet18):
    wrapped = {f"module._orig_mod.{k}": v for k, v in tv_resnet18.state_dict().items()}
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": wrapped, "epoch": 3, "classes": ["a", "b"]}, ckpt)
    _assert_backbone_equal(create_resnet("resnet18", 3, pretrained=ckpt), tv_resnet18)

    timm_style = tmp_path / "timm_train.pth.tar"
    torch.save({"state_dict": tv_resnet18.state_dict(), "arch": "resnet18"}, timm_style)
    _assert_backbone_equal(create_resnet("resnet18", 3, pretrained=timm_style), tv_resnet18)

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tv_resnet18.state_dict().items()}, str(st))
    model = create_resnet("resnet18", 1000, pretrained=st)
    assert torch.equal(model.fc.weight, tv_resnet18.fc.weight)
    _assert_backbone_equal(model, tv_resnet18)


def test_pretrained_file_errors_name_the_problem(tmp_path, tv_resnet18):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_resnet("resnet18", 5, pretrained=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        create_resnet("resnet18", 5, pretrained=garbage)
    partial = {k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("layer4.1.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layer4\.1\.conv1\.weight'.*unexpected keys \['extra"):
        create_resnet("resnet18", 5, pretrained=tmp_path / "partial.pth")
    torch.save(tv_resnet18.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"they are resnet18 weights: use --model resnet18"):
        create_resnet("resnet34", 5, pretrained=tmp_path / "r18.pth")


def test_offline_download_fails_with_instructions(offline):
    with pytest.raises(WeightsUnavailableError) as tv_err:
        create_resnet("resnet18", 5, pretrained="IMAGENET1K_V1")
    message = str(tv_err.value)
    assert "\n" not in message and "`launcher weights fetch resnet18.IMAGENET1K_V1`" in message
    assert "--weights /path/to/file.pth (launcher train: --pretrained)" in message
    assert "download.pytorch.org" in message
    assert str(offline / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message

    with pytest.raises(WeightsUnavailableError) as timm_err:
        create_resnet("resnet50", 5, pretrained="resnet50.a1_in1k")
    message = str(timm_err.value)
    assert "\n" not in message and "`launcher weights fetch resnet50.a1_in1k`" in message
    assert f"HF_HUB_CACHE={offline / 'hf_cache'}" in message and "huggingface.co unreachable" in message
    assert str(offline / "hf_cache" / "models--timm--resnet50.a1_in1k") in message
    # Nothing else is affected: random init still works.
    assert create_resnet("resnet18", 5).fc.out_features == 5


def test_cached_weights_load_offline_through_library_paths(offline, tv_resnet18):
    # torchvision: a file in $TORCH_HOME/hub/checkpoints is used without any network access.
    cache = offline / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(tv_resnet18.state_dict(), cache / "resnet18-f37072fd.pth")
    for spec in ("IMAGENET1K_V1", "DEFAULT", "imagenet1k_v1", "ResNet18_Weights.IMAGENET1K_V1"):
        _assert_backbone_equal(create_resnet("resnet18", 4, pretrained=spec), tv_resnet18)
    # timm: a snapshot in the Hugging Face cache layout is loaded through timm's load_pretrained.
    repo = offline / "hf_cache" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in tv_resnet18.state_dict().items()}
    save_file(state, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    for spec in ("a1_in1k", "resnet18.a1_in1k"):
        model = create_resnet("resnet18", 4, pretrained=spec)
        _assert_backbone_equal(model, tv_resnet18)
        assert model.fc.out_features == 4


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_stages_stay_bit_identical_while_training(tv_resnet18, tmp_path):
    torch.save(tv_resnet18.state_dict(), tmp_path / "w.pth")
    model = create_resnet("resnet18", 4, pretrained=tmp_path / "w.pth", trainable_layers=2)
    info = model_info(model)
    assert info["trainable_stages"] == ["layer4", "fc"]
    assert info["trainable_params"] == sum(p.numel() for p in (*model.layer4.parameters(), *model.fc.parameters()))
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    layer4_bn_before = _bn_state(model.layer4)
    trainable_before = [p.detach().clone() for p in model.layer4.parameters()]

    optimizer = create_optimizer(model, "adamw", 1e-3, 0.05)
    loss_fn = create_loss("bce", bce_target_thresh=0.2)
    model.train()
    assert not model.bn1.training and not model.layer3[1].bn2.training and model.layer4[0].bn1.training
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 48, 48)
        target = torch.nn.functional.one_hot(torch.randint(0, 4, (4,)), 4).float()
        loss = loss_fn(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    after = model.state_dict()
    for key, value in frozen_before.items():
        assert torch.equal(after[key], value), f"frozen tensor changed: {key}"
    assert all(p.grad is None for p in model.layer3.parameters())
    assert any(not torch.equal(v, _bn_state(model.layer4)[k]) for k, v in layer4_bn_before.items())
    assert all(not torch.equal(a, b) for a, b in zip(trainable_before, model.layer4.parameters()))

    # EMA-style deep copies and re-entering train() keep the freeze; "all" undoes it.
    clone = copy.deepcopy(model).train()
    assert isinstance(clone.layer1[0].bn1, FrozenStatsBatchNorm2d) and not clone.layer1[0].bn1.training
    set_trainable_layers(model, "all")
    assert all(p.requires_grad for p in model.parameters()) and model.layer1[0].bn1.training
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d


@pytest.mark.parametrize("layers, trainable", [(1, ["fc"]), (3, ["layer3", "layer4", "fc"]),
                                                (5, ["layer1", "layer2", "layer3", "layer4", "fc"]),
                                                ("all", ["stem", "layer1", "layer2", "layer3", "layer4", "fc"])])
def test_trainable_layers_mapping(layers, trainable):
    model = create_resnet("resnet18", 3, trainable_layers=layers)
    assert model_info(model)["trainable_stages"] == trainable
    named = dict(model.named_parameters())
    assert named["fc.weight"].requires_grad
    assert named["conv1.weight"].requires_grad == (layers == "all")
    assert named["layer1.0.conv1.weight"].requires_grad == (layers in (5, "all"))


def test_frozen_model_state_dict_exports_to_torchvision_and_timm():
    torch.manual_seed(0)
    model = create_resnet("resnet18", 6, trainable_layers=3)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 40, 40))  # moves the unfrozen BN statistics away from their init
    model.eval()
    state = unwrap_model(model).state_dict()
    x = torch.randn(3, 3, 56, 56)
    tv = torchvision.models.resnet18(num_classes=6).eval()
    tv.load_state_dict(state, strict=True)
    tm = timm.create_model("resnet18", num_classes=6).eval()
    tm.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(tv(x), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tm(x), ours, rtol=1e-5, atol=1e-5)


def test_unwrap_model_and_weights_file_loader(tmp_path):
    model = create_resnet("resnet18", 3)

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    assert unwrap_model(Wrapper(Wrapper(model))) is model
    torch.save({"model": {"module.fc.bias": torch.ones(3)}}, tmp_path / "c.pt")
    assert list(load_weights_file(tmp_path / "c.pt")) == ["fc.bias"]


def test_sync_batchnorm_conversion_keeps_frozen_stages_frozen():
    model = convert_sync_batchnorm(create_resnet("resnet18", 3, trainable_layers=2)).train()
    assert type(model.layer3[0].bn1) is FrozenStatsSyncBatchNorm and not model.layer3[0].bn1.training
    assert type(model.layer4[0].bn1) is nn.SyncBatchNorm and model.layer4[0].bn1.training
    assert list(model.state_dict()) == list(torchvision.models.resnet18(num_classes=3).state_dict())
