"""Small real image datasets made on the spot from images shipped with this package or scikit-image / -learn.

Nothing here downloads: the product's demo, its tests and its benchmarks all run offline.

* ``make_digits_tree``: 1,797 handwritten digit scans (8x8, 10 classes), upscaled to RGB images of a
  chosen size. Small, real and learnable in seconds on a CPU. The scans ship with this package
  (``digits.csv.gz``, 57 KB, a byte-for-byte copy of scikit-learn's ``sklearn/datasets/data/digits.csv.gz``:
  the test set of E. Alpaydin and C. Kaynak's "Optical Recognition of Handwritten Digits", UCI Machine
  Learning Repository, 1998, CC BY 4.0), so ``launcher demo`` needs no scikit-learn.
* ``make_photo_tree``: photo-like JPEGs (~500x375, ~100 KB) cut from the colour photos that
  scikit-image and scikit-learn ship, one class per source photo. Realistic decode cost for
  benchmarks, and still learnable (each class is a different scene).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_CLASSES = [f"digit_{i}" for i in range(10)]
DIGITS_FILE = "digits.csv.gz"


@dataclass(frozen=True)
class TreeSummary:
    root: Path
    classes: list[str]
    num_images: int


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digit scans as (images float64 [1797, 8, 8] with values 0..16, labels int [1797]).

    The same arrays as ``sklearn.datasets.load_digits()``'s ``images`` and ``target``.
    """
    with resources.files("launcher.data").joinpath(DIGITS_FILE).open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def make_digits_tree(
    root: str | Path,
    *,
    size: int = 32,
    per_class: int | None = None,
    image_format: str = "png",
    seed: int = 0,
) -> TreeSummary:
    """Write the digit scans as ``root/digit_<k>/<index>.<image_format>`` (RGB, ``size`` px)."""
    images, targets = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    counts = dict.fromkeys(range(10), 0)
    order = rng.permutation(len(images))
    written = 0
    for index in order:
        label = int(targets[index])
        if per_class is not None and counts[label] >= per_class:
            continue
        counts[label] += 1
        gray = (images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        folder = root / DIGIT_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.{image_format}"
        if image_format in ("jpg", "jpeg"):
            image.save(path, quality=95)
        else:
            image.save(path)
        written += 1
    return TreeSummary(root, list(DIGIT_CLASSES), written)


def source_photos() -> dict[str, np.ndarray]:
    """The colour photos shipped inside scikit-image and scikit-learn (no download), by name."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket",
                                                        "hubble_deep_field", "immunohistochemistry")}
    china, flower = load_sample_images().images
    photos["china"] = china
    photos["flower"] = flower
    return {name: np.ascontiguousarray(image[..., :3]) for name, image in photos.items()}


def make_photo_tree(
    root: str | Path,
    *,
    per_class: int = 50,
    num_classes: int = 8,
    size: tuple[int, int] = (500, 375),
    quality: int = 95,
    seed: int = 0,
) -> TreeSummary:
    """Write ``per_class`` photo-like JPEGs per source photo as ``root/<photo>/<n>.jpg``.

    Each image is a random crop (30-100 % of the source side) of one source photo, resized to
    ``size`` (width, height) with random jitter of +-10 %, random flip and a mild colour shift, so
    files differ in content, size and compressed length like real photos do.
    """
    rng = np.random.default_rng(seed)
    photos = source_photos()
    names = sorted(photos)[:num_classes]
    if len(names) < num_classes:
        raise ValueError(f"only {len(names)} source photos are shipped; asked for {num_classes} classes")
    root = Path(root)
    written = 0
    for name in names:
        photo = photos[name]
        height, width = photo.shape[:2]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            frac = rng.uniform(0.3, 1.0)
            crop_h, crop_w = max(16, int(height * frac)), max(16, int(width * frac))
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            crop = photo[top:top + crop_h, left:left + crop_w].astype(np.float32)
            crop = crop * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-12, 12)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out_w = int(size[0] * rng.uniform(0.9, 1.1))
            out_h = int(size[1] * rng.uniform(0.9, 1.1))
            image = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((out_w, out_h),
                                                                             Image.Resampling.BICUBIC)
            image.save(folder / f"{name}_{n:05d}.jpg", quality=quality)
            written += 1
    return TreeSummary(root, names, written)
