"""baton.host without root: identity (hard links, symlinks), the one mountinfo parser, open descriptors and Baton
attachments compared by identity, and the DeviceBusy message and hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton import host
from baton.errors import DeviceBusy
from baton.host import attachments, identity, mounts

MOUNTINFO = (
    "36 35 98:0 /mnt1 /mnt\\040with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    "garbage line\n"
    "40 36 0:51 / /run/baton/d/fuse rw,nosuid,nodev shared:5 - fuse.baton baton:d rw,user_id=0\n"
    "41 36 7:3 / /srv/data rw - ext4 /dev/loop3 rw\n"
)


def test_identity_is_the_inode_not_the_path(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(b"x" * 4096)
    hard = tmp_path / "hard.img"
    os.link(f, hard)
    sym = tmp_path / "sym.img"
    sym.symlink_to(f)
    other = tmp_path / "other.img"
    other.write_bytes(b"x" * 4096)
    a = identity.of_path(str(f))
    assert a is not None and a.kind == identity.FILE
    assert identity.of_path(str(hard)) == a == identity.of_path(str(sym))
    assert identity.of_path(str(other)) != a
    assert identity.of_path(str(tmp_path / "missing")) is None
    assert identity.of_path(str(tmp_path)) is None  # a directory is not a disk


def test_block_identity_is_the_device_number() -> None:
    st = os.stat("/dev/null")  # a character device: not a disk
    assert identity.from_stat(st) is None
    assert identity.Identity.block(os.makedev(8, 16)) == identity.Identity(identity.BLOCK, os.makedev(8, 16))


def test_parse_mountinfo_keeps_ids_lines_and_unescapes() -> None:
    es = mounts.parse_mountinfo(MOUNTINFO)
    assert [(e.mount_id, e.dev, e.mountpoint, e.fstype, e.source) for e in es] == [
        (36, (98, 0), "/mnt with space", "ext3", "/dev/root"),
        (40, (0, 51), "/run/baton/d/fuse", "fuse.baton", "baton:d"),
        (41, (7, 3), "/srv/data", "ext4", "/dev/loop3"),
    ]
    assert es[0].root == "/mnt1" and es[2].line == MOUNTINFO.splitlines()[3]


def test_mount_holding_is_textual_longest_prefix() -> None:
    es = mounts.parse_mountinfo("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n" + MOUNTINFO)
    hit = mounts.mount_holding("/run/baton/d/fuse/../fuse/disk", es)
    assert hit is not None and hit.fstype == "fuse.baton"
    hit = mounts.mount_holding("/srv/database", es)
    assert hit is not None and hit.mountpoint == "/"


def test_our_mounts_are_read() -> None:
    root = mounts.mounted_at("/")
    assert root is not None and root.mountpoint == "/"
    assert any(e.mountpoint == "/" for _, e in mounts.all_mounts())


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    f = tmp_path / "held.img"
    f.write_bytes(b"\0" * 8192)
    p = subprocess.Popen([sys.executable, "-c", "import os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
                          "print('open', flush=True)\ntime.sleep(60)", str(f)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "open"
        yield f, p.pid
    finally:
        p.kill()
        p.wait(30)
        if p.stdout:
            p.stdout.close()


def test_open_file_found_through_a_hard_link_and_a_symlink(tmp_path: Path, holder: tuple[Path, int]) -> None:
    f, pid = holder
    hard = tmp_path / "hard.img"
    os.link(f, hard)
    sym = tmp_path / "sym.img"
    sym.symlink_to(hard)
    for p in (f, hard, sym):
        us = host.users(str(p))
        assert [(u.kind, u.pid) for u in us] == [(host.OPEN, pid)], us
        assert f"opened by pid {pid} (python" in str(us[0])
    with pytest.raises(DeviceBusy) as ei:
        host.check_not_in_use(str(sym), "restore")
    assert f"pid {pid}" in str(ei.value) and "restore refused" in str(ei.value)
    assert f"stop pid {pid}" in ei.value.hint


def test_a_copy_is_not_in_use(tmp_path: Path, holder: tuple[Path, int]) -> None:
    f, _ = holder
    copy = tmp_path / "copy.img"
    copy.write_bytes(f.read_bytes())
    assert host.users(str(copy)) == []
    host.check_not_in_use(str(copy), "init")
    assert host.users(str(tmp_path / "missing.img")) == []


def test_our_own_descriptors_do_not_count(tmp_path: Path) -> None:
    f = tmp_path / "mine.img"
    f.write_bytes(b"\0" * 4096)
    with open(f, "rb"):
        assert host.users(str(f)) == []


def test_baton_attachment_found_by_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            holder: tuple[Path, int]) -> None:
    f, pid = holder
    run = tmp_path / "run"
    monkeypatch.setenv("BATON_RUN_DIR", str(run))
    hard = tmp_path / "other-name.img"
    os.link(f, hard)
    (run / "hA-x").mkdir(parents=True)
    (run / "hA-x" / "daemon.json").write_text(json.dumps({"name": "hA-x", "pid": pid, "node": "n1",
                                                          "disk": str(f)}))
    (run / "hA-dead").mkdir()
    (run / "hA-dead" / "daemon.json").write_text(json.dumps({"name": "hA-dead", "pid": 0, "disk": str(f)}))
    assert attachments.read_state("hA-x") is not None and attachments.run_dir() == run
    us = host.users(str(hard))
    assert [u.kind for u in us] == [host.ATTACHED]  # its open descriptor is not listed twice
    att = next(u for u in us if u.kind == host.ATTACHED)
    assert att.what == "hA-x" and str(att) == f"already attached by Baton as hA-x (pid {pid}, node n1)"
    with pytest.raises(DeviceBusy) as ei:
        host.check_not_in_use(str(hard), "attach")
    assert "baton detach hA-x" in ei.value.hint


def test_allow_filters_uses(holder: tuple[Path, int]) -> None:
    f, _ = holder
    host.check_not_in_use(str(f), "attach", allow=lambda u: u.kind == host.OPEN)


def test_is_baton_daemon_reads_the_command_line() -> None:
    from baton.host import fds

    assert not fds.is_baton_daemon(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "baton", "serve"])
    try:
        assert not fds.is_baton_daemon(p.pid)  # "-m baton serve" as arguments of another program
    finally:
        p.kill()
        p.wait(30)


def test_pid_alive_with_a_process_name_that_is_not_utf8() -> None:
    """A pid in a state file may have been reused by any process, whatever its name: /proc/PID/stat holds the
    name's raw bytes, and reading it as UTF-8 raised UnicodeDecodeError out of `status` and `backup` (and the FUSE frontend's own checks of its serving
    process)."""
    from baton.frontends.fuse import _exiting, process_start_time
    from baton.util import pid_alive

    child = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys, time\n"
        "ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b'bat\\xff\\xfeon'), 0, 0, 0)\n"  # PR_SET_NAME
        "print('named', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"named\n"
        with open(f"/proc/{child.pid}/comm", "rb") as f:
            assert b"\xff" in f.read()
        assert pid_alive(child.pid)
        assert process_start_time(child.pid) is not None and not _exiting(child.pid)
    finally:
        child.kill()
        child.wait(10)
