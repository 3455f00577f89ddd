"""Busy disks are untouchable (invariant 5; issue 9 defects 2, 3, 8 and 10), with real loop devices, mounts,
processes and FUSE attachments.

A disk attached, mounted or open on this node is never the target of init, a second attach or a restore,
whatever path names it: the path itself, a hard link, a symlink, a loop device over it, another loop device of
the same file. Every refusal exits 3, names the user, and leaves the target's bytes as they were. A restore
never creates a regular file where a device was meant (under /dev or Baton's device directory), and a failed
restore removes the file it created.

Every test has its own BATON_RUN_DIR/BATON_DEV_DIR under its tmp dir and names prefixed ``hA-``; loop devices
are taken with ``losetup --find --show`` and only those are detached again, in finally blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import errors
from conftest import need_root, need_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20
SIZE = 64 * MiB
BOUND = 30.0
BUSY = errors.exit_code(errors.DeviceBusy("probe"))
DEVICE = errors.exit_code(errors.DeviceError("probe"))
REPO = errors.exit_code(errors.RepoError("probe"))


def run(*args: str, timeout: float = BOUND, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{args}: rc {r.returncode}\n{r.stdout}{r.stderr}"
    return r


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir, self.dev_dir = root / "run", root / "dev"
        self.env = os.environ | {"BATON_RUN_DIR": str(self.run_dir), "BATON_DEV_DIR": str(self.dev_dir)}
        self.names: set[str] = set()

    def baton(self, *args: str, rc: int | None = 0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=120,
                           env=self.env)
        if rc is not None:
            assert r.returncode == rc, (f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n"
                                        f"{r.stdout}{r.stderr}")
        if r.returncode:
            assert "Traceback" not in r.stderr, r.stderr
            assert r.stderr.startswith("baton: error: "), r.stderr
        return r

    def json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.baton(*args, "--json").stdout)
        return out

    def name(self) -> str:
        n = f"hA-{uuid.uuid4().hex[:8]}"
        self.names.add(n)
        return n

    def attach(self, disk: Path | str, name: str) -> dict[str, Any]:
        self.names.add(name)
        return self.json("attach", str(disk), "--node", "n1", "--name", name)

    def daemon_pid(self, name: str) -> int:
        return int(json.loads((self.run_dir / name / "daemon.json").read_text())["pid"])

    def cleanup(self) -> None:
        for n in self.names:
            if (self.run_dir / n / "daemon.json").exists():
                self.baton("detach", n, rc=None)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("losetup", "fusermount3")
    if not Path("/dev/fuse").exists():
        pytest.skip("needs /dev/fuse")
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.cleanup()


def image(path: Path, seed: int, size: int = SIZE) -> Path:
    """A sparse image with 4 MiB of deterministic non-zero data at its start (something that could be lost)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(rng.randbytes(4 * MiB))
    return path


def digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def loop(path: Path) -> Iterator[str]:
    dev = run("losetup", "--find", "--show", str(path)).stdout.strip()
    assert dev.startswith("/dev/loop"), dev
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


