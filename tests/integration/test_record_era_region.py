"""The era region of a format-v3 record, on loop devices, in every placement: `baton init` zeroes its first
64 KiB, `Record.era_region()` maps it to the right physical bytes of the right device (the data disk for tail and
file, through the record file's extents in ext4 and xfs; the record disk for external), and it is disjoint from
the data area and from every other record structure: filled with a pattern through those extents, the record
still loads clean, the file system still checks clean with its files intact, the record file read through the
mounted file system shows the pattern at ``era_offset`` (the mapping is the file's own), and a takeover, marks
and a detach leave the pattern alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from baton.format.record import ANCHOR_BLOCKS, BLOCK, ERA_ALIGN, ERA_ZERO_BYTES, era_region_size
from baton.record.area import physical_extents
from baton.record.core import EraRegion, Record
from baton.record.placement import locate
from conftest import need_root, need_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20
PATTERN = b"\xa5\x5a\xc3\x3c"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    need_root()
    need_tool("losetup", "blkid", "unshare")
    return os.environ | {"BATON_RUN_DIR": str(tmp_path / "run"), "BATON_DEV_DIR": str(tmp_path / "dev")}


@contextmanager
def loop(image: Path) -> Iterator[str]:
    """A loop device of our own over ``image``, detached on the way out."""
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True,
                         timeout=30).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


def image(path: Path, size: int, fill: int | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            block = bytes([fill]) * MiB
            for _ in range(size // MiB):
                f.write(block)
    return path


def baton(env: dict[str, str], *args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "baton", *args, "--json"], capture_output=True, text=True,
                       timeout=240, env=env)
    assert r.returncode == 0, f"baton {' '.join(args)}: rc {r.returncode}\n{r.stdout}{r.stderr}"
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def pread(dev: str, offset: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def region_of(disk: str, record: str | None = None) -> tuple[EraRegion, Record, list[tuple[int, int]]]:
    """The era region, the record, and the physical extents of the record's own structures (blocks 0 ..
    geo.size), as found on ``disk``."""
    loc = locate(disk, record, writable=False)
    try:
        rec = loc.record
        region = rec.era_region()
        assert region is not None
        return region, rec, physical_extents(rec.area, 0, rec.geo.size)
    finally:
        loc.close()


def check_region(region: EraRegion, rec: Record, structures: list[tuple[int, int]], device: str) -> None:
    """The region covers exactly its size on ``device``, starts zeroed, and overlaps no structure."""
    h = rec.header
    assert region.device == device
    assert sum(n for _, n in region.extents) == region.size == h.era_size >= era_region_size(h.data_size,
                                                                                               h.chunk_size)
    assert h.era_offset % ERA_ALIGN == 0 and h.era_offset >= rec.geo.size
    assert h.era_offset + h.era_size == h.record_size  # the region ends the record area
    for i, (a, n) in enumerate(region.extents):
        assert a % BLOCK == 0 and n % BLOCK == 0
        if i:
            prev = region.extents[i - 1]
            assert prev[0] + prev[1] != a  # contiguous pieces are merged
        for b, m in structures:
            assert a + n <= b or b + m <= a, f"era extent {a}+{n} overlaps record structures at {b}+{m}"
    first, n = region.extents[0]
    assert n >= ERA_ZERO_BYTES and pread(device, first, ERA_ZERO_BYTES) == bytes(ERA_ZERO_BYTES)


def fill(region: EraRegion) -> None:
    """Write the pattern over the whole era region, as dm-era's metadata would, through its extents."""
    fd = os.open(region.device, os.O_WRONLY)
    try:
        for a, n in region.extents:
            for off in range(0, n, MiB):
                k = min(MiB, n - off)
                os.pwrite(fd, (PATTERN * (k // 4)), a + off)
        os.fsync(fd)
    finally:
        os.close(fd)


def holds_pattern(region: EraRegion) -> bool:
    return all(pread(region.device, a, n) == PATTERN * (n // 4) for a, n in region.extents)


def use_record(disk: str, record: str | None = None) -> None:
    """A takeover, marks all over the disk, a detach: every kind of record write."""
    loc = locate(disk, record, writable=True)
    try:
        rec = loc.record
        rec.attach("n1", "dm")
        rec.begin_era()
        rec.mark(range(0, rec.header.nchunks, 7))
        rec.set_era_folded(3, pending=False)
        rec.detach()
    finally:
        loc.close()


def sha(dev: str, offset: int, length: int) -> str:
    h = hashlib.sha256()
    fd = os.open(dev, os.O_RDONLY)
    try:
        pos = offset
        while pos < offset + length:
            b = os.pread(fd, min(4 * MiB, offset + length - pos), pos)
            assert b
            h.update(b)
            pos += len(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def test_tail_region_on_a_loop_device(env: dict[str, str], tmp_path: Path) -> None:
    size = 64 * MiB
    with loop(image(tmp_path / "tail.img", size, fill=0xFF)) as dev:
        out = baton(env, "init", dev)
        assert (out["placement"], out["format_version"]) == ("tail", 3)
        data_size = out["data_size"]
        assert data_size % MiB == 0  # v3: the data area ends on 1 MiB, so the record area starts aligned
        region, rec, structures = region_of(dev)
        h = rec.header
        assert region.extents == [(data_size + h.era_offset, h.era_size)]
        assert (data_size + h.era_offset) % ERA_ALIGN == 0 and data_size + h.record_size == size - ANCHOR_BLOCKS * BLOCK
        check_region(region, rec, structures, dev)
        assert out["era"] == {"offset": h.era_offset, "size": h.era_size, "folded": 0, "pending": False}
        # init wrote the superblock's 64 KiB of the region and nothing else of it, and nothing of the data area
        start = region.extents[0][0]
        assert pread(dev, start + ERA_ZERO_BYTES, 4 * BLOCK) == b"\xff" * 4 * BLOCK
        assert sha(dev, 0, data_size) == hashlib.sha256(b"\xff" * data_size).hexdigest()
        fill(region)
        anchors = pread(dev, size - ANCHOR_BLOCKS * BLOCK, ANCHOR_BLOCKS * BLOCK)
        st = baton(env, "status", dev)
        assert st["problems"] == [] and st["dirty_chunks"] == 0 and st["clean"] is True
        use_record(dev)
        assert holds_pattern(region)
        assert pread(dev, size - ANCHOR_BLOCKS * BLOCK, ANCHOR_BLOCKS * BLOCK) == anchors
        assert sha(dev, 0, data_size) == hashlib.sha256(b"\xff" * data_size).hexdigest()
        st = baton(env, "status", dev)
        assert st["problems"] == [] and st["era"]["folded"] == 3 and st["owner_frontend"] == "dm"


def _in_namespace(dev: str, script: str, *, ro: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with $m = ``dev`` mounted in a private mount namespace."""
    opt = "-o ro " if ro else ""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                           f"m=$(mktemp -d); mount {opt}{dev} $m; trap 'umount $m; rmdir $m' EXIT; {script}"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_file_region_on_a_loop_device(env: dict[str, str], tmp_path: Path, fs: str) -> None:
    need_tool(f"mkfs.{fs}", "debugfs" if fs == "ext4" else "xfs_db", "e2fsck" if fs == "ext4" else "xfs_repair")
    size = 64 * MiB if fs == "ext4" else 320 * MiB  # mkfs.xfs refuses file systems under 300 MB
    with loop(image(tmp_path / f"{fs}.img", size)) as dev:
        mkfs = ["mkfs.ext4", "-F", "-q", "-b", "4096"] if fs == "ext4" else ["mkfs.xfs", "-f", "-q"]
        subprocess.run([*mkfs, dev], check=True, capture_output=True, timeout=120)
        r = _in_namespace(dev, "head -c 3000000 /dev/urandom > $m/payload; sha256sum $m/payload | cut -d' ' -f1")
        assert r.returncode == 0, r.stderr
        payload = r.stdout.strip()
        out = baton(env, "init", dev)
        assert (out["placement"], out["format_version"]) == ("file", 3)
        region, rec, structures = region_of(dev)
        check_region(region, rec, structures, dev)
        h = rec.header
        # The region is the record file's tail: its extents are inside the file's own extents.
        assert all(any(e.physical <= a and a + n <= e.physical + e.length for e in rec.area.extents)  # type: ignore[attr-defined]
                   for a, n in region.extents)
        assert h.record_size == -(-rec.geo.size // ERA_ALIGN) * ERA_ALIGN + h.era_size  # the file's size
        fill(region)

        def fsck() -> None:
            cmd = ["e2fsck", "-fn", dev] if fs == "ext4" else ["xfs_repair", "-n", dev]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, f"{cmd}: rc {r.returncode}\n{r.stdout}{r.stderr}"

        fsck()
        use_record(dev)
        assert holds_pattern(region)
        fsck()
        # Read through the file system: the payload is intact, and the record file holds the pattern exactly at
        # era_offset .. era_offset + era_size (the extents are the file's own bytes), its header before that.
        r = _in_namespace(dev, f"sha256sum $m/payload | cut -d' ' -f1; "
                          f"dd if=$m/.baton/record bs=1M skip={h.era_offset // MiB} iflag=direct 2>/dev/null "
                          f"| sha256sum | cut -d' ' -f1; stat -c %s $m/.baton/record; "
                          "dd if=$m/.baton/record bs=4096 count=1 iflag=direct 2>/dev/null | head -c 8", ro=True)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        assert lines[0] == payload
        assert lines[1] == hashlib.sha256(PATTERN * (h.era_size // 4)).hexdigest()
        assert int(lines[2]) == h.record_size
        assert lines[3].startswith("BATONREC")
        st = baton(env, "status", dev)
        assert st["problems"] == [] and st["clean"] is True


def test_external_region_on_a_loop_device(env: dict[str, str], tmp_path: Path) -> None:
    slot = 16 * MiB
    with loop(image(tmp_path / "rdisk.img", 40 * MiB, fill=0xFF)) as rdisk, \
            loop(image(tmp_path / "d1.img", 64 * MiB)) as d1, loop(image(tmp_path / "d2.img", 96 * MiB)) as d2:
        baton(env, "init", rdisk, "--record-disk", "--slots", "2", "--slot-size", "16M")
        o1 = baton(env, "init", d1, "--record", f"external:{rdisk}")
        o2 = baton(env, "init", d2, "--record", f"external:{rdisk}")
        assert (o1["record"], o2["record"]) == (f"external:{rdisk}#0", f"external:{rdisk}#1")
        regions = []
        for i, d in enumerate((d1, d2)):
            region, rec, structures = region_of(d, f"external:{rdisk}")
            h = rec.header
            base = 2 * BLOCK + i * slot
            assert region.extents == [(base + h.era_offset, h.era_size)] and h.record_size == slot
            check_region(region, rec, structures, rdisk)
            start, _ = region.extents[0]
            assert pread(rdisk, start + ERA_ZERO_BYTES, BLOCK) == b"\xff" * BLOCK  # only the superblock zeroed
            regions.append(region)
        r1, r2 = regions
        assert r1.extents[0][0] + r1.size <= 2 * BLOCK + slot <= r2.extents[0][0]  # each inside its own slot
        fill(r1)
        before2 = pread(rdisk, r2.extents[0][0], r2.size)
        use_record(d1, f"external:{rdisk}")
        assert holds_pattern(r1) and pread(rdisk, r2.extents[0][0], r2.size) == before2
        for d in (d1, d2):
            st = baton(env, "status", d, "--record", f"external:{rdisk}")
            assert st["problems"] == []
            assert sha(d, 0, st["disk_size"]) == hashlib.sha256(bytes(st["disk_size"])).hexdigest()  # never written


def _run(env: dict[str, str], *args: str, rc: int) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == rc, f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n{r.stdout}{r.stderr}"
    return r


def test_v2_tail_record_stays_v2_on_reset_and_says_why_dm_cannot_use_it(env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """A tail record re-created in place keeps its area (the data before it is in use): a v2 record stays v2,
    and --upgrade and the dm frontend's message say what to run instead."""
    size = 64 * MiB
    with loop(image(tmp_path / "t2.img", size, fill=0x77)) as dev:
        out = baton(env, "init", dev, "--record-format", "2")
        assert out["format_version"] == 2 and out["era"] is None
        data_size = out["data_size"]
        before = sha(dev, 0, data_size)
        r = _run(env, "init", "--upgrade", dev, rc=4)
        assert "record format v2 has no era metadata region" in r.stderr and "tail record cannot grow" in r.stderr
        assert "--frontend fuse" in r.stderr, r.stderr
        again = baton(env, "init", "--reset", dev)
        assert (again["format_version"], again["data_size"], again["era"]) == (2, data_size, None)
        assert again["lineage"] != out["lineage"] and again["disk_uuid"] == out["disk_uuid"]
        r = _run(env, "init", "--reset", "--record-format", "3", dev, rc=3)  # asked for: refused, nothing shrinks
        assert "never shrinks the data area" in r.stderr, r.stderr
        assert sha(dev, 0, data_size) == before


def test_upgrade_in_place_on_a_record_disk_slot(env: dict[str, str], tmp_path: Path) -> None:
    """A v2 record in a record-disk slot with room is upgraded in place: lineage, history and changed chunks stay,
    the next backup is incremental, and the new era region starts zeroed."""
    with loop(image(tmp_path / "rd.img", 24 * MiB, fill=0xFF)) as rdisk, loop(image(tmp_path / "d.img", 64 * MiB)) as d:
        baton(env, "init", rdisk, "--record-disk", "--slots", "1", "--slot-size", "16M")
        spec = f"external:{rdisk}"
        out = baton(env, "init", d, "--record", spec, "--record-format", "2")
        assert out["format_version"] == 2
        repo = tmp_path / "repo"
        baton(env, "repo", "init", str(repo))
        first = baton(env, "backup", d, "--repo", str(repo), "--record", spec, "--node", "n1")
        assert first["mode"] == "full"
        loc = locate(d, spec, writable=True)  # a change after the backup, marked in the record
        try:
            loc.record.attach("n1")
            loc.record.mark([5, 6])
            loc.record.detach()
        finally:
            loc.close()
        up = baton(env, "init", "--upgrade", d, "--record", spec)
        assert up["upgraded"] is True and up["format_version"] == 3 and up["lineage"] == out["lineage"]
        assert up["dirty_chunks"] == 2
        assert up["last_backup"]["snapshot"] == first["snapshot"] and up["problems"] == []
        region, rec, structures = region_of(d, spec)
        check_region(region, rec, structures, rdisk)
        assert region.extents == [(2 * BLOCK + rec.header.era_offset, rec.header.era_size)]
        nxt = baton(env, "backup", d, "--repo", str(repo), "--record", spec, "--node", "n1")
        assert nxt["mode"] == "incremental" and nxt["chunks_read"] == 2
        again = _run(env, "init", "--upgrade", d, "--record", spec, rc=0)  # already v3: nothing to do
        assert "nothing to upgrade" in again.stdout and "format v3" in again.stdout, again.stdout
        assert baton(env, "init", "--upgrade", d, "--record", spec)["upgraded"] is False


def test_reset_recreates_a_v2_file_record_as_v3(env: dict[str, str], tmp_path: Path) -> None:
    need_tool("mkfs.ext4", "debugfs", "e2fsck")
    with loop(image(tmp_path / "f.img", 64 * MiB)) as dev:
        subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", dev], check=True, capture_output=True, timeout=120)
        out = baton(env, "init", dev, "--record-format", "2")
        assert out["format_version"] == 2
        r = _run(env, "init", "--upgrade", dev, rc=4)
        assert f"baton init --reset {dev}" in r.stderr and "record file has no room" in r.stderr, r.stderr
        again = baton(env, "init", "--reset", dev)
        assert again["format_version"] == 3 and again["disk_uuid"] == out["disk_uuid"]
        region, rec, structures = region_of(dev)
        check_region(region, rec, structures, dev)
        r = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
