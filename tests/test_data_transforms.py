"""Our uint8 transforms against timm's PIL pipelines on the same image and RNG state."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from launcher.data import EvalTransform, TrainTransform
from launcher.data.transforms import seed_everything_for_sample


@pytest.fixture(scope="module")
def photo() -> bytes:
    from launcher.data.sample_data import source_photos

    image = Image.fromarray(source_photos()["chelsea"]).resize((470, 390), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _timm_uint8(transforms, data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    for t in transforms:
        image = t(image)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("seed", range(6))
def test_train_crop_and_flip_match_timm(photo, seed):
    ours = TrainTransform(64, auto_augment=None, draft=False)
    primary, _, _ = create_transform(64, is_training=True, interpolation="bicubic", separate=True)
    seed_everything_for_sample(seed)
    a = ours(photo)
    seed_everything_for_sample(seed)
    b = _timm_uint8(primary.transforms, photo)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == torch.uint8
    diff = (a.int() - b.int()).abs().float()
    assert diff.mean() < 1.5 and torch.quantile(diff.flatten(), 0.99) <= 8  # resize rounding, same crop & flip


def test_draft_decode_stays_close_to_full_decode(photo):
    full = TrainTransform(48, auto_augment=None, scale=(0.9, 1.0), draft=False)
    draft = TrainTransform(48, auto_augment=None, scale=(0.9, 1.0), draft=True)
    for seed in range(4):
        seed_everything_for_sample(seed)
        a = full(photo)
        seed_everything_for_sample(seed)
        b = draft(photo)
        assert (a.int() - b.int()).abs().float().mean() < 4


def test_rand_augment_is_timms_and_draws_in_timms_order(photo):
    ours = TrainTransform(64, auto_augment="rand-m7-mstd0.5-inc1")
    _, secondary, _ = create_transform(64, is_training=True, interpolation="bicubic",
                                       auto_augment="rand-m7-mstd0.5-inc1", separate=True)
    assert repr(ours.augment) == repr(secondary)
    ra = ours.augment.transforms[0]
    assert ra.num_layers == 2 and [op.name for op in ra.ops][:3] == ["AutoContrast", "Equalize", "Invert"]
    assert {op.magnitude for op in ra.ops} == {7} and {op.magnitude_std for op in ra.ops} == {0.5}
    seed_everything_for_sample(11)
    a = ours(photo)
    seed_everything_for_sample(11)
    b = ours(photo)
    assert torch.equal(a, b)
    state = random.getstate()
    ours(photo)
    assert random.getstate() != state  # it does draw from the global RNGs that the loader seeds per sample


@pytest.mark.parametrize("size", [64, 160])
def test_eval_matches_timm(photo, size):
    reference = create_transform(size, is_training=False, crop_pct=0.95, interpolation="bicubic")
    a = EvalTransform(size, crop_pct=0.95)(photo)
    b = _timm_uint8(reference.transforms[:2], photo)
    assert a.shape == b.shape == (3, size, size)
    assert (a.int() - b.int()).abs().float().mean() < 1.0


def test_png_and_bad_bytes(photo):
    buffer = io.BytesIO()
    Image.new("L", (30, 20), 128).save(buffer, format="PNG")
    out = EvalTransform(16)(buffer.getvalue())
    assert out.shape == (3, 16, 16) and int(out.float().mean().round()) == 128
    with pytest.raises(ValueError, match="not an image"):
        TrainTransform(16)(b"garbage")


def _encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def test_plain_jpeg_size_reads_headers_or_leaves_the_file_to_pil(photo):
    from launcher.data.transforms import plain_jpeg_size

    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    assert plain_jpeg_size(photo) == rgb.size == (470, 390)
    assert plain_jpeg_size(_encode(rgb, format="JPEG", progressive=True)) == rgb.size
    assert plain_jpeg_size(_encode(rgb.convert("L"), format="JPEG")) == rgb.size
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation: only PIL applies it
    assert plain_jpeg_size(_encode(rgb, format="JPEG", exif=exif)) is None
    assert plain_jpeg_size(_encode(rgb.convert("CMYK"), format="JPEG")) is None
    assert plain_jpeg_size(_encode(rgb, format="PNG")) is None
    assert plain_jpeg_size(photo[:300]) is None and plain_jpeg_size(b"\xff\xd8\x00garbage") is None


def test_header_path_and_pil_path_give_the_same_sample(photo):
    ours = TrainTransform(64)
    for seed in range(4):
        seed_everything_for_sample(seed)
        a = ours(photo)
        seed_everything_for_sample(seed)
        b = ours._augment(*ours._decode_via_pil(photo))
        assert torch.equal(a, b)


def test_exif_orientation_still_applied(photo):
    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 270: the upright image is 390 x 470
    rotated = _encode(rgb, format="JPEG", exif=exif, quality=95)
    upright = _encode(rgb.transpose(Image.Transpose.ROTATE_270), format="JPEG", quality=95)
    ours = TrainTransform(48, auto_augment=None, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    seed_everything_for_sample(0)
    a = ours(rotated)
    seed_everything_for_sample(0)
    b = ours(upright)
    assert (a.int() - b.int()).abs().float().mean() < 3  # same content, JPEG re-encoding noise only


def torchvision_lacks_it() -> bool:
    return not hasattr(torch.ops.image, "decode_jpeg")


def test_decoder_operator_and_direct_resize_match_torchvision(photo):
    """The fast paths (torchvision's decoder operator without its deprecation wrapper, torch's uint8
    bicubic kernel without torchvision's dispatch) give exactly what the public functions give."""
    import warnings

    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg

    from launcher.data.transforms import _DECODE_JPEG_OP, _decode_jpeg, _resized_crop

    assert _DECODE_JPEG_OP is not None or torchvision_lacks_it()  # the public function is the fallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = decode_jpeg(torch.frombuffer(bytearray(photo), dtype=torch.uint8), mode=ImageReadMode.RGB)
    decoded = _decode_jpeg(photo)
    assert torch.equal(decoded, reference)
    boxes_and_sizes = [((10, 20, 300, 250), (224, 224)), ((0, 0, 390, 470), (64, 80)), ((5, 5, 40, 30), (96, 96))]
    for box, size in boxes_and_sizes:
        top, left, height, width = box
        expected = TF.resize(decoded[:, top:top + height, left:left + width], list(size),
                             interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        got = _resized_crop(decoded, box, size, TF.InterpolationMode.BICUBIC)
        assert torch.equal(got, expected) and got.permute(1, 2, 0).is_contiguous()  # channels-last, as before
