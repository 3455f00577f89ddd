"""`baton init` with each record placement, as a new user runs it, then `baton status DISK --json`.

tail on a raw sparse image, file inside ext4 and xfs images, and a slot on a record disk. After a file-placement
init the file system must still check clean and mount, the record must really live in /.baton/record, and the
record must be found again without mounting anything (a `mount` that fails and leaves a trace is put first in
PATH while status and attach run). Every test uses its own BATON_RUN_DIR/BATON_DEV_DIR and a random name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import need_root, need_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20
STATUS_KEYS = ("placement", "chunk_size", "owner", "epoch", "dirty_chunks", "lineage", "last_backup")


class Env:
    """A scratch directory with private run/dev dirs, and a `baton` runner."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = os.environ | {"BATON_RUN_DIR": str(root / "run"), "BATON_DEV_DIR": str(root / "dev")}
        self.names: list[str] = []

    def name(self) -> str:
        n = f"rp-{uuid.uuid4().hex[:10]}"
        self.names.append(n)
        return n

    def baton(self, *args: str, rc: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=120,
                           env=env or self.env)
        assert r.returncode == rc, f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n{r.stdout}{r.stderr}"
        return r

    def json(self, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.baton(*args, "--json", env=env).stdout)
        return out

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


def no_mount_env(e: Env) -> tuple[dict[str, str], Path]:
    """An environment whose `mount` fails and leaves a trace file: proves a command never mounts."""
    bindir = e.root / "nomount"
    bindir.mkdir(exist_ok=True)
    trace = e.root / "mount-called"
    for tool in ("mount", "umount"):
        p = bindir / tool
        p.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {trace}\nexit 32\n")
        p.chmod(0o755)
    return e.env | {"PATH": f"{bindir}:{os.environ['PATH']}"}, trace


def check_status(st: dict[str, Any], placement: str, chunk: int) -> None:
    for k in STATUS_KEYS:
        assert k in st, f"status lacks {k}: {sorted(st)}"
    assert st["placement"] == placement
    assert st["chunk_size"] == chunk
    assert st["owner"] is None and st["epoch"] == 0
    assert st["dirty_chunks"] == 0
    assert str(uuid.UUID(st["lineage"])) == st["lineage"]
    assert st["last_backup"] is None
    assert st["clean"] is True and st["problems"] == []


