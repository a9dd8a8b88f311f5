"""Decode + augment one encoded image into a uint8 CHW tensor, with timm's RSB semantics.

Train = timm's ``RandomResizedCropAndInterpolation`` parameters (``get_params``) + horizontal flip +
timm's ``rand_augment_transform`` (the very objects ``timm.data.create_transform(separate=True)``
builds, so the random draws happen in timm's order). Eval = resize the shorter side to
``floor(size / crop_pct)`` + center crop (timm ``transforms_imagenet_eval``). Normalization is left to
the device (:class:`launcher.data.BatchTransform`).

Why this shape (measured on photo-like JPEGs, one core; see benchmarks/loader.py): plain JPEGs (no EXIF
block) are sized from their headers and decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo),
without ``Image.open``; torch's uint8 antialiased bicubic resize is several times faster than PIL's;
RandAugment runs timm's own op objects with array pixel ops (:mod:`launcher.data.randaugment`), ~40 %
cheaper, mostly on shear / translate (Rotate, still Pillow's, is nearly half of what remains). When the
crop is at least twice the output size in both directions, PIL's JPEG draft mode decodes at 1/2, 1/4 or
1/8 scale in the DCT domain, which is cheaper than a full decode (common at 160 px or for large photos).
Pixel values differ from timm's all-PIL pipeline by rounding only (tests bound the difference); the crop
box, flip and RandAugment draws are identical.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, create_transform
from torchvision.io import ImageReadMode, decode_jpeg

from launcher.data.images import exif_orientation, to_rgb
from launcher.data.randaugment import array_augment, to_planar

_INTERPOLATION = {
    "bicubic": TF.InterpolationMode.BICUBIC,
    "bilinear": TF.InterpolationMode.BILINEAR,
    "nearest": TF.InterpolationMode.NEAREST,
}
_PIL_TO_TV = {
    Image.Resampling.BICUBIC: TF.InterpolationMode.BICUBIC,
    Image.Resampling.BILINEAR: TF.InterpolationMode.BILINEAR,
    Image.Resampling.NEAREST: TF.InterpolationMode.NEAREST,
}


class DecodeError(ValueError):
    """The bytes are not a decodable image."""


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as error:
        raise DecodeError(f"not an image: {type(error).__name__}: {error}") from None


_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 (not DHT, JPG, DAC)


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG with 1 or 3 components and no EXIF block, read from its headers.

    None for anything else (other formats, EXIF that may hold an orientation, odd layouts): those go
    through ``Image.open``, which costs ~0.09 ms per sample more than reading these few bytes.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    size, pos = None, 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: all headers read
            return size
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if length < 2 or (marker == 0xE1 and segment.startswith(b"Exif\0\0")):
            return None
        if marker in _FRAME_MARKERS:
            if size is not None or len(segment) < 6 or segment[5] not in (1, 3):
                return None
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            if not (height and width):
                return None
            size = (width, height)
        pos += 2 + length
    return None


# The operator behind torchvision.io.decode_jpeg: since torchvision 0.29 the public function adds a
# deprecation warning (in favour of torchcodec) to every call, ~0.03 ms a sample with the filter that
# silences it. The public function stays the fallback (tests check both decode the same pixels).
_DECODE_JPEG_OP = getattr(torch.ops.image, "decode_jpeg", None)


def _decode_jpeg(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        # the decoder only reads the buffer, so wrapping the read-only bytes without a copy is safe
        # (torch warns about read-only buffers)
        warnings.simplefilter("ignore", UserWarning)
        encoded = torch.frombuffer(data, dtype=torch.uint8)
        if _DECODE_JPEG_OP is not None:
            return _DECODE_JPEG_OP(encoded, ImageReadMode.RGB.value, False)
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB)


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    if image.mode != "RGB":
        image = to_rgb(image)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def decode_full(data: bytes, image: Image.Image, upright: bool | None = None) -> torch.Tensor:
    """Full-size RGB uint8 CHW tensor; libjpeg-turbo via torchvision for plain JPEGs, else PIL.

    ``upright``: whether the EXIF orientation is 1, when the caller already knows (saves re-reading EXIF).
    """
    upright = exif_orientation(image) == 1 if upright is None else upright
    if image.format == "JPEG" and upright:
        try:
            return _decode_jpeg(data)
        except RuntimeError:
            image = _open(data)  # let PIL try (and explain) before giving up
    try:
        image.load()
        if not upright:
            image = ImageOps.exif_transpose(image)
        return _pil_to_tensor(image)
    except Exception as error:
        raise DecodeError(f"cannot decode: {type(error).__name__}: {error}") from None


def decode_region(
    data: bytes, image: Image.Image, box: tuple[int, int, int, int], out_size: Sequence[int],
    upright: bool | None = None,
) -> tuple[torch.Tensor, tuple]:
    """Decode just enough of the image for crop ``box`` (top, left, h, w) to feed ``out_size``.

    Returns the decoded tensor and the box scaled to it. Uses JPEG draft (DCT-domain downscale) when
    the crop is at least twice the output in both directions.
    """
    top, left, height, width = box
    upright = exif_orientation(image) == 1 if upright is None else upright
    factor = _draft_factor(box, out_size) if image.format == "JPEG" and upright else 1
    if factor == 1:
        return decode_full(data, image, upright), box
    full_w, full_h = image.size
    try:
        image.draft("RGB", (math.ceil(full_w / factor), math.ceil(full_h / factor)))
        tensor = _pil_to_tensor(image)
    except Exception as error:
        raise DecodeError(f"cannot decode: {type(error).__name__}: {error}") from None
    sy, sx = tensor.shape[1] / full_h, tensor.shape[2] / full_w
    scaled = (int(top * sy), int(left * sx), max(1, round(height * sy)), max(1, round(width * sx)))
    return tensor, scaled


def _draft_factor(box: tuple, out_size: Sequence[int]) -> int:
    """The JPEG draft (DCT) downscale, 1, 2, 4 or 8, that keeps the crop at least the output size."""
    _, _, height, width = box
    factor = 1
    while factor < 8 and height >= 2 * factor * out_size[0] and width >= 2 * factor * out_size[1]:
        factor *= 2
    return factor


def _load_oriented(image: Image.Image) -> Image.Image:
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:
        raise DecodeError(f"cannot decode: {type(error).__name__}: {error}") from None


class TrainTransform:
    """bytes -> uint8 [3, S, S]: random-resized-crop, flip, RandAugment (timm objects, timm's RNG order)."""

    def __init__(
        self,
        img_size: int,
        *,
        auto_augment: str | None = "rand-m7-mstd0.5-inc1",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        draft: bool = True,
    ) -> None:
        primary, secondary, _ = create_transform(
            img_size, is_training=True, scale=scale, ratio=ratio, hflip=hflip, auto_augment=auto_augment,
            interpolation=interpolation, mean=tuple(mean), color_jitter=None, separate=True,
        )
        self.crop = primary.transforms[0]
        self.hflip = hflip
        self.augment = secondary if secondary.transforms else None
        # the same timm RandAugment / AutoAugment objects with uint8-array pixel ops (None: PIL path)
        self.array_augment = array_augment(secondary) if self.augment is not None else None
        self.size = (img_size, img_size)
        self.draft = draft
        self._no_pixels = torch.empty(1, 1, 1, dtype=torch.uint8)  # expanded to an image shape, no storage
        # timm's RandomHorizontalFlip draws torch.rand(1) < p in float32: the same test on the float value
        self._flip_below = float(np.float32(hflip))

    def _interpolation(self) -> TF.InterpolationMode:
        mode = self.crop.interpolation
        if isinstance(mode, (tuple, list)):  # timm "random": same draw as timm makes
            mode = random.choice(mode)
        return _PIL_TO_TV.get(mode, mode) if not isinstance(mode, TF.InterpolationMode) else mode

    def __call__(self, data: bytes) -> torch.Tensor:
        size = plain_jpeg_size(data)
        if size is None:
            return self._augment(*self._decode_via_pil(data))
        # the crop draws need the size only: a tensor of that shape without storage stands in
        box = self.crop.get_params(self._no_pixels.expand(3, size[1], size[0]), self.crop.scale, self.crop.ratio)
        interpolation = self._interpolation()
        if self.draft and _draft_factor(box, self.size) > 1:
            tensor, box = decode_region(data, _open(data), box, self.size, upright=True)
        else:
            try:
                tensor = _decode_jpeg(data)
            except RuntimeError:
                tensor = decode_full(data, _open(data), upright=True)  # PIL decodes it or explains why not
        return self._augment(tensor, box, interpolation)

    def _decode_via_pil(self, data: bytes) -> tuple[torch.Tensor, tuple, TF.InterpolationMode]:
        image = _open(data)
        oriented = exif_orientation(image) != 1
        if oriented:  # rare (folder sources only): decode fully, then crop the upright image
            image = _load_oriented(image)
        box = self.crop.get_params(image, self.crop.scale, self.crop.ratio)  # reads the size only
        interpolation = self._interpolation()
        if oriented:
            tensor = _pil_to_tensor(image)
        elif self.draft:
            tensor, box = decode_region(data, image, box, self.size, upright=True)
        else:
            tensor = decode_full(data, image, upright=True)
        return tensor, box, interpolation

    def _augment(self, tensor: torch.Tensor, box: tuple, interpolation: TF.InterpolationMode) -> torch.Tensor:
        out = _resized_crop(tensor, box, self.size, interpolation)
        flip = self.hflip > 0 and torch.rand(1).item() < self._flip_below
        if self.array_augment is not None:
            # the resize output is channels-last (a contiguous HWC view); the ops want planes, and the
            # copy into planes flips for free
            hwc = out.permute(1, 2, 0).numpy()
            return torch.from_numpy(self.array_augment(to_planar(hwc[:, ::-1] if flip else hwc)))
        if flip:
            out = out.flip(-1)
        if self.augment is not None:
            # contiguous HWC bytes make Image.fromarray a plain copy (a strided view costs ~10x more)
            augmented = self.augment(Image.fromarray(out.permute(1, 2, 0).contiguous().numpy()))
            out = torch.from_numpy(np.array(augmented, dtype=np.uint8)).permute(2, 0, 1)
        return out


def _resized_crop(tensor: torch.Tensor, box: tuple, size: Sequence[int],
                  interpolation: TF.InterpolationMode) -> torch.Tensor:
    """Crop ``box`` of a CHW uint8 tensor and resize it, in channels-last (HWC) memory.

    torch's uint8 antialiased kernels run about twice as fast on channels-last input, and the result is
    then already laid out as the HWC array that PIL (RandAugment) wants.
    """
    top, left, height, width = box
    crop = tensor[:, top:top + height, left:left + width].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if interpolation != TF.InterpolationMode.BICUBIC or (height, width) == tuple(size):
        return TF.resize_image(crop, list(size), interpolation=interpolation, antialias=True)
    # what TF.resize does for a uint8 bicubic resize on the CPU, without its per-call dispatch (~0.02 ms):
    # torch's native uint8 kernel, fed a 1CHW view whose batch stride marks it channels-last so that
    # the output is channels-last too
    batch = crop.as_strided((1, *crop.shape), (crop.numel(), *crop.stride()))
    return F.interpolate(batch, size=list(size), mode="bicubic", align_corners=False, antialias=True)[0]


class EvalTransform:
    """bytes -> uint8 [3, S, S]: shorter side to floor(S / crop_pct), center crop S (timm eval)."""

    def __init__(self, img_size: int, *, crop_pct: float = 0.95, interpolation: str = "bicubic") -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        self.size = img_size
        self.scale_size = math.floor(img_size / crop_pct)
        self.interpolation = _INTERPOLATION[interpolation]

    def __call__(self, data: bytes) -> torch.Tensor:
        tensor = decode_full(data, _open(data))
        tensor = TF.resize(tensor, [self.scale_size], interpolation=self.interpolation, antialias=True)
        return TF.center_crop(tensor, [self.size, self.size])


def seed_everything_for_sample(seed: int) -> None:
    """timm's transforms draw from python ``random``, numpy's and torch's global RNGs: seed all three.

    Only torch's CPU generator: ``torch.manual_seed`` also visits every accelerator backend, which costs
    ~0.15 ms per call (3-4% of a sample) and the transforms never draw on a device.
    """
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)


class preserved_rng_state:  # noqa: N801 - used as a context manager
    """Save and restore the global RNGs (for in-process loading, which must not disturb training RNG)."""

    def __enter__(self) -> None:
        self.state = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.set_rng_state(self.state[2])
