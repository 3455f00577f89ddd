"""The ownership probe on real devices: it succeeds on a writable image and leaves every byte as it was, is
refused by a read-only loop device of the same disk, reports a vanished device as absent, and writes nothing
when the record is no longer where it was found."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baton.cluster import watch as w
from conftest import need_root, need_tool

BATON = Path(sys.executable).parent / "baton"
pytestmark = [pytest.mark.integration]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    need_root()
    need_tool("losetup", "blkid")
    img = tmp_path / "shared.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    env = {**os.environ, "BATON_RUN_DIR": str(tmp_path / "run")}
    subprocess.run([str(BATON), "init", str(img)], env=env, check=True, capture_output=True, timeout=60)
    return img


def test_probe_on_writable_image_changes_nothing(image: Path) -> None:
    before = digest(image)
    t = w.find_target(str(image))
    assert t.placement == "tail" and t.path == str(image)
    assert t.offset == t.record_offset + 2 * 4096
    for _ in range(3):
        assert w.probe(t) == w.ProbeResult(w.OWNER)
    assert digest(image) == before


def test_probe_refused_by_read_only_device(image: Path) -> None:
    loop = subprocess.run(["losetup", "--read-only", "--find", "--show", str(image)], capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()
    try:
        t, res = w.safe_find_target(loop)
        assert res is None and t is not None
        got = w.probe(t)
        assert got.outcome == w.REFUSED and got.errno != 0, got
    finally:
        subprocess.run(["losetup", "-d", loop], timeout=30, check=False)
    # The loop device is gone now: its path no longer names a device.
    gone = w.probe(t)
    assert gone.outcome == w.ABSENT, gone


def test_probe_absent_and_moved_record(image: Path, tmp_path: Path) -> None:
    t = w.find_target(str(image))
    before = digest(image)
    moved = w.probe(dataclasses.replace(t, record_offset=t.record_offset + 4096))
    assert moved.outcome == w.UNKNOWN and "not where it was" in moved.detail
    assert digest(image) == before
    os.rename(image, tmp_path / "elsewhere.img")
    assert w.probe(t).outcome == w.ABSENT
    t2, res = w.safe_find_target(str(image))
    assert t2 is None and res is not None and res.outcome == w.ABSENT


def _init(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "BATON_RUN_DIR": str(tmp_path / "run")}
    cp = subprocess.run([str(BATON), "init", *args], env=env, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr


def _block(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(4096)


def test_probe_block_is_the_write_once_block_in_every_placement(image: Path, tmp_path: Path) -> None:
    """The probe writes exactly the record's block 2: the extent map of a file record (inside ext4, found via
    its extents), zeros next to a tail record, and the slot's block 2 on a record disk for an external one."""
    need_tool("mkfs.ext4", "debugfs")
    # tail (the fixture): header blocks at header_offsets, block 2 blank
    t = w.find_target(str(image))
    assert t.header_offsets == (t.record_offset, t.record_offset + 4096)
    assert b"BATONREC" in [_block(str(image), h)[:8] for h in t.header_offsets]
    assert _block(str(image), t.offset) == bytes(4096)
    # file: an ext4 image; block 2 of the record file is the extent map
    fs_img = tmp_path / "fs.img"
    with open(fs_img, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(fs_img)], check=True, capture_output=True, timeout=60)
    _init(tmp_path, str(fs_img))
    tf = w.find_target(str(fs_img))
    assert tf.placement == "file" and tf.path == str(fs_img)
    # 4 KiB blocks: init refuses a file record that is not 4 KiB-aligned on the disk (1 KiB-block ext4).
    assert _block(str(fs_img), tf.offset)[:8] == b"BATONEXT"
    assert b"BATONREC" in [_block(str(fs_img), h)[:8] for h in tf.header_offsets]
    before = digest(fs_img)
    assert w.probe(tf).outcome == w.OWNER
    assert digest(fs_img) == before
    # external: the probe goes to the record disk, never to the data disk
    rdisk, data = tmp_path / "rdisk.img", tmp_path / "data.img"
    for p, size in ((rdisk, 32 << 20), (data, 32 << 20)):
        with open(p, "wb") as f:
            f.truncate(size)
    _init(tmp_path, str(rdisk), "--record-disk", "--slots", "2", "--slot-size", "8M")  # v3: with its era region
    _init(tmp_path, str(data), "--record", f"external:{rdisk}")
    te = w.find_target(str(data), f"external:{rdisk}")
    assert te.placement == "external" and te.path == str(rdisk)
    assert _block(str(rdisk), te.offset) == bytes(4096)
    assert b"BATONREC" in [_block(str(rdisk), h)[:8] for h in te.header_offsets]
    assert w.probe(te).outcome == w.OWNER
    assert digest(data) == hashlib.sha256(bytes(32 << 20)).hexdigest()
