"""shardify end to end on tiny trees: placement and labels, byte-identical JPEGs, bad input, layouts,
symlink loops, output safety, read-back with webdataset and timm, verify."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.shardify import (
    EXIT_OK,
    EXIT_SKIPPED,
    EXIT_STRICT,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    shardify,
)
from launcher.shardify import verify as verify_output
from launcher.shardify.cli import main

KEY = re.compile(r"(train|validation)_\d{8}")


def write_image(path: Path, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    gradient = np.linspace(0, 60, size[0])[None, :, None]
    array = np.clip(base + gradient + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def read_shards(out: Path) -> dict[str, list[dict]]:
    """Every sample of every split, in file order, checking the member layout on the way."""
    info = json.loads((out / "_info.json").read_text())
    samples: dict[str, list[dict]] = {}
    for split, entry in info["splits"].items():
        samples[split] = []
        for filename, length in zip(entry["filenames"], entry["shard_lengths"]):
            with tarfile.open(out / filename) as tar:
                names = tar.getnames()
                assert len(names) == 3 * length
                for index in range(length):
                    key = names[3 * index].split(".")[0]
                    assert KEY.fullmatch(key) and key.startswith(split)
                    assert names[3 * index: 3 * index + 3] == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
                    meta = json.loads(tar.extractfile(f"{key}.json").read())
                    samples[split].append({
                        "key": key, "shard": filename, "meta": meta,
                        "cls": int(tar.extractfile(f"{key}.cls").read()),
                        "jpg": tar.extractfile(f"{key}.jpg").read(),
                    })
    return samples


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """3 classes (space and unicode in names), JPEG + PNG, nested files, hidden entries, an empty class."""
    src = tmp_path / "my photos"
    seed = 0
    for name in ("cat", "bird with space", "dög"):
        for n in range(6):
            write_image(src / name / f"img {n}.jpg", seed := seed + 1)
        write_image(src / name / "extra.png", seed := seed + 1, "PNG")
        write_image(src / name / "nested" / "deeper" / "ünï.jpg", seed := seed + 1)
        write_image(src / name / ".hidden.jpg", seed := seed + 1)
        write_image(src / name / ".cache" / "thumb.jpg", seed := seed + 1)
    (src / "empty class").mkdir()
    (src / ".git").mkdir()
    return src


def source_images(src: Path) -> dict[str, str]:
    """relative path -> class of every non-hidden image file below the class folders."""
    found = {}
    for path in src.rglob("*"):
        relative = path.relative_to(src)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found[relative.as_posix()] = relative.parts[0]
    return found


def test_every_image_lands_in_exactly_one_shard_with_its_label(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards" / "photos"
    result = shardify(tree, out, val_fraction=0.25, shard_count=4, workers=1, progress=False)
    expected = source_images(tree)
    assert len(expected) == 24

    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["bird with space", "cat", "dög"] == result.classes
    assert any("empty class" in warning for warning in result.warnings)
    samples = read_shards(out)
    stored = [s for split in samples.values() for s in split]
    paths = [s["meta"]["filename"] for s in stored]
    assert sorted(paths) == sorted(expected)  # each kept image exactly once, nothing else
    assert len({s["key"] for s in stored}) == len(stored)
    for sample in stored:
        relpath = sample["meta"]["filename"]
        assert sample["cls"] == sample["meta"]["label"] == classes.index(expected[relpath])
        assert sample["meta"]["class"] == expected[relpath]
        source = (tree / relpath).read_bytes()
        if relpath.endswith(".jpg"):
            assert sample["jpg"] == source  # byte for byte, no re-encoding
        else:
            assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (sample["meta"]["width"], sample["meta"]["height"]) == image.size == (40, 30)

    # Stratified split: round(8 * 0.25) = 2 validation images per class.
    assert Counter(s["meta"]["class"] for s in samples["validation"]) == dict.fromkeys(classes, 2)
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == len(samples["train"]) == 18
    assert all(n <= 4 for n in info["splits"]["train"]["shard_lengths"])
    assert info["class_counts"]["train"] == dict.fromkeys(classes, 6) == result.class_counts["train"]
    assert result.kept_jpeg == 21 and result.converted == 3 and not result.skipped
    # Shuffled across shards: the write order is not grouped by class.
    labels = [s["cls"] for s in samples["train"]]
    assert labels != sorted(labels)
    assert len({s["cls"] for s in samples["train"][:6]}) > 1


def test_output_is_identical_for_any_worker_count(tree: Path, tmp_path: Path) -> None:
    one = shardify(tree, tmp_path / "one" / "ds", workers=1, shard_count=5, progress=False)
    two = shardify(tree, tmp_path / "two" / "ds", workers=2, shard_count=5, progress=False)
    assert one.num_shards == two.num_shards
    for tar in sorted((tmp_path / "one" / "ds").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "two" / "ds" / tar.name).read_bytes()
    other_seed = shardify(tree, tmp_path / "seed1" / "ds", workers=1, shard_count=5, seed=1, progress=False)
    first = (tmp_path / "seed1" / "ds" / "ds-train-000000.tar").read_bytes()
    assert other_seed.num_samples == one.num_samples
    assert first != (tmp_path / "one" / "ds" / "ds-train-000000.tar").read_bytes()


def png_bomb_header(path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_bad_inputs_are_skipped_reported_and_set_the_exit_code(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    for n in range(4):
        write_image(src / "good" / f"{n}.jpg", n)
        write_image(src / "mixed" / f"{n}.jpg", 10 + n)
    bad = src / "mixed"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(write_image(tmp_path / "t.jpg", 99).read_bytes()[:-300])
    (bad / "notes.jpg").write_text("not an image")
    png_bomb_header(bad / "bomb.png")
    os.symlink(tmp_path / "nowhere.jpg", bad / "dangling.jpg")  # unreadable even for root
    os.mkfifo(bad / "pipe.jpg")  # must be skipped, not block the run
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("shardify hung on bad input"))
    signal.alarm(60)
    try:
        code = main([str(src), "--out", str(out), "--workers", "1", "--quiet", "--val-fraction", "0"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == EXIT_SKIPPED
    report = json.loads((out / "report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons == {
        "mixed/zero.jpg": "empty file", "mixed/truncated.jpg": "truncated", "mixed/notes.jpg": "not an image",
        "mixed/bomb.png": "decompression bomb", "mixed/dangling.jpg": "unreadable",
        "mixed/pipe.jpg": "not a regular file",
    }
    assert report["counts"]["skipped"] == 6 and report["counts"]["stored"] == 8
    stored = sorted(s["meta"]["filename"] for s in read_shards(out)["train"])
    assert stored == sorted([f"good/{n}.jpg" for n in range(4)] + [f"mixed/{n}.jpg" for n in range(4)])
    console = capsys.readouterr()
    assert "skipped 6 (" in console.out and "1 truncated" in console.out
    assert "mixed/bomb.png: decompression bomb" in console.err

    # --strict: the first skip fails the run and nothing is published; the old output stays.
    assert main([str(src), "--out", str(out), "--workers", "1", "--quiet", "--strict", "--overwrite"]) == EXIT_STRICT
    assert "--strict" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text()) == report
    assert not list(tmp_path.glob(".out.shardify-partial"))


def test_split_folders_are_used_as_given(tmp_path: Path) -> None:
    src = tmp_path / "ds"
    for split, count in (("train", 5), ("val", 2)):
        for name in ("a", "b"):
            for n in range(count):
                write_image(src / split / name / f"{n}.jpg", hash((split, name, n)) % 1000)
    write_image(src / "test" / "a" / "0.jpg", 1)  # ignored with a warning
    result = shardify(src, tmp_path / "out", val_fraction=0.5, workers=1, progress=False)
    assert result.num_samples == {"train": 10, "validation": 4}
    assert any("test" in warning for warning in result.warnings)
    samples = read_shards(tmp_path / "out")
    assert all(s["meta"]["filename"].startswith("val/") for s in samples["validation"])
    assert all(s["meta"]["filename"].startswith("train/") for s in samples["train"])

    (src / "validation").mkdir()
    assert main([str(src), "--out", str(tmp_path / "out2"), "--quiet"]) == EXIT_USAGE


def test_no_validation_split_when_fraction_is_zero(tree: Path, tmp_path: Path) -> None:
    shardify(tree, tmp_path / "out", val_fraction=0.0, workers=1, progress=False)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert list(info["splits"]) == ["train"] and info["splits"]["train"]["num_samples"] == 24
    assert len(info["splits"]["train"]["filenames"]) == 8  # --min-shards default


def test_symlink_loops_do_not_hang_and_count_files_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("a", "b"):
        for n in range(2):
            write_image(src / name / "sub" / f"{n}.jpg", n + (10 if name == "b" else 0))
    os.symlink("..", src / "a" / "sub" / "parent")  # a/sub/parent -> a
    os.symlink(".", src / "a" / "self")  # a/self -> a
    os.symlink("../..", src / "b" / "sub" / "root")  # b/sub/root -> src
    os.symlink(src / "b" / "sub", src / "b" / "alias")  # second path to b/sub
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("walk did not terminate"))
    signal.alarm(60)
    try:
        result = shardify(src, tmp_path / "out", val_fraction=0, workers=1, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.class_counts["train"] == {"a": 2, "b": 2}
    assert any("already walked" in warning for warning in result.warnings)


def test_output_safety_rules(tree: Path, tmp_path: Path, capsys) -> None:
    args = ["--workers", "1", "--quiet"]
    assert main([str(tree), "--out", str(tree / "shards"), *args]) == EXIT_USAGE
    assert "inside the source folder" in capsys.readouterr().err
    assert main([str(tree / "cat"), "--out", str(tree.parent), *args]) == EXIT_USAGE

    out = tmp_path / "out"
    assert main([str(tree), "--out", str(out), *args]) == EXIT_OK
    first_info = (out / "_info.json").read_text()
    assert main([str(tree), "--out", str(out), *args]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "_info.json").read_text() == first_info
    assert main([str(tree), "--out", str(out), "--seed", "3", "--overwrite", *args]) == EXIT_OK
    assert json.loads((out / "_info.json").read_text())["options"]["seed"] == 3
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out")) == [".out.shardify-lock"]

    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    assert main([str(tree), "--out", str(foreign), "--overwrite", *args]) == EXIT_USAGE
    assert (foreign / "thesis.txt").read_text() == "precious"
    assert main([str(tmp_path / "missing"), *args]) == EXIT_USAGE
    assert main([str(tree), "--val-fraction", "1.5", *args]) == EXIT_USAGE


def test_shards_read_back_with_webdataset_and_timm(tree: Path, tmp_path: Path) -> None:
    import timm.data
    import webdataset as wds

    out = tmp_path / "shards" / "photos"
    shardify(tree, out, val_fraction=0.25, shard_count=5, workers=1, progress=False)
    expected = read_shards(out)
    info = json.loads((out / "_info.json").read_text())

    urls = [str(out / name) for name in info["splits"]["train"]["filenames"]]
    plain = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json"))
    assert [(meta["filename"], label) for _, label, meta in plain] == [
        (s["meta"]["filename"], s["cls"]) for s in expected["train"]]
    assert all(image.mode == "RGB" and image.size == (40, 30) for image, _, _ in plain)

    for split in ("train", "validation"):
        dataset = timm.data.create_dataset("wds/photos", root=str(out), split=split, is_training=False,
                                           batch_size=1)
        items = list(dataset)
        assert [target for _, target in items] == [s["cls"] for s in expected[split]]
        image, _ = items[0]
        reference = np.asarray(Image.open(io.BytesIO(expected[split][0]["jpg"])).convert("RGB"))
        assert np.array_equal(np.asarray(image), reference)
    training = timm.data.create_dataset("wds/photos", root=str(out), split="train", is_training=True,
                                        batch_size=2, seed=0)
    assert len(training) >= 18
    assert {target for _, target in training} == {0, 1, 2}


def test_verify_passes_then_catches_a_truncated_shard(tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shardify(tree, out, shard_count=4, workers=1, progress=False)
    assert verify_output(out, workers=1, progress=False).ok
    assert main(["verify", str(out), "--workers", "1", "--quiet"]) == EXIT_OK
    assert "total" in capsys.readouterr().out  # the per-class table

    shard = out / "out-train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = verify_output(out, workers=1, progress=False)
    assert not result.ok
    assert any("out-train-000001.tar" in problem and "truncated" in problem for problem in result.problems)
    assert main(["verify", str(out), "--workers", "2", "--quiet"]) == EXIT_VERIFY_FAILED
    assert "FAILED" in capsys.readouterr().out

    # A damaged image inside a tar of the right length is caught by decoding it.
    shardify(tree, out, shard_count=4, workers=1, progress=False, overwrite=True)
    with tarfile.open(shard) as tar:
        image_offset = next(m.offset_data for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    data[image_offset: image_offset + 4] = b"JUNK"
    shard.write_bytes(bytes(data))
    problems = verify_output(out, workers=1, progress=False).problems
    assert problems and all("out-train-000001.tar" in problem for problem in problems)


def test_progress_in_a_log_file_is_plain_lines_with_eta(tree: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr is a file (SLURM, CI, nohup): no carriage-return frames, lines with the ETA, a final line each."""
    monkeypatch.delenv("LAUNCHER_PROGRESS", raising=False)  # the mode follows stderr
    monkeypatch.setenv("LAUNCHER_PROGRESS_INTERVAL", "0")  # a line per update: this job takes a second, not 30
    log_path = tmp_path / "job.err"
    with open(log_path, "w") as log_file:
        monkeypatch.setattr(sys, "stderr", log_file)
        code = main([str(tree), "--out", str(tmp_path / "out"), "--workers", "1", "--shard-count", "4", "--verify"])
        monkeypatch.undo()
    text = log_path.read_text()
    assert code == EXIT_OK and "\r" not in text
    images = len(source_images(tree))
    assert re.search(rf"^shardify: \d+/{images} img \(\d+%\), [\d.]+ img/s, ETA \d+:\d\d:\d\d$", text, re.M), text
    assert re.search(rf"^shardify: {images}/{images} img in \d+:\d\d:\d\d \([\d.]+ img/s\)$", text, re.M), text
    shards = len(list((tmp_path / "out").glob("*.tar")))
    assert re.search(rf"^verify: \d+/{shards} shard \(\d+%\), .*, ETA \d+:\d\d:\d\d$", text, re.M), text
    assert re.search(rf"^verify: {shards}/{shards} shard in ", text, re.M), text


