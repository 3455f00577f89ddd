"""Restore to a real block device (a loop device): zeros written, busy and small targets refused."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import blake3
import pytest

from baton.errors import DeviceBusy, DeviceError
from baton.repo import BackupWriter, DiskIdentity, Repository
from baton.restore import restore
from conftest import need_root, need_tool

pytestmark = pytest.mark.integration
CS = 65536


@pytest.fixture
def loopdev() -> Iterator[tuple[str, str]]:
    """(loop device, scratch dir) over a 4 MiB file pre-filled with 0xAA; detached in finally."""
    need_root()
    need_tool("losetup", "mkfs.ext4", "mount", "umount")
    scratch = tempfile.mkdtemp(prefix="repo-eng-loop-")
    backing = os.path.join(scratch, "backing.img")
    with open(backing, "wb") as f:
        f.write(b"\xaa" * (4 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", backing], check=True, capture_output=True, text=True,
                         timeout=30).stdout.strip()
    try:
        yield dev, scratch
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=30)
        for name in os.listdir(scratch):
            p = os.path.join(scratch, name)
            if os.path.isdir(p):
                os.rmdir(p)
            else:
                os.unlink(p)
        os.rmdir(scratch)


def _snapshot(tmp_path, size: int):  # type: ignore[no-untyped-def]
    repo = Repository.init(str(tmp_path / "repo"))
    disk = DiskIdentity("blk", size, CS)
    img = bytearray(size)
    img[0:CS] = os.urandom(CS)
    img[5 * CS:6 * CS] = b"z" * CS
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    for i in range(disk.chunk_count):
        w.put(i, bytes(img[i * CS:(i + 1) * CS]))
    return repo, w.commit({}), bytes(img)


def test_restore_to_loop_device_writes_zero_chunks(loopdev, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dev, _ = loopdev
    repo, m, img = _snapshot(tmp_path, 2 << 20)
    res = restore(repo, m, dev, digest=True)
    assert res.target_kind == "block" and res.bytes_written == len(img)
    with open(dev, "rb") as f:
        got = f.read(len(img))
        rest = f.read()
    assert got == img                                   # old 0xAA bytes in zero chunks were overwritten
    assert rest == b"\xaa" * len(rest)                  # beyond the disk size nothing was touched
    assert res.image_digest == blake3.blake3(img).hexdigest()


def test_restore_refuses_small_device(loopdev, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dev, _ = loopdev
    repo, m, _img = _snapshot(tmp_path, 8 << 20)
    with pytest.raises(DeviceError, match="needs"):
        restore(repo, m, dev)


def test_restore_refuses_mounted_device_and_attached_file(loopdev, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dev, scratch = loopdev
    repo, m, _img = _snapshot(tmp_path, 1 << 20)
    with pytest.raises(DeviceBusy, match="attached"):
        restore(repo, m, os.path.join(scratch, "backing.img"))
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=60)
    mnt = os.path.join(scratch, "mnt")
    os.mkdir(mnt)
    subprocess.run(["mount", dev, mnt], check=True, timeout=30)
    try:
        with pytest.raises(DeviceBusy, match="mounted"):
            restore(repo, m, dev)
    finally:
        subprocess.run(["umount", mnt], check=False, timeout=30)
