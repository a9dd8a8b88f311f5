"""Pretrained weights for the ResNets: torchvision names, timm names, local files, offline errors.

Downloads go through the libraries' own code paths (torchvision ``Weights.get_state_dict`` into
``$TORCH_HOME/hub/checkpoints``, timm ``load_pretrained`` from the Hugging Face hub into
``$HF_HUB_CACHE``), so files already in those caches load without network. Without network and
without a cached file a :class:`WeightsUnavailableError` says how to supply a local file.
Every source ends in :func:`load_pretrained_state_dict`: the classifier is dropped when its shape
differs from the model's, everything else must match exactly.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn

from launcher.models.registry import RESNET_NAMES, unwrap_model

__all__ = [
    "WeightsUnavailableError",
    "load_pretrained_state_dict",
    "load_weights_file",
    "resolve_weights",
]

log = logging.getLogger(__name__)

class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (usually: no network). The message says what to do."""

    def __init__(self, reason: str, *, url: str | None, cache_file: str | None, hf_repo: str | None = None):
        self.url = url
        lines = [reason, "Supply the weights as a local file instead:",
                 "  --weights /path/to/file.pth   (a state_dict or a checkpoint with 'model'/'state_dict'; "
                 ".pth, .pt, .bin or .safetensors; torchvision or timm key names)"]
        if url:
            lines.append(f"  the file can be fetched on a machine with internet from {url}")
        if cache_file:
            lines.append(f"  or copy it to the torchvision cache: {cache_file} (TORCH_HOME={_torch_home()})")
        if hf_repo:
            lines.append(f"  or fill the Hugging Face cache (HF_HUB_CACHE={_hf_cache()}) with "
                         f"`huggingface-cli download {hf_repo}` on a connected machine and copy it over")
        super().__init__("\n".join(lines))


def _torch_home() -> str:
    return str(Path(torch.hub.get_dir()).parent)


def _hf_cache() -> str:
    from huggingface_hub import constants as hf_constants

    return str(hf_constants.HF_HUB_CACHE)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a .safetensors file or a torch file (plain, or a checkpoint dict).

    Checkpoints are unpacked from "model", "state_dict", "model_state_dict" or "module" entries
    (EMA weights are not chosen silently); DDP "module." and torch.compile "_orig_mod." prefixes are
    stripped. torch files are read with ``weights_only=True``.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} holds no state_dict (expected name -> tensor, or a checkpoint "
                         f"dict with 'model' or 'state_dict')")
    state = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _looks_like_file(spec: str) -> bool:
    suffixes = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")
    return os.sep in spec or "/" in spec or spec.startswith(".") or spec.lower().endswith(suffixes)


