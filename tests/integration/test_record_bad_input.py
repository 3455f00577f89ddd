"""Bad input (issue 2 §6): each gives a clear message, the exit code errors.EXIT_CODES assigns, and loses nothing.

"Loses nothing" is checked byte for byte: the images involved hash the same before and after the refused
command (or, for the reset, the data area does), and a record of another disk that was refused is untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import errors
from baton.format.record import BLOCK, crc32c, header_length
from conftest import need_root, need_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20


def code(cls: type[errors.BatonError]) -> int:
    """The exit code errors.EXIT_CODES gives ``cls`` (its nearest listed class)."""
    return errors.exit_code(cls("probe"))


DEVICE, RECORD = code(errors.DeviceError), code(errors.RecordError)


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = os.environ | {"BATON_RUN_DIR": str(root / "run"), "BATON_DEV_DIR": str(root / "dev")}
        self.names: list[str] = []

    def baton(self, *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=120,
                           env=self.env)
        assert r.returncode == rc, f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n{r.stdout}{r.stderr}"
        if rc:
            assert "Traceback" not in r.stderr, r.stderr
            assert r.stderr.startswith("baton: error: "), r.stderr
        return r

    def json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.baton(*args, "--json").stdout)
        return out

    def name(self) -> str:
        n = f"bi-{uuid.uuid4().hex[:8]}"
        self.names.append(n)
        return n

    def cleanup(self) -> None:
        for n in self.names:
            if (self.root / "run" / n / "daemon.json").exists():
                subprocess.run([sys.executable, "-m", "baton", "detach", n], capture_output=True, timeout=60,
                               env=self.env)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("blkid", "losetup", "unshare")
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.cleanup()


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def digest(path: Path, start: int = 0, end: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = (end if end is not None else os.path.getsize(path)) - start
        while left > 0:
            b = f.read(min(left, 4 * MiB))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def fill(path: Path, seed: int, size: int) -> None:
    """Deterministic non-zero data in the first ``size`` bytes (something that could be lost)."""
    with open(path, "r+b") as f:
        for i in range(0, size, MiB):
            f.seek(i)
            f.write(hashlib.sha256(f"{seed}:{i}".encode()).digest() * (MiB // 32))


def tail_disk(e: Env, name: str, size: int = 64 * MiB) -> tuple[Path, dict[str, Any]]:
    disk = sparse(e.root / name, size)
    out = e.json("init", str(disk), "--record", "tail")
    fill(disk, 1, 8 * MiB)
    return disk, out


# --------------------------------------------------------------------------------------------- another disk


def test_tail_record_copied_onto_another_disk_is_refused(env: Env) -> None:
    a, _ = tail_disk(env, "a.img", 64 * MiB)
    b = sparse(env.root / "b.img", 80 * MiB)
    fill(b, 2, 8 * MiB)
    with open(a, "rb") as fa, open(b, "r+b") as fb:
        fa.seek(-MiB, os.SEEK_END)
        fb.seek(-MiB, os.SEEK_END)
        fb.write(fa.read())
    before_a, before_b = digest(a), digest(b)
    for cmd in (["status", str(b), "--json"], ["attach", str(b), "--node", "n1", "--name", env.name()],
                ["backup", str(b), "--repo", str(env.root / "repo")]):
        r = env.baton(*cmd, rc=RECORD)
        assert "67108864" in r.stderr and "83886080" in r.stderr, r.stderr  # names both sizes
        assert "belongs to another disk" in r.stderr, r.stderr
    # init without --force keeps it (the user must say they mean it)
    env.baton("init", str(b), rc=RECORD)
    assert (digest(a), digest(b)) == (before_a, before_b)


def test_file_record_on_a_grown_copy_of_the_disk_is_refused(env: Env) -> None:
    need_tool("mkfs.ext4", "debugfs")
    a = sparse(env.root / "fa.img", 64 * MiB)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", str(a)], check=True, capture_output=True, timeout=60)
    env.baton("init", str(a), "--record", "file")
    b = env.root / "fb.img"
    subprocess.run(["cp", "--sparse=always", str(a), str(b)], check=True, timeout=60)
    with open(b, "r+b") as f:
        f.truncate(72 * MiB)  # the same file system and record file, on a disk of another size
    before = digest(b)
    for cmd in (["status", str(b), "--json"], ["attach", str(b), "--node", "n1", "--name", env.name()]):
        r = env.baton(*cmd, rc=code(errors.WrongDisk))
        assert "67108864" in r.stderr and "75497472" in r.stderr, r.stderr
    assert digest(b) == before
    assert env.json("status", str(a))["placement"] == "file"


def test_record_disk_slot_used_with_the_wrong_data_disk(env: Env) -> None:
    rdisk = sparse(env.root / "rdisk.img", 32 * MiB)
    env.baton("init", str(rdisk), "--record-disk", "--slots", "2", "--slot-size", "8M")  # v3: with its era region
    d1 = sparse(env.root / "d1.img", 64 * MiB)
    d2 = sparse(env.root / "d2.img", 80 * MiB)
    env.baton("init", str(d1), "--record", f"external:{rdisk}#0")
    before = digest(rdisk), digest(d2)
    spec = f"external:{rdisk}#0"
    r = env.baton("status", str(d2), "--record", spec, "--json", rc=code(errors.WrongDisk))
    assert "slot 0" in r.stderr and "another disk" in r.stderr and "83886080" in r.stderr, r.stderr
    env.baton("attach", str(d2), "--node", "n1", "--name", env.name(), "--record", spec, rc=RECORD)
    # Without a slot number: no slot matches this disk.
    r = env.baton("status", str(d2), "--record", f"external:{rdisk}", rc=RECORD)
    assert "no slot" in r.stderr, r.stderr
    assert (digest(rdisk), digest(d2)) == before
    st = env.json("status", str(d1), "--record", spec)
    assert (st["epoch"], st["owner"]) == (0, None)


# --------------------------------------------------------------------------------------------- header damage


def _patch_headers(disk: Path, record_offset: int, patch: Any) -> None:
    with open(disk, "r+b") as f:
        for copy in (0, 1):
            f.seek(record_offset + copy * BLOCK)
            blk = bytearray(f.read(BLOCK))
            patch(blk)
            f.seek(record_offset + copy * BLOCK)
            f.write(blk)


def test_unsupported_version_is_refused_and_nothing_changes(env: Env) -> None:
    disk, out = tail_disk(env, "v.img")

    def to_v4(blk: bytearray) -> None:
        end = header_length(3) - 4
        struct.pack_into("<H", blk, 8, 4)  # version
        struct.pack_into("<I", blk, end, crc32c(bytes(blk[:end])))  # valid CRC: only the version is wrong

    _patch_headers(disk, out["data_size"], to_v4)
    before = digest(disk)
    r = env.baton("status", str(disk), "--json", rc=code(errors.RecordVersionError))
    assert "version 4 is not supported" in r.stderr and "1..3" in r.stderr, r.stderr
    assert "upgrade" in r.stderr, r.stderr
    env.baton("attach", str(disk), "--node", "n1", "--name", env.name(), rc=RECORD)
    env.baton("backup", str(disk), "--repo", str(env.root / "repo"), rc=RECORD)
    env.baton("init", str(disk), rc=RECORD)  # not silently replaced
    assert digest(disk) == before


def test_both_header_copies_corrupt_then_reset_then_full_backup(env: Env) -> None:
    disk, out = tail_disk(env, "c.img")
    data_size = out["data_size"]
    # Some history first: a backup, so the reset visibly starts a new lineage.
    repo = env.root / "repo"
    env.baton("repo", "init", str(repo))
    first = env.json("backup", str(disk), "--repo", str(repo))
    assert first["mode"] == "full"

    def smash(blk: bytearray) -> None:
        blk[40:48] = b"\xde\xad\xbe\xef" * 2  # inside the checksummed body; magic and version intact

    _patch_headers(disk, data_size, smash)
    before = digest(disk)
    for cmd in (["status", str(disk), "--json"], ["attach", str(disk), "--node", "n1", "--name", env.name()],
                ["backup", str(disk), "--repo", str(repo)]):
        r = env.baton(*cmd, rc=code(errors.RecordCorrupt))
        assert "both copies of the record header are damaged" in r.stderr, r.stderr
        assert "checksum mismatch" in r.stderr  # why
        assert "baton init --reset" in r.stderr and "full" in r.stderr  # what to do, and what it costs
    assert digest(disk) == before
    data_before = digest(disk, 0, data_size)
    env.baton("init", str(disk), rc=RECORD)  # a plain init does not paper over it
    reset = env.json("init", str(disk), "--reset")
    assert reset["reset"] is True and reset["lineage"] != out["lineage"] and reset["placement"] == "tail"
    assert reset["data_size"] == data_size
    assert digest(disk, 0, data_size) == data_before  # the data is untouched
    nxt = env.json("backup", str(disk), "--repo", str(repo))
    assert nxt["mode"] == "full" and nxt["reason"].startswith("record reset"), nxt
    st = env.json("status", str(disk))
    assert st["last_backup"]["snapshot"] == nxt["snapshot"] and st["reset"] is False
    assert st["last_backup"]["reason"].startswith("record reset")


# --------------------------------------------------------------------------------------------- wrong disks


def test_disk_too_small(env: Env) -> None:
    disk = sparse(env.root / "tiny.img", 512 * 1024)
    r = env.baton("init", str(disk), rc=DEVICE)
    assert "too small" in r.stderr and "hint:" in r.stderr, r.stderr
    assert digest(disk) == digest(sparse(env.root / "zero.img", 512 * 1024))
    # A slot on a record disk too small for this data disk at this chunk size.
    rdisk = sparse(env.root / "rdisk.img", 8 * MiB)
    env.baton("init", str(rdisk), "--record-disk", "--slots", "1", "--slot-size", "1M")
    big = sparse(env.root / "big.img", 1 << 40)
    r = env.baton("init", str(big), "--record", f"external:{rdisk}", "--chunk-size", "4K", rc=RECORD)
    assert "needs" in r.stderr and "bytes" in r.stderr, r.stderr


def test_file_placement_on_unsupported_fs(env: Env) -> None:
    need_tool("mkfs.ext2")
    disk = sparse(env.root / "ext2.img", 64 * MiB)
    subprocess.run(["mkfs.ext2", "-F", "-q", str(disk)], check=True, capture_output=True, timeout=60)
    before = digest(disk)
    r = env.baton("init", str(disk), "--record", "file", rc=DEVICE)
    assert "ext2" in r.stderr and "ext4 or xfs" in r.stderr, r.stderr
    assert "--record tail" in r.stderr and "external" in r.stderr, r.stderr
    r = env.baton("init", str(disk), rc=DEVICE)  # the default refuses too (a tail would overwrite its end)
    assert "ext2" in r.stderr and "external" in r.stderr, r.stderr
    assert digest(disk) == before


def test_file_placement_on_unmountable_fs(env: Env) -> None:
    need_tool("mkfs.ext4", "e2fsck")
    disk = sparse(env.root / "broken.img", 64 * MiB)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", str(disk)], check=True, capture_output=True,
                   timeout=60)
    with open(disk, "r+b") as f:  # zero the group descriptor table: blkid still says ext4, mount refuses
        f.seek(4096)
        f.write(bytes(4096))
    assert "ext4" in subprocess.run(["blkid", "-p", str(disk)], capture_output=True, text=True).stdout
    before = digest(disk)
    r = env.baton("init", str(disk), rc=DEVICE)
    assert "cannot create the record file" in r.stderr and "cannot mount" in r.stderr, r.stderr
    assert "fsck" in r.stderr and "external" in r.stderr, r.stderr
    assert digest(disk) == before


def test_record_disk_without_free_slots(env: Env) -> None:
    rdisk = sparse(env.root / "rdisk.img", 16 * MiB)
    env.baton("init", str(rdisk), "--record-disk", "--slots", "1", "--slot-size", "8M")  # v3: with its era region
    d1 = sparse(env.root / "d1.img", 64 * MiB)
    d2 = sparse(env.root / "d2.img", 80 * MiB)
    env.baton("init", str(d1), "--record", f"external:{rdisk}")
    before = digest(rdisk)
    r = env.baton("init", str(d2), "--record", f"external:{rdisk}", rc=code(errors.RecordFull))
    assert "no free slot" in r.stderr and "all 1 used" in r.stderr and "hint:" in r.stderr, r.stderr
    assert digest(rdisk) == before
    assert env.json("status", str(d1), "--record", f"external:{rdisk}")["placement"] == "external"


# --------------------------------------------------------------------------------------------- in use


def test_device_in_use_mounted_or_attached(env: Env) -> None:
    need_tool("mkfs.ext4", "fusermount3")
    # Mounted: a block device (our own loop) mounted in a private namespace, `baton init` run inside it.
    img = sparse(env.root / "m.img", 64 * MiB)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", str(img)], check=True, capture_output=True, timeout=60)
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    try:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"m=$(mktemp -d); mount {loop} $m || exit 99; {sys.executable} -m baton init {loop}; rc=$?; "
             f"umount $m; rmdir $m; exit $rc"], capture_output=True, text=True, timeout=120, env=env.env)
        assert r.returncode == code(errors.DeviceBusy), r.stdout + r.stderr
        assert "in use" in r.stderr and "mounted at" in r.stderr, r.stderr
        with open(img, "rb") as f:  # (the mount itself writes to the ext4; Baton wrote nothing)
            f.seek(-MiB, os.SEEK_END)
            assert b"BATON" not in f.read()
        # The image itself is held by the loop device.
        before = digest(img)
        r = env.baton("init", str(img), "--record", "file", rc=code(errors.DeviceBusy))
        assert f"attached as {loop}" in r.stderr, r.stderr
        assert digest(img) == before
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)
    # Attached by Baton: init, init --reset, the record-disk format and an offline backup are all refused.
    disk, _ = tail_disk(env, "att.img")
    name = env.name()
    env.baton("attach", str(disk), "--node", "n1", "--name", name)
    before_rec = env.json("status", str(disk))
    for cmd in (["init", str(disk)], ["init", str(disk), "--reset"], ["init", str(disk), "--force"],
                ["init", str(disk), "--record-disk", "--force"]):
        r = env.baton(*cmd, rc=code(errors.DeviceBusy))
        assert "in use" in r.stderr or "already attached" in r.stderr, r.stderr
    after = env.json("status", str(disk))
    assert (after["lineage"], after["epoch"], after["disk_uuid"]) == (
        before_rec["lineage"], before_rec["epoch"], before_rec["disk_uuid"])
    env.baton("detach", name)


def test_file_record_refused_on_a_1k_block_ext4(env: Env) -> None:
    """A 1 KiB-block ext4 can place the record file off 4 KiB boundaries: a record write would then
    read-modify-write a 4 KiB block shared with file-system data. init refuses, suggests tail/external, and
    leaves the file system as it was."""
    need_tool("mkfs.ext4", "e2fsck")
    disk = sparse(env.root / "k1.img", 64 * MiB)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "1024", str(disk)], check=True, capture_output=True, timeout=60)
    # 64 MiB with 1 KiB blocks and a 300 KiB record file: ext4 places it in block group 0, after the 1 KiB
    # superblock and descriptors, which is not 4 KiB-aligned on the disk.
    r = env.baton("init", str(disk), "--record", "file", rc=code(errors.DeviceError))
    assert "4 KiB" in r.stderr and ("tail" in r.stderr or "external" in r.stderr), r.stderr
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout


# --------------------------------------------------------------------------------------------- reset identity


def _header_blocks(disk: Path) -> list[int]:
    """Byte offsets of the record-header blocks (magic b"BATONREC") in an image, found by scanning it."""
    out = []
    with open(disk, "rb") as f:
        pos = 0
        while True:
            b = f.read(4 * MiB)
            if not b:
                break
            for i in range(0, len(b), BLOCK):
                if b[i : i + 8] == b"BATONREC":
                    out.append(pos + i)
            pos += len(b)
    return out


def _smash_headers(disk: Path, offsets: list[int]) -> None:
    with open(disk, "r+b") as f:
        for off in offsets:
            f.seek(off + 40)
            f.write(b"\xde\xad\xbe\xef" * 2)  # inside the checksummed body


@pytest.mark.parametrize("placement", ["tail", "file", "external"])
def test_reset_after_both_headers_damaged_keeps_the_disk_identity(env: Env, placement: str) -> None:
    """Issue 9 defect 6: `init --reset` after both header copies are damaged keeps the disk UUID that the tail
    anchors (tail), the extent map (file) or the record-disk slot table (external) still hold, so the
    snapshots of the disk stay one disk; only the lineage is new and the next backup is full (record reset)."""
    disk = sparse(env.root / f"id-{placement}.img", 64 * MiB)
    args: list[str] = ["--record", placement]
    scan = disk
    if placement == "file":
        need_tool("mkfs.ext4", "debugfs")
        subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", str(disk)], check=True, capture_output=True,
                       timeout=60)
    elif placement == "external":
        scan = sparse(env.root / "id-rdisk.img", 32 * MiB)
        env.baton("init", str(scan), "--record-disk", "--slots", "2", "--slot-size", "8M")  # v3: era region too
        args = ["--record", f"external:{scan}"]
    out = env.json("init", str(disk), *args)
    repo = env.root / "repo"
    env.baton("repo", "init", str(repo))
    first = env.json("backup", str(disk), "--repo", str(repo), *args)
    assert first["disk_uuid"] == out["disk_uuid"]
    heads = _header_blocks(scan)
    assert len(heads) == 2, heads
    _smash_headers(scan, heads)
    env.baton("status", str(disk), *args, "--json", rc=code(errors.RecordCorrupt))
    reset = env.json("init", str(disk), *args, "--reset")
    assert reset["disk_uuid"] == out["disk_uuid"], (reset["disk_uuid"], out["disk_uuid"])
    assert reset["lineage"] != out["lineage"] and reset["reset"] is True
    nxt = env.json("backup", str(disk), "--repo", str(repo), *args)
    assert nxt["disk_uuid"] == out["disk_uuid"]
    assert nxt["mode"] == "full" and nxt["reason"].startswith("record reset"), nxt
