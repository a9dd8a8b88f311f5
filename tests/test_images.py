"""launcher.data.images: what is stored byte for byte, what is converted (checked by pixel values), what is
rejected and why. Every input kind is built here with Pillow; images are tiny."""

from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.data.images import (
    ImagePolicy,
    ImageRejected,
    encode_for_shard,
    load_rgb,
    pil_pixel_limit,
    read_file_bytes,
)

RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
TOLERANCE = 8  # JPEG error on flat colour regions at quality 95


def two_colour(width: int = 48, height: int = 24, left=RED, right=BLUE) -> Image.Image:
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2:] = right
    return Image.fromarray(array)


def decoded(encoded_bytes: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(encoded_bytes))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image).astype(int)


def assert_colour(pixel: np.ndarray, expected: tuple[int, int, int]) -> None:
    assert np.abs(pixel - np.array(expected)).max() <= TOLERANCE, (pixel.tolist(), expected)


def save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


# --------------------------------------------------------------------------------------- kept as-is

@pytest.mark.parametrize("progressive", [False, True])
def test_plain_rgb_jpeg_is_stored_byte_for_byte(tmp_path: Path, progressive: bool) -> None:
    path = save(two_colour(), tmp_path / "a.jpg", quality=90, progressive=progressive)
    encoded = encode_for_shard(path)
    assert encoded.kept
    assert encoded.data == path.read_bytes()
    assert (encoded.width, encoded.height) == (48, 24)


