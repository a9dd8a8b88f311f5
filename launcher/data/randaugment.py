"""timm's RandAugment / AutoAugment on planar uint8 arrays: timm's own random draws, cheaper pixel ops.

Every random decision stays timm's code: :class:`ArrayAugment` copies timm's ``AugmentOp`` objects and
swaps only their pixel function (``aug_fn``). ``RandAugment.__call__`` (op choice), ``AugmentOp.__call__``
(application probability, magnitude noise and clipping) and the level functions (the "increasing"
variants, the random sign) run unchanged, on the same global RNGs in the same order. Fill colour and
interpolation come from the op's own ``kwargs``; a tuple of interpolations (timm's "random") is drawn
with ``random.choice`` exactly where timm draws it.

Images are planar ``(3, H, W)`` uint8 arrays, so each op works on whole contiguous planes.

* Colour ops reproduce Pillow's C code bit for bit: integer formulas (invert, posterize, solarize,
  solarize-add, autocontrast, equalize, Pillow's RGB -> L) and Pillow's float32 blends in its operation
  order (brightness, contrast, color, sharpness).
* Shear and translate move pixels along one axis only: one float32 filter per row (or column) with
  Pillow's coordinates, taps and fill (:mod:`launcher.data.affine`), within one level of Pillow's
  double arithmetic on ~0.06 % of values at RSB magnitudes.
* Rotate needs true 2-D resampling and stays Pillow's op (so does any op without an array version):
  array versions of it measured slower than Pillow's C loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import timm.data.auto_augment as timm_aa
from PIL import Image

from launcher.data.affine import BICUBIC, BILINEAR, draw_resample, resample_lines

ArrayOp = Callable[..., np.ndarray]


def to_planar(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def to_pil(img: np.ndarray) -> Image.Image:
    # merging planes is ~5x cheaper than building an interleaved copy for Image.fromarray
    return Image.merge("RGB", [Image.fromarray(plane) for plane in img])


def _apply_luts(img: np.ndarray, luts: np.ndarray) -> np.ndarray:
    out = np.empty_like(img)
    for channel in range(3):
        np.take(luts[channel], img[channel], out=out[channel])
    return out


# ---------------------------------------------------------------------------------------------
# colour ops (exact)


def invert(img: np.ndarray, **_: object) -> np.ndarray:
    """``ImageOps.invert``."""
    return np.invert(img)


def posterize(img: np.ndarray, bits_to_keep: int, **_: object) -> np.ndarray:
    """``ImageOps.posterize``: keep the top ``bits_to_keep`` bits. 0 bits gives black (Pillow >= 10
    raises there, which would stop timm's pipeline at magnitude 10 of the "increasing" variant)."""
    if bits_to_keep >= 8:
        return img
    return np.bitwise_and(img, np.uint8(~(2 ** (8 - bits_to_keep) - 1) & 0xFF))


def solarize(img: np.ndarray, thresh: int, **_: object) -> np.ndarray:
    """``ImageOps.solarize``: values >= thresh become 255 - value."""
    if thresh > 255:
        return img.copy()
    flip = np.greater_equal(img, max(thresh, 0)).view(np.uint8)
    return np.bitwise_xor(img, np.negative(flip, out=flip))  # 0 / 1 -> 0 / 0xFF; x ^ 0xFF == 255 - x


def solarize_add(img: np.ndarray, add: int, thresh: int = 128, **_: object) -> np.ndarray:
    """timm's ``solarize_add``: values below thresh become ``min(255, value + add)``."""
    add = min(max(add, 0), 255)
    below = np.less(img, thresh).view(np.uint8)
    if thresh + add <= 256:  # timm's case (thresh 128, add <= 110): no value passes 255
        return img + below * np.uint8(add)
    out = np.minimum(img, np.uint8(255 - add))
    out += np.uint8(add)
    np.copyto(out, img, where=below == 0)
    return out


def auto_contrast(img: np.ndarray, **_: object) -> np.ndarray:
    """``ImageOps.autocontrast``: per channel, map [min, max] to [0, 255] (``int(v * scale + offset)``)."""
    levels = np.arange(256, dtype=np.float64)
    luts = np.empty((3, 256), np.uint8)
    for channel in range(3):
        low, high = int(img[channel].min()), int(img[channel].max())
        if high <= low:
            luts[channel] = levels
        else:
            scale = 255.0 / (high - low)
            luts[channel] = np.clip(np.trunc(levels * scale + -low * scale), 0, 255)
    return _apply_luts(img, luts)


def equalize(img: np.ndarray, **_: object) -> np.ndarray:
    """``ImageOps.equalize``: per channel, Pillow's integer histogram equalization table."""
    luts = np.empty((3, 256), np.uint8)
    for channel in range(3):
        histogram = np.asarray(Image.fromarray(img[channel]).histogram())  # ~2x faster than np.bincount
        used = histogram[histogram > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
        if not step:
            luts[channel] = np.arange(256)
        else:  # lut[i] = (step // 2 + count of values below i) // step, clipped to uint8 like Pillow's table
            below = np.concatenate(([0], np.cumsum(histogram)[:-1]))
            luts[channel] = np.minimum((step // 2 + below) // step, 255)
    return _apply_luts(img, luts)


def _luma(img: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, as uint32 (H, W)."""
    luma = np.multiply(img[0], np.uint32(19595), dtype=np.uint32)
    luma += np.multiply(img[1], np.uint32(38470), dtype=np.uint32)
    luma += np.multiply(img[2], np.uint32(7471), dtype=np.uint32)
    luma += 0x8000
    luma >>= 16
    return luma


def _blend(degenerate: np.ndarray | np.float32, img: np.ndarray, factor: float) -> np.ndarray:
    """``Image.blend(degenerate, img, factor)`` (``ImagingBlend``): ``d + factor * (x - d)`` in C
    float, factor included, then clipped to [0, 255] and truncated."""
    out = img.astype(np.float32)
    out -= degenerate
    out *= np.float32(factor)
    out += degenerate
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def brightness(img: np.ndarray, factor: float, **_: object) -> np.ndarray:
    """``ImageEnhance.Brightness``: blend with black."""
    return _blend(np.float32(0), img, factor)


def contrast(img: np.ndarray, factor: float, **_: object) -> np.ndarray:
    """``ImageEnhance.Contrast``: blend with the mean grey level (ImageStat's sum / count, rounded half up)."""
    luma = _luma(img)
    mean = int(int(luma.sum()) / luma.size + 0.5) if luma.size else 0
    return _blend(np.float32(mean), img, factor)


def color(img: np.ndarray, factor: float, **_: object) -> np.ndarray:
    """``ImageEnhance.Color``: blend with the grey (L) version of the image."""
    return _blend(_luma(img).astype(np.float32), img, factor)


def sharpness(img: np.ndarray, factor: float, **_: object) -> np.ndarray:
    """``ImageEnhance.Sharpness``: blend with ``ImageFilter.SMOOTH`` (kernel 1 1 1 / 1 5 1 / 1 1 1 over
    13; Pillow keeps the border pixels).

    Pillow sums the kernel in float32 with a +0.5 bias and truncates. With S the integer weighted sum,
    the exact value (2 S + 13) / 26 is never within 1/26 of an integer, far more than float32's error
    over nine terms, so ``floor((S + 6.5) / 13)`` gives Pillow's smoothed pixels exactly.
    """
    _, height, width = img.shape
    if height < 3 or width < 3:
        return img.copy()
    rows = np.add(img[:, :, :-2], img[:, :, 1:-1], dtype=np.int16)
    rows += img[:, :, 2:]
    weighted = rows[:, :-2] + rows[:, 1:-1]
    weighted += rows[:, 2:]
    weighted += np.multiply(img[:, 1:-1, 1:-1], np.int16(4), dtype=np.int16)  # centre weight 5 = 1 + 4
    smooth = img.astype(np.float32)
    inner = smooth[:, 1:-1, 1:-1]
    np.add(weighted, np.float32(6.5), out=inner)
    inner *= np.float32(1 / 13)
    np.floor(inner, out=inner)
    return _blend(smooth, img, factor)


# ---------------------------------------------------------------------------------------------
# shear / translate: Pillow's affine sampling along one axis (launcher.data.affine)


def _shift(img: np.ndarray, shift: np.ndarray, axis: int, matrix: tuple[float, ...], *,
           fillcolor: object = (128, 128, 128), resample: object = BICUBIC, **_: object) -> np.ndarray:
    resample = draw_resample(resample)  # timm's _interpolation: a tuple is drawn from at every op call
    if resample in (BICUBIC, BILINEAR) and img.size > 0:
        return resample_lines(img, shift, axis, fillcolor, resample == BICUBIC)
    image = to_pil(img)
    return to_planar(np.array(image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample,
                                              fillcolor=fillcolor)))


def shear_x(img: np.ndarray, factor: float, **kwargs: object) -> np.ndarray:
    """timm's ``shear_x``: affine (1, factor, 0, 0, 1, 0)."""
    return _shift(img, factor * (np.arange(img.shape[1]) + 0.5), 2, (1, factor, 0, 0, 1, 0), **kwargs)


def shear_y(img: np.ndarray, factor: float, **kwargs: object) -> np.ndarray:
    """timm's ``shear_y``: affine (1, 0, 0, factor, 1, 0)."""
    return _shift(img, factor * (np.arange(img.shape[2]) + 0.5), 1, (1, 0, 0, factor, 1, 0), **kwargs)


def translate_x_abs(img: np.ndarray, pixels: float, **kwargs: object) -> np.ndarray:
    """timm's ``translate_x_abs``: affine (1, 0, pixels, 0, 1, 0)."""
    return _shift(img, np.array([float(pixels)]), 2, (1, 0, pixels, 0, 1, 0), **kwargs)


def translate_y_abs(img: np.ndarray, pixels: float, **kwargs: object) -> np.ndarray:
    """timm's ``translate_y_abs``: affine (1, 0, 0, 0, 1, pixels)."""
    return _shift(img, np.array([float(pixels)]), 1, (1, 0, 0, 0, 1, pixels), **kwargs)


def translate_x_rel(img: np.ndarray, pct: float, **kwargs: object) -> np.ndarray:
    """timm's ``translate_x_rel``: by ``pct`` of the width."""
    return translate_x_abs(img, pct * img.shape[2], **kwargs)


def translate_y_rel(img: np.ndarray, pct: float, **kwargs: object) -> np.ndarray:
    """timm's ``translate_y_rel``: by ``pct`` of the height."""
    return translate_y_abs(img, pct * img.shape[1], **kwargs)


# ---------------------------------------------------------------------------------------------
# wiring

#: timm's PIL op function -> its planar-array version (ops not listed run Pillow through :func:`via_pil`)
ARRAY_OPS: dict[Callable, ArrayOp] = {
    timm_aa.auto_contrast: auto_contrast,
    timm_aa.equalize: equalize,
    timm_aa.invert: invert,
    timm_aa.posterize: posterize,
    timm_aa.solarize: solarize,
    timm_aa.solarize_add: solarize_add,
    timm_aa.color: color,
    timm_aa.contrast: contrast,
    timm_aa.brightness: brightness,
    timm_aa.sharpness: sharpness,
    timm_aa.shear_x: shear_x,
    timm_aa.shear_y: shear_y,
    timm_aa.translate_x_abs: translate_x_abs,
    timm_aa.translate_y_abs: translate_y_abs,
    timm_aa.translate_x_rel: translate_x_rel,
    timm_aa.translate_y_rel: translate_y_rel,
}


def via_pil(pil_op: Callable) -> ArrayOp:
    """timm's PIL op on a planar array (it draws whatever timm's op draws)."""

    def run(img: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        return to_planar(np.asarray(pil_op(to_pil(img), *args, **kwargs)))

    run.__name__ = f"via_pil_{pil_op.__name__}"
    return run


def _array_op(op: timm_aa.AugmentOp) -> timm_aa.AugmentOp:
    clone = copy.copy(op)  # same name, probability, magnitude, level function and kwargs
    clone.aug_fn = ARRAY_OPS.get(op.aug_fn) or via_pil(op.aug_fn)
    return clone


class ArrayAugment:
    """timm's RandAugment or AutoAugment with array pixel ops; call on a planar (3, H, W) uint8 array."""

    def __init__(self, augment: timm_aa.RandAugment | timm_aa.AutoAugment) -> None:
        if isinstance(augment, timm_aa.RandAugment):
            self.augment = timm_aa.RandAugment([_array_op(op) for op in augment.ops], augment.num_layers,
                                               augment.choice_weights)
        else:
            self.augment = timm_aa.AutoAugment([[_array_op(op) for op in sub] for sub in augment.policy])

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if img.ndim != 3 or img.shape[0] != 3 or img.dtype != np.uint8:
            raise ValueError(f"ArrayAugment needs a (3, H, W) uint8 array, got {img.dtype} {img.shape}")
        return self.augment(np.ascontiguousarray(img))

    def __repr__(self) -> str:
        return f"ArrayAugment({self.augment!r})"


def array_augment(transform: object) -> ArrayAugment | None:
    """An :class:`ArrayAugment` for timm's secondary transform when it is exactly one RandAugment or
    AutoAugment (what ``create_transform`` builds there with ``color_jitter=None``), else None."""
    transforms = getattr(transform, "transforms", [transform])
    if len(transforms) == 1 and isinstance(transforms[0], (timm_aa.RandAugment, timm_aa.AutoAugment)):
        return ArrayAugment(transforms[0])
    return None
