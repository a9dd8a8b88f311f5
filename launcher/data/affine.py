"""Pillow's affine resampling along one axis (shear, translate) on planar uint8 arrays.

Pillow (``ImagingGenericTransform`` with ``bicubic_filter32RGB`` / ``bilinear_filter32RGB``) maps output
pixel (x, y) to the source point (a (x + .5) + b (y + .5) + c, d (x + .5) + e (y + .5) + f) in double;
a point outside [0, w) x [0, h) keeps the fill colour; otherwise the 4 x 4 (bicubic, a = -1) or 2 x 2
(bilinear) taps around floor(x' - .5), floor(y' - .5), clamped to the image, are weighted by the
fractional parts, and the result is clipped and truncated to uint8.

Shear and translate move one coordinate only, so each line (row or column) is one 1-D filter: one
gathered (shear) or sliced (translate) tap window per line and a few float32 multiply-adds, 4-7x
cheaper than Pillow. Coordinates, bounds, taps, clamping, fill and truncation are Pillow's; only the
weighted sums run in float32 instead of double, with a small slack before truncation so that an exact
integer (a flat region, all weights on one tap) truncates to itself. Where the exact value lies within
~1e-4 of an integer, Pillow's double result and ours can land one level apart (~0.06 % of values on
average at RSB magnitudes, up to ~3 % for round shifts such as magnitude 10 with bilinear; see
tests/test_data_randaugment.py). An exact port needs per-pixel double arithmetic, which costs about
as much as Pillow.

Rotate moves both coordinates: every pixel has its own 4 x 4 taps and weights. Done with numpy / torch
(two ``embedding_bag`` passes over 4-pixel windows of a padded channels-last image) it measured slower
than Pillow's C loop (2.9 vs 2.7 ms at 224 px), so Rotate stays Pillow's.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR
# Added before truncation: float32 sums over a flat region (all taps equal) must not fall just below
# the tap value; larger than float32's error on these sums (~1.6e-4), small otherwise.
TRUNCATION_SLACK = 2.5e-4
# Pillow's BICUBIC macro v = p1 + d (p2 + d (p3 + d p4)) (a = -1) rearranged as weights of the taps
# (x0 - 1, x0, x0 + 1, x0 + 2): rows are taps, columns the coefficients of 1, d, d^2, d^3
_CUBIC_WEIGHTS = np.array([[0, -1, 2, -1], [1, 0, -2, 1], [0, 1, 1, -1], [0, 0, -1, 1]], np.float64)
_LINEAR_WEIGHTS = np.array([[1, -1], [0, 1]], np.float64)  # v = a + (b - a) d
_SLACK = torch.tensor(TRUNCATION_SLACK)  # read only


def fill_values(fillcolor: object) -> np.ndarray:
    """The RGB bytes Pillow paints for ``fillcolor`` (``Image.new("RGB", size, fillcolor)``): None is
    black, an int is packed 0xBBGGRR, a tuple is (R, G, B)."""
    if fillcolor is None:
        return np.zeros(3, np.uint8)
    if isinstance(fillcolor, (tuple, list)):
        return np.array([int(v) for v in fillcolor][:3], np.uint8)
    packed = int(fillcolor)
    return np.array([packed & 0xFF, (packed >> 8) & 0xFF, (packed >> 16) & 0xFF], np.uint8)


def _truncate_into(values: np.ndarray, out: np.ndarray) -> None:
    np.clip(values, 0, 255, out=out, casting="unsafe")  # Pillow's clip + cast to uint8, in one pass


# ---------------------------------------------------------------------------------------------
# one coordinate moves: shear / translate


def _first_at_or_above(bound: float, shift: float, size: int) -> int:
    """The first pixel i in [0, size] whose source coordinate (i + 0.5) + shift, in double like Pillow,
    is at least ``bound``. The closed-form estimate can only be one pixel off."""
    index = min(max(math.ceil(bound - 0.5 - shift), 0), size)
    if index > 0 and (index - 0.5) + shift >= bound:
        index -= 1
    if index < size and (index + 0.5) + shift < bound:
        index += 1
    return index


def _line_weights(position: np.ndarray, cubic: bool) -> tuple[np.ndarray, torch.Tensor]:
    """floor(position) and the float32 tap weights of each line's fraction (taps, lines)."""
    start = np.floor(position)
    coefficients = _CUBIC_WEIGHTS if cubic else _LINEAR_WEIGHTS
    powers = (position - start)[None, :] ** np.arange(coefficients.shape[1])[:, None]
    return start, torch.from_numpy((coefficients @ powers).astype(np.float32))


