"""launcher.shardify.writer: hand-written tar members match the tarfile library byte for byte; shard
limits; temporary names until publish."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from launcher.shardify.writer import OutputError, OutputStaging, TarWriter, shard_prefix


def library_tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_shards_are_byte_identical_to_tarfile_output(tmp_path: Path) -> None:
    samples = [(f"train_{i:08d}", {"jpg": os.urandom(100 + 700 * i), "cls": str(i).encode(), "json": b"{}"})
               for i in range(7)]
    writer = TarWriter(tmp_path, "ds-train-block000000", max_samples=3)
    for key, members in samples:
        writer.write(key, members)
    records = writer.close()
    assert [(r.temp_name, r.samples) for r in records] == [
        ("ds-train-block000000-000.tar.tmp", 3), ("ds-train-block000000-001.tar.tmp", 3),
        ("ds-train-block000000-002.tar.tmp", 1)]
    for index, record in enumerate(records):
        chunk = samples[3 * index: 3 * index + 3]
        expected = library_tar([(f"{key}.{ext}", data) for key, members in chunk for ext, data in members.items()])
        written = (tmp_path / record.temp_name).read_bytes()
        assert written == expected
        assert record.bytes == len(written)


def test_size_limit_starts_a_new_shard_before_passing_it(tmp_path: Path) -> None:
    writer = TarWriter(tmp_path, "v", max_bytes=12_000)
    for i in range(6):
        writer.write(f"validation_{i:08d}", {"jpg": bytes(3000), "cls": b"0", "json": b"{}"})
    records = writer.close()
    # A sample takes 5,632 tar bytes (3 headers + 3,072 + 512 + 512 padded data): 3 would pass 12,000.
    assert [r.samples for r in records] == [2, 2, 2]
    with tarfile.open(tmp_path / "v-001.tar.tmp") as tar:
        assert tar.getnames()[0] == "validation_00000002.jpg"


def test_staging_publishes_atomically_and_cleans_up_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "shards" / "ds"
    with pytest.raises(RuntimeError), OutputStaging(out, overwrite=False) as staging:
        writer = TarWriter(staging.staging, "ds")
        writer.write("train_00000000", {"jpg": b"x", "cls": b"0", "json": b"{}"})
        raise RuntimeError("encoding failed")
    assert not out.exists() and not staging.staging.exists()

    with OutputStaging(out, overwrite=False) as staging:
        writer = TarWriter(staging.staging, "ds")
        writer.write("train_00000000", {"jpg": b"x", "cls": b"0", "json": b"{}"})
        records = writer.close()
        records[0].filename = "ds-train-000000.tar"
        with pytest.raises(OutputError, match="another shardify run"):
            OutputStaging(out, overwrite=True).__enter__()
        staging.publish(records, {"classes.json": ["a"]}, {"splits": {}})
    assert sorted(p.name for p in out.iterdir()) == ["_info.json", "classes.json", "ds-train-000000.tar"]


def test_shard_prefix_is_file_name_safe() -> None:
    assert shard_prefix("my photos.v2") == "my_photos_v2"
    assert shard_prefix("ünï-côdé") == "ünï-côdé"
    assert shard_prefix("...") == "dataset"


def test_output_lock_dies_with_the_run_not_with_its_forked_workers(tmp_path: Path) -> None:
    """A run SIGKILLed while a forked worker lives on (exiting, or orphaned) must not lock its output."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "shards" / "ds"
    child_pid = tmp_path / "child.pid"
    script = f"""
import multiprocessing, os, time
from pathlib import Path
from launcher.shardify.writer import OutputStaging
with OutputStaging(Path({str(out)!r}), overwrite=False):
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=False)
    worker.start()
    Path({str(child_pid)!r}).write_text(str(worker.pid))
    time.sleep(60)
"""
    run = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not child_pid.exists() or not child_pid.read_text():
            assert run.poll() is None and time.monotonic() < deadline, "the locking run did not start"
            time.sleep(0.05)
        with pytest.raises(OutputError, match="another shardify run"):  # the run itself holds the lock
            OutputStaging(out, overwrite=True).__enter__()
        run.send_signal(signal.SIGKILL)
        run.wait()
        os.kill(int(child_pid.read_text()), 0)  # the worker is still alive...
        with OutputStaging(out, overwrite=True):  # ...and the output is free
            pass
    finally:
        run.kill()
        if child_pid.exists() and child_pid.read_text():
            os.kill(int(child_pid.read_text()), signal.SIGKILL)


def test_forked_children_keep_the_descriptors_opened_after_a_run_ended(tmp_path: Path) -> None:
    """Only the locks still held are closed in a forked child; a reused descriptor number stays open."""
    with OutputStaging(tmp_path / "out", overwrite=False):
        pass
    fd = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o644)  # likely the lock's old number
    try:
        pid = os.fork()
        if pid == 0:  # the child: is the descriptor still open?
            try:
                os.fstat(fd)
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
