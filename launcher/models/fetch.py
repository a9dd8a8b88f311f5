"""`launcher weights fetch NAME...`: put pretrained weights into the caches a run reads, ahead of time.

Compute nodes of most clusters have no internet; login nodes do, and both usually see the same home
or project file system. Run this on the login node with the job's ``TORCH_HOME`` / ``HF_HOME`` (or
``HF_HUB_CACHE``); the job then finds the files without network (set ``HF_HUB_OFFLINE=1`` there so
it never tries). Downloads go through the libraries' own functions into their own cache layouts:
``torch.hub.download_url_to_file`` with torchvision's hash check for torchvision weights,
``huggingface_hub.hf_hub_download`` for timm weights. Each file is then loaded back from the cache,
offline, the way a run loads it, so a fetch that succeeds is a run that finds its weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.models.sources import (
    HF_WEIGHT_FILES,
    WeightsSource,
    hf_hub_cache,
    offline_requested,
    parse_weights_spec,
    torch_hub_checkpoints,
)

__all__ = ["FetchedWeights", "fetch_weights", "main"]


@dataclass
class FetchedWeights:
    source: WeightsSource
    path: Path
    downloaded: bool  # False: it was already cached
    tensors: int


def _download_url(source: WeightsSource, progress: bool) -> tuple[Path, bool]:
    target = source.url_cache_file
    assert target is not None and source.url
    if target.is_file():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    # torchvision file names end in the first hex digits of their sha256; torch.hub checks them on download
    match = torch.hub.HASH_REGEX.search(target.name)
    hash_prefix = match.group(1) if match and source.library == "torchvision" else None
    torch.hub.download_url_to_file(source.url, str(target), hash_prefix, progress=progress)
    return target, True


def _download_hub(source: WeightsSource) -> tuple[Path, bool]:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    assert source.hf_repo
    cached = source.cached_file()
    if cached is not None:
        return cached, False
    for filename in HF_WEIGHT_FILES:  # timm prefers the safetensors file and falls back to the .bin
        try:
            path = huggingface_hub.hf_hub_download(source.hf_repo, filename, cache_dir=str(hf_hub_cache()))
        except EntryNotFoundError:
            continue
        return Path(path), True
    raise ValueError(f"{source.hf_repo} on the Hugging Face hub has none of {', '.join(HF_WEIGHT_FILES)}")


def fetch_weights(source: WeightsSource, *, progress: bool = True) -> FetchedWeights:
    """Download ``source`` into its cache (unless there already) and load it back offline as a run would."""
    from launcher.models.pretrained import resolve_weights

    if offline_requested():
        raise ValueError("HF_HUB_OFFLINE is set: `launcher weights fetch` downloads; run it where the network "
                          "is reachable, without HF_HUB_OFFLINE")
    path, downloaded = _download_hub(source) if source.hf_repo else _download_url(source, progress)
    _, state_dict = resolve_weights(source.arch, source.name, offline=True)
    return FetchedWeights(source, path, downloaded, len(state_dict))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher weights", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrained weights for offline runs: `fetch` downloads them into the caches a run reads "
                    "(TORCH_HOME for torchvision weights, the Hugging Face cache HF_HOME / HF_HUB_CACHE for timm "
                    "weights).",
        epilog="examples:\n"
               "  launcher weights fetch resnet50.IMAGENET1K_V2 resnet50.a1_in1k\n"
               "  launcher weights fetch DEFAULT a1_in1k --model resnet50\n"
               "then, in the job: HF_HUB_OFFLINE=1 with the same TORCH_HOME / HF_HOME")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download weights into the caches a run reads")
    fetch.add_argument("names", nargs="+", metavar="NAME",
                       help="resnet50.IMAGENET1K_V2, ResNet50_Weights.DEFAULT, resnet50.a1_in1k, or a tag "
                            "(IMAGENET1K_V2, DEFAULT, a1_in1k) with --model")
    fetch.add_argument("--model", default=None, help="architecture for names without one (resnet18 ... resnet152)")
    fetch.add_argument("--quiet", action="store_true", help="no download progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sources = [parse_weights_spec(name, args.model) for name in args.names]
    except ValueError as error:
        print(f"launcher weights: {error}", file=sys.stderr)
        return 2
    failed = 0
    for source in sources:
        try:
            fetched = fetch_weights(source, progress=not args.quiet)
        except (OSError, RuntimeError, ValueError) as error:
            print(f"launcher weights: {source.name}: {type(error).__name__}: {error}", file=sys.stderr)
            failed += 1
            continue
        size = fetched.path.stat().st_size / 2**20
        state = "downloaded to" if fetched.downloaded else "already cached at"
        print(f"{source.name}: {state} {fetched.path} ({size:.1f} MiB, {fetched.tensors} tensors, loads offline)")
    print(f"caches: TORCH_HOME={torch_hub_checkpoints().parent.parent} (torchvision), "
          f"HF_HUB_CACHE={hf_hub_cache()} (timm). A job that sees these folders finds the weights offline; "
          f"set HF_HUB_OFFLINE=1 there so it never tries the network.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