@contextlib.contextmanager
def holder(path: Path | str) -> Iterator[int]:
    """Another process holding ``path`` open read-write, as a database or a VM would."""
    p = subprocess.Popen([sys.executable, "-c", "import os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                          "print('open', flush=True)\ntime.sleep(120)", str(path)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "open"
        yield p.pid
    finally:
        p.kill()
        p.wait(BOUND)
        if p.stdout:
            p.stdout.close()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """(repo, snapshot id, disk size): one full backup of a 64 MiB tail-record disk."""
    need_root()
    root = tmp_path_factory.mktemp("busy-repo")
    e = Env(root)
    src = image(root / "src.img", 7)
    e.json("init", str(src), "--record", "tail")
    repo = root / "repo"
    e.baton("repo", "init", str(repo))
    snap = e.json("backup", str(src), "--repo", str(repo))
    return repo, str(snap["snapshot"]), int(snap["disk_size"])


def attached_disk(env: Env, tag: str) -> tuple[Path, str, int]:
    """(image, NAME, daemon pid) of a freshly initialised and attached disk."""
    disk = image(env.root / f"{tag}.img", 3)
    env.json("init", str(disk), "--record", "tail")
    name = env.name()
    env.attach(disk, name)
    return disk, name, env.daemon_pid(name)


# --------------------------------------------------------------------------------------------- restore


def test_restore_onto_the_attached_disk_is_refused_whatever_path_names_it(
        env: Env, snapshot: tuple[Path, str, int]) -> None:
    repo, snap, _ = snapshot
    disk, name, pid = attached_disk(env, "live")
    hard = env.root / "hard-link.img"
    os.link(disk, hard)
    sym = env.root / "sym-link.img"
    sym.symlink_to(disk)
    before = digest(disk)

    def refused(target: Path | str) -> None:
        r = env.baton("restore", snap, "--repo", str(repo), "--to", str(target), rc=BUSY)
        assert f"attached by Baton as {name}" in r.stderr and f"pid {pid}" in r.stderr, (target, r.stderr)
        assert "hint:" in r.stderr, r.stderr
        assert digest(disk) == before, target

    for target in (disk, hard, sym):
        refused(target)
    with loop(disk) as dev:
        refused(dev)
    assert env.json("status", name)["state"] == "running"  # not fenced


def test_restore_onto_a_mounted_loop_device_or_its_file_is_refused(env: Env, snapshot: tuple[Path, str, int]) -> None:
    need_tool("mkfs.ext4", "mount", "umount")
    repo, snap, _ = snapshot
    img = env.root / "fs.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    # No lazy inode table / journal initialisation: the kernel would keep writing the mounted device meanwhile.
    run("mkfs.ext4", "-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(img), timeout=60)
    mnt = env.root / "mnt"
    mnt.mkdir()
    with loop(img) as dev:
        run("mount", dev, str(mnt))
        try:
            (mnt / "f").write_bytes(b"payload" * 1000)
            run("sync", "-f", str(mnt / "f"))
            before = digest(dev)
            hard = env.root / "fs-hard.img"
            os.link(img, hard)
            for target in (dev, str(img), str(hard)):
                r = env.baton("restore", snap, "--repo", str(repo), "--to", target, rc=BUSY)
                assert f"mounted at {mnt}" in r.stderr, (target, r.stderr)
                if target != dev:
                    assert dev in r.stderr, r.stderr
            assert digest(dev) == before
        finally:
            run("umount", str(mnt), check=False)
    assert (mnt / "f").exists() is False


def test_restore_onto_a_file_open_by_another_process_is_refused(env: Env, snapshot: tuple[Path, str, int]) -> None:
    repo, snap, _ = snapshot
    img = image(env.root / "open.img", 5)
    hard = env.root / "open-hard.img"
    os.link(img, hard)
    before = digest(img)
    with holder(hard) as pid:
        for target in (img, hard):
            r = env.baton("restore", snap, "--repo", str(repo), "--to", str(target), rc=BUSY)
            assert f"opened by pid {pid}" in r.stderr, r.stderr
    assert digest(img) == before
    # Nobody holds it any more: the same restore is accepted.
    env.baton("restore", snap, "--repo", str(repo), "--to", str(img))


def test_restore_onto_a_loop_device_over_a_file_open_elsewhere_is_refused(
        env: Env, snapshot: tuple[Path, str, int]) -> None:
    repo, snap, _ = snapshot
    img = image(env.root / "lo.img", 6)
    with loop(img) as dev, holder(img) as pid:
        before = digest(img)
        r = env.baton("restore", snap, "--repo", str(repo), "--to", dev, rc=BUSY)
        assert f"opened by pid {pid}" in r.stderr, r.stderr
        assert digest(img) == before


# --------------------------------------------------------------------------------------------- attach, init


def test_second_attach_through_a_hard_link_is_refused(env: Env) -> None:
    disk, name, pid = attached_disk(env, "a2")
    hard = env.root / "a2-hard.img"
    os.link(disk, hard)
    epoch = env.json("status", name)["epoch"]
    r = env.baton("attach", str(hard), "--node", "n2", "--name", env.name(), rc=BUSY)
    assert f"attached by Baton as {name}" in r.stderr and f"pid {pid}" in r.stderr, r.stderr
    st = env.json("status", name)
    assert (st["state"], st["pid"], st["epoch"]) == ("running", pid, epoch)  # the first owner is not fenced


def test_second_attach_through_another_loop_device_is_refused(env: Env) -> None:
    disk, name, pid = attached_disk(env, "a3")
    epoch = env.json("status", name)["epoch"]
    with loop(disk) as dev:
        r = env.baton("attach", dev, "--node", "n2", "--name", env.name(), rc=BUSY)
        assert f"attached by Baton as {name}" in r.stderr, r.stderr
    st = env.json("status", name)
    assert (st["state"], st["pid"], st["epoch"]) == ("running", pid, epoch)


def test_attach_of_a_file_with_a_loop_device_over_it_is_refused(env: Env) -> None:
    disk = image(env.root / "a4.img", 4)
    env.json("init", str(disk), "--record", "tail")
    before = digest(disk)
    with loop(disk) as dev:
        r = env.baton("attach", str(disk), "--node", "n1", "--name", env.name(), rc=BUSY)
        assert f"attached as {dev} (a loop device" in r.stderr, r.stderr
    assert digest(disk) == before


def test_init_of_an_attached_disk_through_a_hard_link_is_refused(env: Env) -> None:
    disk, name, _ = attached_disk(env, "i1")
    hard = env.root / "i1-hard.img"
    os.link(disk, hard)
    before = digest(disk)
    r = env.baton("init", str(hard), "--force", rc=BUSY)
    assert f"attached by Baton as {name}" in r.stderr, r.stderr
    assert digest(disk) == before
    assert env.json("status", name)["state"] == "running"


def test_detach_while_the_device_is_open_is_refused(env: Env) -> None:
    _, name, pid = attached_disk(env, "dt")
    link = env.dev_dir / name
    with holder(link) as opener:
        r = env.baton("detach", name, rc=BUSY)
        assert f"opened by pid {opener}" in r.stderr and "refused" in r.stderr, r.stderr
        st = env.json("status", name)
        assert (st["state"], st["pid"]) == ("running", pid)
    env.baton("detach", name)
    assert not os.path.lexists(link)


# --------------------------------------------------------------------------------------------- defect 8


def test_restore_to_the_device_link_of_a_dead_attachment_creates_nothing(
        env: Env, snapshot: tuple[Path, str, int]) -> None:
    repo, snap, _ = snapshot
    disk, name, pid = attached_disk(env, "d8")
    link = env.dev_dir / name
    assert link.is_symlink()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + BOUND
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    before = digest(disk)
    if os.path.lexists(link):  # before anyone cleaned up: a link to a loop device over a dead FUSE file
        r = env.baton("restore", snap, "--repo", str(repo), "--to", str(link), rc=DEVICE)
        assert f"the device of {name}, which is not attached" in r.stderr, r.stderr
        assert f"baton detach {name}" in r.stderr, r.stderr
    env.baton("detach", name)  # cleans up after the dead daemon: /dev/baton/NAME goes
    assert not os.path.lexists(link)
    r = env.baton("restore", snap, "--repo", str(repo), "--to", str(link), rc=DEVICE)
    assert "does not exist" in r.stderr and f"is {name} attached?" in r.stderr, r.stderr
    assert not os.path.lexists(link)
    assert digest(disk) == before


def test_restore_never_creates_a_file_in_dev(env: Env, snapshot: tuple[Path, str, int]) -> None:
    repo, snap, _ = snapshot
    target = Path("/dev") / f"hA-{uuid.uuid4().hex[:8]}"
    try:
        r = env.baton("restore", snap, "--repo", str(repo), "--to", str(target), rc=DEVICE)
        assert "does not exist" in r.stderr, r.stderr
        assert not os.path.lexists(target)
    finally:
        if os.path.isfile(target) and not os.path.islink(target):
            target.unlink()


# --------------------------------------------------------------------------------------------- defect 10


def _corrupt_copy(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest)
    packs = sorted((p for p in (dest / "packs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = packs[-1].stat().st_size
    with open(packs[-1], "r+b") as f:
        f.seek(size // 2)
        data = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return dest


def test_failed_restore_removes_the_file_it_created(env: Env, snapshot: tuple[Path, str, int]) -> None:
    repo, snap, _ = snapshot
    bad = _corrupt_copy(repo, env.root / "bad-repo")
    target = env.root / "new.img"
    r = env.baton("restore", snap, "--repo", str(bad), "--to", str(target), rc=REPO)
    assert "chunk" in r.stderr, r.stderr
    assert not os.path.lexists(target), "a failed restore left the file it created"
    # A file that existed before is kept, and the error says its content is undefined now.
    old = image(env.root / "old.img", 9, 8 * MiB)
    r = env.baton("restore", snap, "--repo", str(bad), "--to", str(old), rc=REPO)
    assert "undefined" in r.stderr and str(old) in r.stderr, r.stderr
    assert old.exists()