def test_help_documents_every_exit_code(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes" in text and "shardify verify" in text
    for code in ("0", "1", "2", "3", "4", "5", "130"):
        assert re.search(rf"^\s+{code}\s+\S", text, re.MULTILINE), code


@pytest.mark.slow
def test_killed_run_leaves_nothing_complete_looking_and_keeps_the_old_output(tmp_path: Path) -> None:
    one_image = write_image(tmp_path / "one.png", 0, "PNG", size=(160, 120))
    src = tmp_path / "big"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        for n in range(600):
            os.link(one_image, src / name / f"{n}.png")  # 1,200 files that all need converting
    small = tmp_path / "small"
    for n in range(3):
        write_image(small / "x" / f"{n}.jpg", n)
    out = tmp_path / "shards" / "ds"
    shardify(small, out, val_fraction=0, workers=1, progress=False)
    old_listing, old_info = sorted(p.name for p in out.iterdir()), (out / "_info.json").read_text()

    command = [sys.executable, "-m", "launcher.shardify", str(src), "--out", str(out), "--overwrite",
               "--workers", "2", "--shard-count", "10", "--quiet"]
    staging = out.parent / ".ds.shardify-partial"
    with open(tmp_path / "log.txt", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 300
        try:
            while len(list(staging.glob("*.tar.tmp"))) < 3:  # some shards finished, most not
                assert process.poll() is None, "shardify finished before it could be killed"
                assert time.monotonic() < deadline, "shardify made no progress"
                time.sleep(0.005)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the run and its worker processes
            process.wait()
    leftovers = sorted(p.name for p in staging.iterdir())
    assert leftovers and all(name.endswith(".tar.tmp") for name in leftovers), leftovers
    assert [p for p in tmp_path.rglob("_info.json*") if p != out / "_info.json"] == []
    assert sorted(p.name for p in out.iterdir()) == old_listing  # the old output is untouched
    assert (out / "_info.json").read_text() == old_info
    assert verify_output(out, workers=1, progress=False).ok

    # The next run clears the leftovers and completes.
    assert main([str(src), "--out", str(out), "--overwrite", "--workers", "1", "--shard-count", "100",
                 "--quiet", "--val-fraction", "0"]) == EXIT_OK
    assert not staging.exists()
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["num_samples"] == 1200


def test_old_output_moved_aside_by_a_killed_publish_is_restored(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shardify(tree, out, workers=1, progress=False)
    aside = tmp_path / ".out.shardify-old"
    out.rename(aside)  # the state a kill between the two renames of publish leaves
    assert main([str(tree), "--out", str(out), "--quiet", "--workers", "1"]) == EXIT_USAGE  # restored, so it exists
    assert not aside.exists() and verify_output(out, workers=1, progress=False).ok


def test_shipped_digits_are_scikit_learns() -> None:
    """The demo's digit scans ship with the package; they are exactly scikit-learn's load_digits()."""
    from sklearn.datasets import load_digits as sklearn_digits

    from launcher.data.sample_data import load_digits

    images, targets = load_digits()
    reference = sklearn_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == reference.images.dtype
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(targets, reference.target)


@pytest.mark.slow
def test_demo_command_runs_end_to_end(tmp_path: Path, capsys) -> None:
    from launcher.demo import main as demo_main

    assert demo_main(["--workdir", str(tmp_path / "demo"), "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1797 samples verified" in out
    top1 = float(re.search(r"demo: OK, validation top-1 ([0-9.]+)%", out).group(1))
    assert top1 >= 50.0, out  # 10 classes: chance is 10 %; the demo reaches ~85 % in 4 short epochs
    assert f"demo: report: {tmp_path / 'demo' / 'train' / 'report.html'}" in out