def _weighted_taps(lines: torch.Tensor, weights: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """slack + sum_k weights[k] * lines[k:k + length] along ``axis``, in Pillow's tap order (float32)."""
    weights = weights.unbind(0)
    values = torch.addcmul(_SLACK, lines.narrow(axis, 0, length), weights[0])
    for k in range(1, len(weights)):
        values.addcmul_(lines.narrow(axis, k, length), weights[k])
    return values


def _translate(img: np.ndarray, shift: float, axis: int, fills: np.ndarray, cubic: bool) -> np.ndarray:
    """Every line moves by the same ``shift``: the taps are slices of the image, no gather."""
    size = img.shape[axis]
    begin, end = _first_at_or_above(0.0, shift, size), _first_at_or_above(float(size), shift, size)
    out = np.empty_like(img)
    for outside in (np.s_[:begin], np.s_[end:]):  # before and after the source range: the fill
        out[(slice(None),) * axis + (outside,)] = fills[:, None, None]
    if begin >= end:
        return out
    start, weights = _line_weights(np.array([(begin + 0.5 + shift) - 0.5]), cubic)
    length = end - begin
    first = int(start[0]) - int(cubic)  # source index of the first tap
    last = first + length + len(weights) - 1  # taps of inside pixels lie in [-2, size + 2)
    window = torch.from_numpy(img).narrow(axis, max(first, 0), min(last, size) - max(first, 0)).float()
    if first < 0 or last > size:  # Pillow clamps the taps to the image: repeat the edge pixels
        window = torch.cat([_repeat_edge(window, axis, 0, -first), window,
                            _repeat_edge(window, axis, -1, last - size)], axis)
    values = _weighted_taps(window, weights.view(-1, 1, 1, 1), axis, length)
    _truncate_into(values.numpy(), out[:, :, begin:end] if axis == 2 else out[:, begin:end])
    return out


def _repeat_edge(window: torch.Tensor, axis: int, edge: int, count: int) -> torch.Tensor:
    shape = list(window.shape)
    shape[axis] = max(count, 0)
    return window.narrow(axis, edge if edge >= 0 else window.shape[axis] - 1, 1).expand(shape)


def _shear(img: np.ndarray, shift: np.ndarray, axis: int, fills: np.ndarray, cubic: bool) -> np.ndarray:
    """Line i moves by ``shift[i]``: one gather of every line's taps (clamped to the image), then the
    same per-line weighted sum; pixels whose source is outside the image get the fill."""
    _, height, width = img.shape
    size = img.shape[axis]
    start, weights = _line_weights((0.5 + shift) - 0.5, cubic)
    first = torch.from_numpy(start.astype(np.int32)) - int(cubic)
    offsets = torch.arange(size + len(weights) - 1, dtype=torch.int32)
    if axis == 2:  # rows: (height, window) flat indices of row y's taps
        index = (first[:, None] + offsets).clamp_(0, size - 1)
        index += torch.arange(0, height * width, width, dtype=torch.int32)[:, None]
        weight_shape = (-1, 1, height, 1)
    else:  # columns: (window, width) flat indices of column x's taps
        index = (first[None, :] + offsets[:, None]).clamp_(0, size - 1)
        index *= width
        index += torch.arange(width, dtype=torch.int32)
        weight_shape = (-1, 1, 1, width)
    taps = torch.from_numpy(img).view(3, -1).float().index_select(1, index.view(-1)).view(3, *index.shape)
    values = _weighted_taps(taps, weights.view(weight_shape), axis, size)
    out = np.empty_like(img)
    _truncate_into(values.numpy(), out)
    source = np.add.outer(shift, np.arange(size) + 0.5)  # Pillow's x' = (x + 0.5) + shift, per line
    outside = (source < 0) | (source >= size)  # (lines, size)
    np.copyto(out, fills[:, None, None], where=outside if axis == 2 else outside.T)
    return out


def resample_lines(img: np.ndarray, shift: np.ndarray, axis: int, fillcolor: object,
                   cubic: bool) -> np.ndarray:
    """Pillow's ``Image.transform(AFFINE, resample=BICUBIC | BILINEAR)`` when one coordinate moves.

    axis 2 (rows): pixel (x, y) samples row y at x' = (x + 0.5) + shift[y]; axis 1 (columns): column x
    at y' = (y + 0.5) + shift[x]. ``shift`` has one value per row / column, or a single value
    (translate). ``img`` is a non-empty (3, H, W) uint8 array.
    """
    fills = fill_values(fillcolor)
    if shift.size == 1:
        return _translate(img, float(shift[0]), axis, fills, cubic)
    return _shear(img, shift, axis, fills, cubic)


def draw_resample(resample: object) -> object:
    """timm's ``_interpolation``: a tuple of filters is drawn from at every op call, like timm does."""
    return random.choice(resample) if isinstance(resample, (list, tuple)) else resample
