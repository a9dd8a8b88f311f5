"""Pretrained weights for the ResNets: torchvision names, timm names, local files, offline runs.

Named weights (see :mod:`launcher.models.sources`) load through the libraries' own code paths
(torchvision ``Weights.get_state_dict`` from ``$TORCH_HOME/hub/checkpoints``, timm ``load_pretrained``
from the Hugging Face cache), so files already in those caches load without network - which is what
``launcher weights fetch`` prepares on a login node. With ``HF_HUB_OFFLINE=1``, or when the download
host is unreachable, nothing is downloaded: a missing file raises :class:`WeightsUnavailableError`,
one line naming the fetch command and the cache path. Every source ends in
:func:`load_pretrained_state_dict`: the classifier is dropped when its shape differs from the
model's, everything else must match exactly.
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
from torch import nn

from launcher.models.registry import RESNET_NAMES, unwrap_model
from launcher.models.sources import (
    WeightsSource,
    WeightsUnavailableError,
    offline_requested,
    parse_weights_spec,
    torchvision_weights,
)

__all__ = [
    "WeightsUnavailableError",
    "load_pretrained_state_dict",
    "load_weights_file",
    "resolve_weights",
]

log = logging.getLogger(__name__)

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


def resolve_weights(name: str, spec: str | os.PathLike, *,
                    offline: bool | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """Turn a weights spec into ``(description, state_dict)`` (see :func:`create_resnet`).

    ``offline`` (default: ``HF_HUB_OFFLINE``) reads the caches only.
    """
    spec_str = os.fspath(spec)
    if os.path.isfile(spec_str) or _looks_like_file(spec_str):
        path = Path(spec_str).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        return str(path), load_weights_file(path)
    source = parse_weights_spec(spec_str, name)
    offline = offline_requested() if offline is None else offline
    if source.library == "torchvision":
        return _torchvision_state_dict(source, offline)
    return _timm_state_dict(source, offline)


def _unreachable(source: WeightsSource, offline: bool) -> str | None:
    """Why no download should be tried, or None. Checked before downloading so an offline compute node
    fails in seconds instead of waiting for connection time-outs."""
    if offline:
        return "downloads are off (HF_HUB_OFFLINE=1)"
    from huggingface_hub import constants as hf_constants

    url = f"{hf_constants.ENDPOINT}/{source.hf_repo}" if source.hf_repo else source.url
    if url and not _host_reachable(url):
        return f"this machine is offline ({urlparse(url).hostname} unreachable)"
    return None


def _torchvision_state_dict(source: WeightsSource, offline: bool) -> tuple[str, dict[str, torch.Tensor]]:
    weights = torchvision_weights(source)
    if source.cached_file() is None and (reason := _unreachable(source, offline)):
        raise WeightsUnavailableError(source, reason)
    try:  # the cached file, or torch.hub's download (with its hash check) into the same place
        state_dict = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError/HTTPError/socket errors are OSErrors
        raise WeightsUnavailableError(source, f"the download failed ({type(exc).__name__}: {exc})") from exc
    return f"torchvision {type(weights).__name__}.{weights.name}", state_dict


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


def _timm_state_dict(source: WeightsSource, offline: bool) -> tuple[str, dict[str, torch.Tensor]]:
    cfg_dict = timm.models.get_pretrained_cfg(source.name).to_dict()
    cached = source.cached_file()
    if cached is not None:  # timm's own file path: no hub call at all
        cfg_dict = {**cfg_dict, "file": str(cached), "hf_hub_id": None, "source": ""}
    elif reason := _unreachable(source, offline):
        raise WeightsUnavailableError(source, reason)
    captured: dict[str, torch.Tensor] = {}

    def capture(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        captured.update(state_dict)
        return state_dict

    # timm's load_pretrained does the download (hub or URL, hash checks); we take the state_dict it
    # fetched and load it ourselves so head replacement and strictness are the same for every source.
    probe = timm.create_model(source.arch, pretrained=False)
    try:
        timm.models.load_pretrained(probe, pretrained_cfg=cfg_dict, num_classes=probe.num_classes,
                                    filter_fn=capture, strict=False)
    except OSError as exc:  # HF LocalEntryNotFoundError, requests ConnectionError, URLError
        raise WeightsUnavailableError(source, f"the download failed ({type(exc).__name__}: {exc})") from exc
    return f"timm {source.name}", captured


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