def on_mounted(disk: Path, script: str, *, ro: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with $m = ``disk`` mounted in a private mount namespace, on a loop device of our own
    (set up explicitly: `mount -o loop` scans every loop's backing file and can hang on a dead FUSE one)."""
    loop = subprocess.run(["losetup", "--find", "--show", str(disk)], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    try:
        opt = "-o ro " if ro else ""
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
             f"m=$(mktemp -d); mount {opt}{loop} $m; trap 'umount $m; rmdir $m' EXIT; {script}"],
            capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)


def attach_write_detach(e: Env, disk: Path, *, record: str | None, data_offset: int | None, node: str) -> int:
    """Attach (FUSE), optionally write one 4 KiB block at ``data_offset`` through the device, detach.
    Returns the epoch the attach got."""
    name = e.name()
    args = ["attach", str(disk), "--node", node, "--name", name]
    if record:
        args += ["--record", record]
    res = e.json(*args)
    try:
        if data_offset is not None:
            fd = os.open(res["device"], os.O_WRONLY)
            try:
                os.pwrite(fd, b"\xa5" * 4096, data_offset)
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        e.baton("detach", name)
    return int(res["epoch"])


def test_tail_on_raw_sparse_image(env: Env) -> None:
    disk = sparse(env.root / "raw.img", 64 * MiB)
    out = env.json("init", str(disk), "--chunk-size", "128K")
    assert out["placement"] == "tail" and out["record"] == "tail"
    assert out["data_size"] < 64 * MiB and out["data_size"] % (128 << 10) == 0
    st = env.json("status", str(disk))
    check_status(st, "tail", 128 << 10)
    assert st["disk_size"] == 64 * MiB and st["data_size"] == out["data_size"]
    # The record is at the tail: the data area is still all zeros, the last MiB is not.
    with open(disk, "rb") as f:
        assert not any(f.read(out["data_size"]))
        assert f.read().find(b"BATONREC") >= 0
    # Use it: one write through the tracked device shows up as one dirty chunk, owner and epoch recorded.
    epoch = attach_write_detach(env, disk, record=None, data_offset=3 * (128 << 10) + 4096, node="n1")
    st = env.json("status", str(disk))
    assert (st["epoch"], st["owner"], st["dirty_chunks"], st["clean"]) == (epoch, "n1", 1, True) and epoch == 1
    assert st["lineage"] == out["lineage"]


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_file_placement(env: Env, fs: str) -> None:
    need_tool(f"mkfs.{fs}", "debugfs" if fs == "ext4" else "xfs_db", "e2fsck" if fs == "ext4" else "xfs_repair",
              "lsattr")
    size = 64 * MiB if fs == "ext4" else 320 * MiB  # mkfs.xfs refuses file systems under 300 MB
    disk = sparse(env.root / f"{fs}.img", size)
    mkfs = ["mkfs.ext4", "-F", "-q", "-b", "4096"] if fs == "ext4" else ["mkfs.xfs", "-f", "-q"]
    subprocess.run([*mkfs, str(disk)], check=True, capture_output=True, timeout=120)
    fs_uuid = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", str(disk)], capture_output=True,
                             text=True, check=True).stdout.strip()
    # Put a file there first: the init must not disturb existing data.
    r = on_mounted(disk, "head -c 1000000 /dev/urandom > $m/payload; sha256sum $m/payload | cut -d' ' -f1")
    assert r.returncode == 0, r.stderr
    payload_sum = r.stdout.strip()

    out = env.json("init", str(disk))  # default placement for ext4/xfs is file
    assert out["placement"] == "file" and out["fs_uuid"] == fs_uuid and out["data_size"] == size

    def fsck_clean() -> None:
        cmd = ["e2fsck", "-fn", str(disk)] if fs == "ext4" else ["xfs_repair", "-n", str(disk)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{cmd} after init: rc {r.returncode}\n{r.stdout}{r.stderr}"

    fsck_clean()
    # Found again without mounting: status and attach with a `mount` that fails and leaves a trace.
    nm_env, trace = no_mount_env(env)
    st = env.json("status", str(disk), env=nm_env)
    check_status(st, "file", 64 << 10)
    assert st["lineage"] == out["lineage"]
    name = env.name()
    res = env.json("attach", str(disk), "--node", "n1", "--name", name, env=nm_env)
    assert res["epoch"] == 1
    env.baton("detach", name, env=nm_env)
    assert not trace.exists(), f"something mounted: {trace.read_text()}"
    st = env.json("status", str(disk), env=nm_env)
    assert (st["placement"], st["epoch"], st["owner"], st["clean"]) == ("file", 1, "n1", True)

    # The raw record writes went into the pinned file's extents, nowhere else: still clean, still mounts, the
    # file holds the current header, is immutable, and the earlier payload is intact.
    fsck_clean()
    r = on_mounted(disk, "sha256sum $m/payload | cut -d' ' -f1; lsattr -d $m/.baton/record | cut -c1-22; "
                   "stat -c %s $m/.baton/record; "
                   "dd if=$m/.baton/record bs=4096 count=1 iflag=direct 2>/dev/null | od -An -c | head -1", ro=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == payload_sum
    assert "i" in lines[1].split()[0], f"record file not immutable: {lines[1]!r}"
    assert int(lines[2]) >= out["record_size"]
    assert "B   A   T   O   N   R   E   C" in lines[3]


def test_external_slot_on_record_disk(env: Env) -> None:
    rdisk = sparse(env.root / "rdisk.img", 32 * MiB)
    fmt = env.json("init", str(rdisk), "--record-disk", "--slots", "3", "--slot-size", "8M")  # v3: era region too
    assert fmt["slots"] == 3 and fmt["slot_size"] == 8 * MiB
    d1 = sparse(env.root / "d1.img", 64 * MiB)
    d2 = sparse(env.root / "d2.img", 96 * MiB)
    out1 = env.json("init", str(d1), "--record", f"external:{rdisk}")
    out2 = env.json("init", str(d2), "--record", f"external:{rdisk}", "--chunk-size", "256K")
    assert out1["record"] == f"external:{rdisk}#0" and out2["record"] == f"external:{rdisk}#1"
    assert out1["data_size"] == 64 * MiB  # the data disk is not shrunk ...
    for d in (d1, d2):
        with open(d, "rb") as f:
            assert not any(f.read())  # ... and never written
    st1 = env.json("status", str(d1), "--record", f"external:{rdisk}")
    st2 = env.json("status", str(d2), "--record", f"external:{rdisk}#1")
    check_status(st1, "external", 64 << 10)
    check_status(st2, "external", 256 << 10)
    assert st1["lineage"] != st2["lineage"] and st1["disk_uuid"] != st2["disk_uuid"]
    # Without --record the disk alone has no record (nothing was written to it), and says where to look.
    r = env.baton("status", str(d1), "--json", rc=4)
    assert "record-disk" in r.stderr.lower() or "external" in r.stderr
    # Attach through the slot, write, detach: only d1's slot changes.
    epoch = attach_write_detach(env, d1, record=f"external:{rdisk}", data_offset=5 * (64 << 10), node="n2")
    st1 = env.json("status", str(d1), "--record", f"external:{rdisk}")
    st2b = env.json("status", str(d2), "--record", f"external:{rdisk}")
    assert (st1["epoch"], st1["owner"], st1["dirty_chunks"]) == (epoch, "n2", 1)
    assert st2b == st2