def test_jpeg_with_upright_exif_and_icc_is_kept(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    path = save(two_colour(), tmp_path / "a.jpg", quality=90, exif=exif.tobytes(), icc_profile=b"\0" * 64)
    encoded = encode_for_shard(path)
    assert encoded.kept and encoded.data == path.read_bytes()


def test_jpeg_within_max_side_is_kept_larger_one_is_resized(tmp_path: Path) -> None:
    small = save(two_colour(48, 24), tmp_path / "small.jpg", quality=90)
    big = save(two_colour(200, 100), tmp_path / "big.jpg", quality=90)
    policy = ImagePolicy(max_side=64)
    assert encode_for_shard(small, policy).kept
    resized = encode_for_shard(big, policy)
    assert not resized.kept and (resized.width, resized.height) == (64, 32)
    pixels = decoded(resized.data)
    assert pixels.shape == (32, 64, 3)
    assert_colour(pixels[16, 4], RED)
    assert_colour(pixels[16, 60], BLUE)


# --------------------------------------------------------------------------------------- converted

@pytest.mark.parametrize("orientation, transpose_to_store", [
    (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_90),  # viewer rotates 90 degrees clockwise, so store it turned back
    (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_rotated_jpeg_is_turned_upright(tmp_path: Path, orientation: int, transpose_to_store) -> None:
    upright = two_colour(48, 24)  # red on the left, blue on the right
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(upright.transpose(transpose_to_store), tmp_path / "r.jpg", quality=95, exif=exif.tobytes())
    encoded = encode_for_shard(path)
    assert not encoded.kept
    assert (encoded.width, encoded.height) == (48, 24)
    pixels = decoded(encoded.data)
    assert pixels.shape == (24, 48, 3)
    assert_colour(pixels[12, 6], RED)
    assert_colour(pixels[12, 42], BLUE)
    assert np.asarray(load_rgb(path)).shape == (24, 48, 3)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((16, 48, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 16:32] = (0, 0, 255, 255)  # opaque blue -> blue
    rgba[:, 32:] = (0, 0, 0, 128)  # half transparent black -> mid grey
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    pixels = decoded(encode_for_shard(path).data)
    assert_colour(pixels[8, 6], WHITE)
    assert_colour(pixels[8, 24], BLUE)
    assert_colour(pixels[8, 42], (127, 127, 127))


def test_palette_with_transparency_and_grey_alpha(tmp_path: Path) -> None:
    palette = Image.new("P", (32, 16), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (16, 0, 32, 16))
    path = save(palette, tmp_path / "p.png", transparency=0)
    pixels = decoded(encode_for_shard(path).data)
    assert_colour(pixels[8, 4], WHITE)  # index 0 is transparent
    assert_colour(pixels[8, 28], (0, 255, 0))

    grey_alpha = Image.merge("LA", [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 0)])
    la_path = save(grey_alpha, tmp_path / "la.png")
    assert_colour(decoded(encode_for_shard(la_path).data)[8, 8], WHITE)


def test_grayscale_one_bit_and_cmyk(tmp_path: Path) -> None:
    grey = save(Image.new("L", (16, 16), 100), tmp_path / "g.jpg", quality=95)
    encoded = encode_for_shard(grey)
    assert not encoded.kept  # grayscale JPEG is re-encoded as RGB
    assert_colour(decoded(encoded.data)[8, 8], (100, 100, 100))

    bilevel = save(Image.new("1", (16, 16), 1), tmp_path / "b.png")
    assert_colour(decoded(encode_for_shard(bilevel).data)[8, 8], WHITE)

    cmyk = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    encoded = encode_for_shard(cmyk)
    assert not encoded.kept
    assert_colour(decoded(encoded.data)[8, 8], RED)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    array = np.zeros((16, 48), np.uint16)
    array[:, 16:32] = 32896  # 128 * 257
    array[:, 32:] = 65535
    path = save(Image.fromarray(array), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = decoded(encode_for_shard(path).data)
    assert_colour(pixels[8, 6], BLACK)
    assert_colour(pixels[8, 24], (128, 128, 128))
    assert_colour(pixels[8, 42], WHITE)


@pytest.mark.parametrize("suffix, options", [
    (".png", {}), (".webp", {"lossless": True}), (".bmp", {}), (".tiff", {}), (".tif", {"compression": "tiff_lzw"}),
])
def test_other_formats_become_rgb_jpeg(tmp_path: Path, suffix: str, options: dict) -> None:
    path = save(two_colour(), tmp_path / f"x{suffix}", **options)
    encoded = encode_for_shard(path)
    assert not encoded.kept and (encoded.width, encoded.height) == (48, 24)
    pixels = decoded(encoded.data)
    assert_colour(pixels[12, 6], RED)
    assert_colour(pixels[12, 42], BLUE)


def test_gif_first_frame_is_used(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert_colour(decoded(encode_for_shard(path).data)[8, 8], RED)


def test_quality_option_changes_converted_bytes(tmp_path: Path) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    path = save(noise, tmp_path / "n.png")
    low = encode_for_shard(path, ImagePolicy(quality=30)).data
    high = encode_for_shard(path, ImagePolicy(quality=95)).data
    assert len(low) < len(high)


# --------------------------------------------------------------------------------------- rejected

def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb needs no more)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def reason_for(path: Path, policy: ImagePolicy = ImagePolicy()) -> str:
    with pytest.raises(ImageRejected) as caught:
        encode_for_shard(path, policy)
    return caught.value.reason


def test_bad_files_are_rejected_with_their_reason(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_for(tmp_path / "empty.jpg") == "empty file"

    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes()[:-400])
    assert reason_for(tmp_path / "cut.jpg") == "truncated"

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)).save(png, "PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    assert reason_for(tmp_path / "cut.png") == "truncated"

    (tmp_path / "notes.jpg").write_text("these are not pixels\n")
    assert reason_for(tmp_path / "notes.jpg") == "not an image"

    (tmp_path / "bomb.png").write_bytes(png_header_only(60_000, 60_000))  # 3.6 gigapixels in ~100 bytes
    assert reason_for(tmp_path / "bomb.png") == "decompression bomb"
    with pil_pixel_limit(None):  # even with Pillow's own check off, ours holds
        assert reason_for(tmp_path / "bomb.png") == "decompression bomb"

    small = save(two_colour(48, 24), tmp_path / "small.png")
    assert reason_for(small, ImagePolicy(max_pixels=1000)) == "decompression bomb"
    assert not encode_for_shard(small, ImagePolicy(max_pixels=48 * 24)).kept  # exactly at the limit is fine


def test_unreadable_entries_are_rejected_without_blocking(tmp_path: Path) -> None:
    # Tests run as root, so chmod 000 would not stop reads. Unreadable for everyone: a dangling
    # symlink (open fails). Never to be read: a FIFO (a plain open() would block forever waiting for a
    # writer) and a folder named like an image.
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a special file blocked"))
    signal.alarm(20)
    try:
        assert reason_for(tmp_path / "dangling.jpg") == "unreadable"
        assert reason_for(tmp_path / "pipe.jpg") == "not a regular file"
        assert reason_for(tmp_path / "folder.jpg") == "not a regular file"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ImageRejected, match="dangling symlink"):
        read_file_bytes(tmp_path / "dangling.jpg")


def test_rejection_survives_pickling_and_names_reason() -> None:
    error = pickle.loads(pickle.dumps(ImageRejected("truncated", "cannot decode: image file is truncated")))
    assert error.reason == "truncated" and "image file is truncated" in str(error)


def test_pixel_limit_context_restores_pillow_setting() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pil_pixel_limit(123):
        assert Image.MAX_IMAGE_PIXELS == 123
    restored = Image.MAX_IMAGE_PIXELS
    assert restored == before
