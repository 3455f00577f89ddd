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
