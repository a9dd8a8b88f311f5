"""Open one image file robustly: a fully decoded RGB image, or the reason it is rejected.

Used by ``shardify`` (which stores JPEG bytes) and by the plain-folder data source (which wants a PIL
image). Every rejection is an :class:`ImageRejected` whose ``reason`` is one short category from
:data:`REASONS` and whose ``detail`` says what exactly went wrong, so a report can group them.

Policy for what is stored in a shard (:func:`encode_for_shard`):

* A JPEG that decodes fully, is 8-bit 3-channel YCbCr, needs no EXIF rotation and fits ``max_side`` is
  stored byte for byte (no second lossy encoding).
* Anything else that decodes (PNG, WebP, BMP, TIFF, GIF first frame, grayscale, CMYK, 16-bit, palette,
  alpha, EXIF-rotated JPEG, ...) is turned into 8-bit RGB with the right orientation (alpha composited
  on white) and stored as a JPEG of the given quality.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default (about 89.5 MP, a 9459 x 9459 image). Above it a file is treated as a
# decompression bomb: a few KB of PNG can claim gigabytes of pixels.
DEFAULT_MAX_PIXELS: int = 89_478_485
DEFAULT_QUALITY: int = 95

REASONS = (
    "unreadable",  # cannot be opened or read (dangling symlink, I/O or permission error)
    "not a regular file",  # FIFO, socket, device: opening a FIFO would block forever
    "empty file",
    "not an image",
    "decompression bomb",
    "truncated",
    "corrupt",
)

_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageRejected(Exception):
    """A file that must not go into a dataset; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
        return type(self), (self.reason, self.detail)  # picklable across worker processes


@dataclass(frozen=True)
class ImagePolicy:
    """How :func:`encode_for_shard` stores images."""

    quality: int = DEFAULT_QUALITY  # JPEG quality of converted images
    max_side: int | None = None  # resize so the longer side is at most this (None: never resize)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are rejected as decompression bombs

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be positive, got {self.max_side}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive (or None for no limit), got {self.max_pixels}")


@dataclass(frozen=True)
class EncodedImage:
    """What goes into a shard: JPEG bytes of an RGB image and its size as stored."""

    data: bytes
    width: int
    height: int
    kept: bool  # True: the source JPEG bytes unchanged; False: converted and re-encoded


@contextmanager
def pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit for the duration (it is process-wide in Pillow).

    Pillow raises ``DecompressionBombError`` only above twice its limit and merely warns in between;
    the functions here enforce ``max_pixels`` exactly themselves, so the warning is silenced.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def read_file_bytes(path: str | os.PathLike[str]) -> bytes:
    """All bytes of a regular file; special files are refused without blocking on them."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ImageRejected("unreadable", _os_error_text(path, error)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "special file (FIFO, socket or device)"
            raise ImageRejected("not a regular file", f"{kind}: {os.fspath(path)}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read()
    except OSError as error:
        raise ImageRejected("unreadable", _os_error_text(path, error)) from None
    finally:
        os.close(fd)
    if not data:
        raise ImageRejected("empty file", "0 bytes")
    return data


def _os_error_text(path: str | os.PathLike[str], error: OSError) -> str:
    if isinstance(error, FileNotFoundError) and os.path.islink(path):
        return f"dangling symlink -> {os.readlink(path)}"
    return f"{type(error).__name__}: {error.strerror or error}"


def decode_bytes(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode ``data`` (every byte of pixel data is read, so truncation is caught).

    Returns the image as Pillow decoded it (any mode, orientation not applied). ``format`` and ``info``
    (EXIF, ICC, JPEG markers) are preserved.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not an image", "no image format recognised this file") from None
    except Image.DecompressionBombError as error:
        raise ImageRejected("decompression bomb", str(error)) from None
    except Exception as error:  # a malformed header can raise nearly anything inside a plugin
        raise ImageRejected("corrupt", f"cannot read header: {type(error).__name__}: {error}") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRejected(
            "decompression bomb", f"{width}x{height} = {width * height:,} pixels > limit {max_pixels:,}"
        )
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageRejected("decompression bomb", str(error)) from None
    except OSError as error:
        text = str(error)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise ImageRejected(reason, f"cannot decode: {text}") from None
    except Exception as error:
        raise ImageRejected("corrupt", f"cannot decode: {type(error).__name__}: {error}") from None
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"image has no pixels ({width}x{height})")
    return image


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1 = upright, 2..8 = needs flip/rotation); 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not reject an otherwise fine image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with EXIF orientation applied; alpha is composited on white, 16-bit is scaled down."""
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # Image.convert would clip 16-bit values at 255 instead of scaling them.
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if mode in _SIXTEEN_BIT_MODES or array.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(array / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.size and array.max() <= 1.0:
            array = array * 255.0  # float images are conventionally in [0, 1]
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read, fully decode and orient one image file as 8-bit RGB; raise :class:`ImageRejected` if bad.

    This is the function a folder-reading dataset should call: same checks as shardify applies.
    """
    image = decode_bytes(read_file_bytes(path), max_pixels=max_pixels)
    return to_rgb(image)


def is_storable_jpeg(image: Image.Image) -> bool:
    """True if the decoded source file can go into a shard unchanged."""
    if image.format not in ("JPEG", "MPO") or image.mode != "RGB":
        return False
    if getattr(image, "bits", 8) != 8:
        return False
    # Adobe transform 0 on a 3-channel JPEG means RGB-coded rather than YCbCr: rare, and some
    # decoders get its colours wrong, so it is re-encoded.
    if "adobe" in image.info and image.info.get("adobe_transform") == 0:
        return False
    return exif_orientation(image) == 1


def encode_for_shard(path: str | os.PathLike[str], policy: ImagePolicy = ImagePolicy()) -> EncodedImage:
    """The bytes to store for one file (see the module docstring), or :class:`ImageRejected`."""
    data = read_file_bytes(path)
    image = decode_bytes(data, max_pixels=policy.max_pixels)
    width, height = image.size
    fits = policy.max_side is None or max(width, height) <= policy.max_side
    if fits and is_storable_jpeg(image):
        return EncodedImage(data, width, height, kept=True)
    try:
        rgb = to_rgb(image)
        if policy.max_side is not None and max(rgb.size) > policy.max_side:
            rgb = resize_max_side(rgb, policy.max_side)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=policy.quality)
    except ImageRejected:
        raise
    except Exception as error:
        raise ImageRejected("corrupt", f"cannot convert: {type(error).__name__}: {error}") from None
    return EncodedImage(buffer.getvalue(), rgb.width, rgb.height, kept=False)


def resize_max_side(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale (never upscale) so the longer side is ``max_side``, keeping the aspect ratio."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)

