"""Writes that bypass Baton (issue 9 defect 14; invariant 6): an operator mounts the RAW disk (not
/dev/baton/NAME), writes and unmounts while no Baton owner tracks it. The record keeps the file system's own
markers (ext4: s_kbytes_written, s_mtime, s_wtime, s_mnt_count; xfs: sb_lsn and the inode/block counters) from
the last detach or backup commit and compares them at the next attach of a cleanly detached record: the next
backup is then full with the reason "written while not attached". Writes through /dev/baton/NAME change the
markers too, but they are saved again at detach, so the backup after a normal attach/detach stays incremental.
A disk with no ext4/xfs cannot be checked, and `status` says so.

Mounts happen in short-lived private mount namespaces; loop devices are set up with `losetup --find --show` and
detached in finally blocks (only our own).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_root, need_tool
from faults.procs import Env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("blkid", "losetup", "unshare", "mount", "umount")
    e = Env(tmp_path, prefix="by")
    try:
        yield e
    finally:
        e.cleanup()


def fs_image(root: Path, fs: str, size: int = 300 * MiB) -> Path:
    need_tool(f"mkfs.{fs}", "debugfs" if fs == "ext4" else "xfs_db")
    img = root / f"{fs}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    opts = ["-F", "-q", "-b", "4096"] if fs == "ext4" else ["-f", "-q"]
    subprocess.run([f"mkfs.{fs}", *opts, str(img)], check=True, capture_output=True, timeout=120)
    return img


def write_through_mount(dev: str, what: str = "hello") -> None:
    """Mount ``dev`` in a private namespace, write a file, sync, unmount."""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                        f"m=$(mktemp -d); mount {dev} $m; head -c 200000 /dev/urandom > $m/{what}; "
                        f"sync -f $m/{what}; umount $m; rmdir $m"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def write_raw_image(img: Path, what: str = "bypass") -> None:
    """The operator's mistake: mount the raw disk (a loop device over the image), write, unmount."""
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    try:
        write_through_mount(loop, what)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_raw_mount_and_write_makes_the_next_backup_full(env: Env, fs: str) -> None:
    img = fs_image(env.root, fs)
    out = env.json("init", str(img))
    assert out["placement"] == "file" and out["format_version"] == 3
    check = out["bypass_check"]
    assert check["checkable"] is True and check["fs"] == fs, check
    repo = env.root / "repo"
    env.baton("repo", "init", str(repo))
    assert env.json("backup", str(img), "--repo", str(repo))["mode"] == "full"
    second = env.json("backup", str(img), "--repo", str(repo))
    assert second["mode"] == "incremental", second  # nothing bypassed Baton: stays incremental
    write_raw_image(img)
    st = env.json("status", str(img))
    assert st["bypass_check"]["changed"] is True, st["bypass_check"]
    assert "written while not attached" in st["bypass_check"]["why"]
    nxt = env.json("backup", str(img), "--repo", str(repo))
    assert nxt["mode"] == "full" and nxt["reason"].startswith("written while not attached"), nxt
    after = env.json("backup", str(img), "--repo", str(repo))
    assert after["mode"] == "incremental", after  # the full backup saved the markers again
    assert env.json("status", str(img))["written_while_not_attached"] is False


def test_takeover_after_a_raw_write_is_flagged_until_a_backup(env: Env) -> None:
    """The check happens at attach (the daemon's takeover), not only in offline backups: the flag is durable."""
    need_tool("fusermount3")
    if not Path("/dev/fuse").exists():
        pytest.skip("needs /dev/fuse")
    img = fs_image(env.root, "ext4")
    env.json("init", str(img))
    repo = env.root / "repo"
    env.baton("repo", "init", str(repo))
    env.json("backup", str(img), "--repo", str(repo))
    write_raw_image(img)
    name = env.name()
    env.json("attach", str(img), "--node", "n1", "--name", name)
    try:
        st = env.json("status", str(img))
        assert st["written_while_not_attached"] is True, st
    finally:
        env.baton("detach", name)
    # Detach saved the markers again, but the flag stays until a backup: the writes are still unread.
    nxt = env.json("backup", str(img), "--repo", str(repo))
    assert nxt["mode"] == "full" and nxt["reason"].startswith("written while not attached"), nxt


def test_writes_through_baton_then_detach_attach_stay_incremental(env: Env) -> None:
    """The negative case: the file system is written through /dev/baton/NAME (its markers change while Baton
    owns the disk), detached, attached again: no false alarm, the backup is incremental."""
    need_tool("fusermount3")
    if not Path("/dev/fuse").exists():
        pytest.skip("needs /dev/fuse")
    img = fs_image(env.root, "ext4")
    env.json("init", str(img))
    repo = env.root / "repo"
    env.baton("repo", "init", str(repo))
    env.json("backup", str(img), "--repo", str(repo))
    name = env.name()
    dev = env.json("attach", str(img), "--node", "n1", "--name", name)["device"]
    try:
        write_through_mount(dev, "tracked")
    finally:
        env.baton("detach", name)
    dev = env.json("attach", str(img), "--node", "n2", "--name", name)["device"]
    try:
        assert env.json("status", str(img))["written_while_not_attached"] is False
        write_through_mount(dev, "tracked2")
        res = env.json("backup", name, "--repo", str(repo))
        assert res["mode"] == "incremental", res
        assert res["chunks_read"] > 0
    finally:
        env.baton("detach", name)
    assert env.json("backup", str(img), "--repo", str(repo))["mode"] == "incremental"


def test_raw_disk_status_says_bypassing_writes_cannot_be_noticed(env: Env) -> None:
    img = env.root / "raw.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    env.json("init", str(img))
    check = env.json("status", str(img))["bypass_check"]
    assert check["checkable"] is False and check["fs"] is None, check
    assert "cannot be noticed" in check["why"], check
