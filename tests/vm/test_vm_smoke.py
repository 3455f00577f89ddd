"""Smoke tests of the VM tier itself: the guests have what the dm frontend needs, dm-era behaves as the notes
measured, two guests see one disk, and this checkout's Baton runs inside a guest.

One guest (module scope) serves the single-guest checks; the shared-disk check boots its own pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from vm.harness import Guest, VmCluster
from vm.image import REQUIRED_TARGETS, Image

SEED = int(os.environ.get("BATON_SEED", "20261124"))
ERA_BLOCK = 64 * 1024           # era block size: 128 sectors
META_SECTORS = 16384            # 8 MiB of era metadata at the start of /dev/vda
DISK_MIB = 64


@pytest.fixture(scope="module")
def guest(vm_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    with VmCluster(tmp_path_factory.mktemp("vm-smoke"), disk_mib=DISK_MIB, guests=("S",),
                   image=vm_image) as c:
        yield c.boot("S")[0]


def _blocks(xml: str) -> set[int]:
    """The era blocks an era_invalidate listing names (``<block block="N"/>``, ``<range begin= end=>``)."""
    out = {int(m) for m in re.findall(r'<block\s+block\s*=\s*"(\d+)"', xml)}
    for b, e in re.findall(r'<range\s+begin\s*=\s*"(\d+)"\s+end\s*=\s*"(\d+)"', xml):
        out.update(range(int(b), int(e)))
    return out


def _era_status(g: Guest, dev: str) -> tuple[int, str]:
    """(current era, held metadata snapshot root or '-') from `dmsetup status` of an era device."""
    f = g.run(f"dmsetup status {dev}").out.split()
    assert f[2] == "era", f
    return int(f[5]), f[6]


def test_guest_has_the_device_mapper_targets(guest: Guest) -> None:
    targets = {line.split()[0] for line in guest.run("dmsetup targets").out.splitlines() if line.strip()}
    missing = set(REQUIRED_TARGETS) - targets
    assert not missing, f"targets missing in the guest: {missing} (has {sorted(targets)})"
    # The tools the dm frontend drives, from the host's root, and the devices they need.
    guest.run("command -v era_invalidate && command -v losetup && test -c /dev/mapper/control && "
              "test -c /dev/loop-control && test -c /dev/fuse && test -b /dev/nbd0")


def test_era_lists_exactly_the_blocks_written_before_the_metadata_snapshot(guest: Guest) -> None:
    rng = random.Random(SEED)
    data_blocks = (DISK_MIB * 2048 - META_SECTORS) * 512 // ERA_BLOCK
    before = sorted(rng.sample(range(data_blocks), 6))
    after = rng.choice([b for b in range(data_blocks) if b not in before])
    print(f"seed {SEED}: blocks written before the snapshot {before}, after it {after}")
    data_sectors = data_blocks * ERA_BLOCK // 512
    g = guest
    g.run(f"dd if=/dev/zero of=/dev/vda bs=1M count={META_SECTORS // 2048} oflag=direct status=none")
    g.run(f"dmsetup create smoke-meta --table '0 {META_SECTORS} linear /dev/vda 0' && "
          f"dmsetup create smoke-origin --table '0 {data_sectors} linear /dev/vda {META_SECTORS}' && "
          f"dmsetup create smoke-era --table '0 {data_sectors} era /dev/mapper/smoke-meta "
          f"/dev/mapper/smoke-origin {ERA_BLOCK // 512}'")
    try:
        # No udev in the guest: dmsetup made the node itself, and a /dev/baton/NAME link to it works.
        g.run("test -b /dev/mapper/smoke-era && mkdir -p /dev/baton && ln -sfn ../mapper/smoke-era "
              "/dev/baton/smoke && test -b /dev/baton/smoke")
        era0, held = _era_status(g, "smoke-era")
        assert held == "-"
        for b in before:
            g.run(f"dd if=/dev/urandom of=/dev/baton/smoke bs={ERA_BLOCK} count=1 seek={b} oflag=direct "
                  "status=none")
        g.run("dmsetup message smoke-era 0 take_metadata_snap")
        era1, held = _era_status(g, "smoke-era")
        assert era1 == era0 + 1 and held != "-", (era0, era1, held)
        g.run(f"dd if=/dev/urandom of=/dev/baton/smoke bs={ERA_BLOCK} count=1 seek={after} oflag=direct "
              "status=none")
        listing = g.run(f"era_invalidate --written-since {era0} --metadata-snapshot /dev/mapper/smoke-meta").out
        assert _blocks(listing) == set(before), listing
        assert _blocks(g.run(f"era_invalidate --written-since {era1} --metadata-snapshot "
                             "/dev/mapper/smoke-meta").out) == set()
        g.run("dmsetup message smoke-era 0 drop_metadata_snap")
        assert _era_status(g, "smoke-era")[1] == "-"
        # After a clean removal the metadata passes the offline check.
        g.run("dmsetup remove smoke-era && era_check /dev/mapper/smoke-meta")
    finally:
        g.run("rm -f /dev/baton/smoke; for d in smoke-era smoke-origin smoke-meta; do "
              "dmsetup remove $d 2>/dev/null; done; true", check=False)


def test_baton_runs_in_the_guest(guest: Guest) -> None:
    version = guest.baton("--version").out
    assert "baton" in version.lower(), version
    g = guest
    g.run("dd if=/dev/zero of=/dev/vda bs=1M count=1 oflag=direct status=none")
    out = g.baton("init", "/dev/vda", json=True)
    assert isinstance(out, dict), out
    # A second init without --force refuses (a record is there now), with a JSON error, not a traceback.
    err = g.baton("init", "/dev/vda", json=True, rc=None)
    assert "Traceback" not in json.dumps(err)


def test_two_guests_share_the_disk_through_a_power_loss(vm_image: Image, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    chunk = 1 << 20
    offsets = sorted(rng.sample(range(1, 60), 3))
    payload = {o: rng.randbytes(chunk) for o in offsets}
    print(f"seed {SEED + 1}: A writes 1 MiB at MiB offsets {offsets}")
    with VmCluster(tmp_path, disk_mib=DISK_MIB, guests=("A", "B"), image=vm_image) as c:
        for o, data in payload.items():
            (c.share / f"p{o}").write_bytes(data)
        a, b = c.boot("A", "B")
        # B reads the regions first, so its page cache holds the zeros: only O_DIRECT may see A's data later.
        for o in offsets:
            assert b.run(f"dd if=/dev/vda bs=1M skip={o} count=1 status=none | sha256sum").out.split()[0] == \
                hashlib.sha256(bytes(chunk)).hexdigest()
        for o in offsets:
            a.run(f"dd if=/mnt/share/p{o} of=/dev/vda bs=1M seek={o} oflag=direct,dsync conv=notrunc "
                  "status=none")
        a.kill()
        assert not a.running
        for o, data in payload.items():
            got = b.run(f"dd if=/dev/vda bs=1M skip={o} count=1 iflag=direct status=none | sha256sum").out
            assert got.split()[0] == hashlib.sha256(data).hexdigest(), f"B misses A's write at {o} MiB"
        # And the host sees the same bytes in the image file.
        with open(c.disk, "rb") as f:
            for o, data in payload.items():
                f.seek(o * chunk)
                assert f.read(chunk) == data