def resolve_weights(name: str, spec: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """Turn a weights spec into ``(description, state_dict)`` (see :func:`create_resnet`)."""
    spec_str = os.fspath(spec)
    if os.path.isfile(spec_str) or _looks_like_file(spec_str):
        path = Path(spec_str).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        return str(path), load_weights_file(path)
    tv_members = torchvision.models.get_model_weights(name).__members__
    if "_Weights." in spec_str or spec_str.isupper() or spec_str.upper() in tv_members:
        return _torchvision_state_dict(name, spec_str)
    return _timm_state_dict(name, spec_str)


def _torchvision_state_dict(name: str, spec: str) -> tuple[str, dict[str, torch.Tensor]]:
    enum = torchvision.models.get_model_weights(name)
    if "." in spec:
        enum_name, _, member = spec.partition(".")
        if enum_name != enum.__name__:
            raise ValueError(f"weights {spec!r} are for another architecture than {name} (expected "
                             f"{enum.__name__}.<name>)")
    else:
        member = spec.upper()
    try:
        weights = enum[member]
    except KeyError:
        choices = ", ".join([*enum.__members__])
        raise ValueError(f"unknown torchvision weights {spec!r} for {name}; available: {choices}") from None
    url = weights.url
    try:
        state_dict = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError/HTTPError/socket errors are OSErrors
        cache_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        raise WeightsUnavailableError(
            f"could not download torchvision weights {enum.__name__}.{weights.name} for {name} "
            f"({type(exc).__name__}: {exc}).",
            url=url, cache_file=str(cache_file),
        ) from exc
    return f"torchvision {enum.__name__}.{weights.name}", state_dict


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine fails in seconds instead of retrying for a minute."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let the real download try
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_state_dict(name: str, spec: str) -> tuple[str, dict[str, torch.Tensor]]:
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import try_to_load_from_cache

    full = spec if spec.startswith(f"{name}.") or spec == name else f"{name}.{spec}"
    arch = full.partition(".")[0]
    if arch != name:
        raise ValueError(f"timm weights {spec!r} are for {arch}, not {name}")
    try:
        cfg = timm.models.get_pretrained_cfg(full)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{name}.*")]
        raise ValueError(
            f"unknown pretrained weights {spec!r} for {name}: not a local file, not a torchvision weights "
            f"name, not a timm tag. timm tags: {', '.join(tags)}; torchvision: "
            f"{', '.join(torchvision.models.get_model_weights(name).__members__)}"
        )
    tag = f"{name}.{cfg.tag}" if cfg.tag else name
    cfg_dict = cfg.to_dict()
    # A file already in the Hugging Face cache loads offline through timm's own file path.
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                cfg_dict = {**cfg_dict, "file": cached, "hf_hub_id": None, "source": ""}
                break
    elif cfg.url:  # weights only on a URL: timm caches them like torch.hub does
        cached_url = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if cached_url.is_file():
            cfg_dict = {**cfg_dict, "file": str(cached_url)}
    hub_url = f"{hf_constants.ENDPOINT}/{cfg.hf_hub_id}/resolve/main/model.safetensors" if cfg.hf_hub_id else None
    url = hub_url or cfg.url
    if not cfg_dict.get("file"):
        offline = hf_constants.HF_HUB_OFFLINE or not _host_reachable(url)
        if offline:
            raise WeightsUnavailableError(
                f"could not download timm weights {tag} for {name} (no network: {url} unreachable).",
                url=url, cache_file=None, hf_repo=cfg.hf_hub_id,
            )
    captured: dict[str, torch.Tensor] = {}

    def capture(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        captured.update(state_dict)
        return state_dict

    # timm's load_pretrained does the download (hub or URL, hash checks); we take the state_dict it
    # fetched and load it ourselves so head replacement and strictness are the same for every source.
    probe = timm.create_model(name, pretrained=False)
    try:
        timm.models.load_pretrained(probe, pretrained_cfg=cfg_dict, num_classes=probe.num_classes,
                                    filter_fn=capture, strict=False)
    except OSError as exc:  # HF LocalEntryNotFoundError, requests ConnectionError, URLError
        raise WeightsUnavailableError(
            f"could not download timm weights {tag} for {name} ({type(exc).__name__}: {exc}).",
            url=url, cache_file=None, hf_repo=cfg.hf_hub_id,
        ) from exc
    return f"timm {tag}", captured


def load_pretrained_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``model``: classifier dropped if its shape differs, otherwise strict."""
    target = unwrap_model(model)
    own = target.state_dict()
    state = dict(state_dict)
    dropped_head = False
    for key in ("fc.weight", "fc.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            del state[key]
            dropped_head = True
    hint = _architecture_hint(state, target)
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"pretrained weights {source} do not fit this architecture{hint}: "
            + "; ".join(mismatched[:8]) + (f" ... ({len(mismatched)} tensors)" if len(mismatched) > 8 else "")
        )
    result = target.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (dropped_head and k.startswith("fc."))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"pretrained weights {source} do not match the model{hint}: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {result.unexpected_keys[:20]}"
            f"{' ...' if len(result.unexpected_keys) > 20 else ''}"
        )
    if dropped_head:
        log.info("pretrained classifier dropped (its class count differs); new head for %d classes",
                 own["fc.weight"].shape[0])


def _architecture_hint(state: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """' (they are resnet34 weights)' when the tensors fit another supported depth exactly."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}
    if shapes.items() <= own.items() and set(own) - set(shapes) <= {k for k in own if "num_batches" in k}:
        return ""
    for name in RESNET_NAMES:
        with torch.device("meta"):
            candidate = timm.create_model(name, pretrained=False)
        ref = {k: tuple(v.shape) for k, v in candidate.state_dict().items()
               if not k.startswith("fc.") and "num_batches" not in k}
        if all(shapes.get(k) == v for k, v in ref.items()) and set(shapes) - set(ref) <= {
                k for k in shapes if "num_batches" in k}:
            return f" (they are {name} weights: use --model {name})"
    return ""


# --------------------------------------------------------------------------------------------------
