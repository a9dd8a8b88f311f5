"""Where named pretrained weights come from and which cache file a run reads them from.

One name -> one :class:`WeightsSource`, shared by the loader (:mod:`launcher.models.pretrained`) and
``launcher weights fetch`` (:mod:`launcher.models.fetch`), so the file the fetch writes is exactly
the file a run looks for:

* torchvision weights (``resnet50.IMAGENET1K_V2``, ``IMAGENET1K_V2`` with a model, ``DEFAULT``,
  ``ResNet50_Weights.IMAGENET1K_V2``) live in ``$TORCH_HOME/hub/checkpoints/<file>``, where
  ``torch.hub.load_state_dict_from_url`` keeps them;
* timm weights (``resnet50.a1_in1k``, or the tag ``a1_in1k`` with a model) live in the Hugging Face
  cache (``$HF_HUB_CACHE``, by default ``$HF_HOME/hub``) as ``models--timm--<name>/snapshots/...``,
  where ``huggingface_hub.hf_hub_download`` keeps them; the few timm weights that exist only as a
  URL are kept like torchvision's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision

from launcher.models.registry import RESNET_NAMES

__all__ = ["WeightsSource", "WeightsUnavailableError", "hf_hub_cache", "offline_requested", "parse_weights_spec"]

# The Hugging Face hub file names timm reads, in the order it prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE=1`` (read now, not at import): use the caches only, never try the network."""
    from huggingface_hub import constants as hf_constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(hf_constants.HF_HUB_OFFLINE) or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_hub_cache() -> Path:
    from huggingface_hub import constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class WeightsSource:
    """Named pretrained weights: ``name`` is the exact argument of ``launcher weights fetch``."""

    arch: str
    library: str  # "torchvision" or "timm"
    name: str
    url: str | None
    hf_repo: str | None = None

    @property
    def fetch_command(self) -> str:
        return f"launcher weights fetch {self.name}"

    @property
    def url_cache_file(self) -> Path | None:
        """The torch.hub cache file of a URL download (torchvision, timm URL-only weights)."""
        return torch_hub_checkpoints() / os.path.basename(urlparse(self.url).path) if self.url else None

    @property
    def cache_location(self) -> Path:
        """What a run reads: the torch.hub file, or the model's folder in the Hugging Face cache."""
        if self.hf_repo:
            return hf_hub_cache() / f"models--{self.hf_repo.replace('/', '--')}"
        assert self.url_cache_file is not None
        return self.url_cache_file

    @property
    def cache_variable(self) -> str:
        if self.hf_repo:
            return f"HF_HUB_CACHE={hf_hub_cache()}"
        return f"TORCH_HOME={Path(torch.hub.get_dir()).parent}"

    def cached_file(self) -> Path | None:
        """The cached weights file if it is there (no network)."""
        if self.hf_repo:
            from huggingface_hub import try_to_load_from_cache

            for filename in HF_WEIGHT_FILES:
                found = try_to_load_from_cache(self.hf_repo, filename, cache_dir=str(hf_hub_cache()))
                if isinstance(found, str):
                    return Path(found)
            return None
        path = self.url_cache_file
        return path if path is not None and path.is_file() else None


class WeightsUnavailableError(ValueError):
    """Named weights are not cached and cannot be downloaded here. One line: what to run, and where."""

    def __init__(self, source: WeightsSource, reason: str):
        self.source = source
        self.url = source.url
        alternative = ("a local file: --weights /path/to/file.pth (launcher train: --pretrained)"
                       + (f", e.g. a download of {source.url}" if source.url else ""))
        super().__init__(
            f"pretrained weights {source.name} are not in the {source.library} cache and {reason}: run "
            f"`{source.fetch_command}` on a machine with internet and the same cache ({source.cache_variable}), "
            f"then rerun; this run reads {source.cache_location}. Or pass {alternative}"
        )


def _torchvision_enum(arch: str) -> type:
    return torchvision.models.get_model_weights(arch)


def _arch_of_enum(enum_name: str) -> str | None:
    return next((arch for arch in RESNET_NAMES if _torchvision_enum(arch).__name__ == enum_name), None)


def parse_weights_spec(spec: str, model: str | None = None) -> WeightsSource:
    """A weights name -> its source. ``model`` is the architecture when ``spec`` does not name one.

    Accepted: ``resnet50.IMAGENET1K_V2``, ``ResNet50_Weights.IMAGENET1K_V2``, ``IMAGENET1K_V2`` /
    ``DEFAULT`` (torchvision, with ``model``), ``resnet50.a1_in1k``, ``a1_in1k`` (timm, with ``model``),
    ``resnet50`` (timm's default weights for it). Raises ValueError naming the choices otherwise.
    """
    spec = spec.strip()
    head, dot, tail = spec.partition(".")
    arch, rest = model, spec
    if dot and head.endswith("_Weights"):
        arch = _arch_of_enum(head)
        if arch is None:
            raise ValueError(f"unknown torchvision weights {spec!r}: not one of the ResNets {', '.join(RESNET_NAMES)}")
        rest = tail
    elif head in RESNET_NAMES:
        arch, rest = head, tail
    if arch is None:
        raise ValueError(f"weights {spec!r} do not name the model: use e.g. resnet50.{spec} or --model resnet50")
    if arch not in RESNET_NAMES:
        raise ValueError(f"model {arch!r} is not supported; choose one of {', '.join(RESNET_NAMES)}")
    if model and model.split(".")[0] != arch:
        raise ValueError(f"weights {spec!r} are for another architecture than {model} (they are {arch} "
                          f"weights: use --model {arch})")
    enum = _torchvision_enum(arch)
    if rest and (rest.isupper() or rest.upper() in enum.__members__ or head.endswith("_Weights")):
        try:
            weights = enum[rest.upper()]
        except KeyError:
            raise ValueError(f"unknown torchvision weights {spec!r} for {arch}; available: "
                              f"{', '.join(enum.__members__)}") from None
        return WeightsSource(arch, "torchvision", f"{arch}.{weights.name}", weights.url)
    full = f"{arch}.{rest}" if rest else arch
    try:
        cfg = timm.models.get_pretrained_cfg(full)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(
            f"unknown pretrained weights {spec!r} for {arch}: not a local file, not a torchvision weights name, "
            f"not a timm tag. timm tags: {', '.join(tags)}; torchvision: {', '.join(enum.__members__)}")
    return WeightsSource(arch, "timm", f"{arch}.{cfg.tag}" if cfg.tag else arch, cfg.url, cfg.hf_hub_id or None)


def torchvision_weights(source: WeightsSource) -> torchvision.models.WeightsEnum:
    return _torchvision_enum(source.arch)[source.name.partition(".")[2]]
