"""`baton mount` / `baton umount` on real ext4 and xfs snapshots, local and S3 (moto): a file deleted by mistake
is copied out of the mounted snapshot and compared; reading one 10 MiB file fetches a small part of the
snapshot (repository statistics); a killed mount daemon is cleaned up by umount; errors for bad input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_root, need_tool
from faults import procs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MiB = 1 << 20


class Env(procs.Env):
    """The CLI env, and the snapshots this test mounted (unmounted with --force at the end)."""

    def __init__(self, root: Path, extra: dict[str, str] | None = None) -> None:
        super().__init__(root, timeout=300, extra_env=extra)
        self.mounted: list[str] = []


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("losetup", "unshare", "mkfs.ext4", "mkfs.xfs", "blockdev")
    e = Env(tmp_path)
    try:
        yield e
    finally:
        for n in e.mounted:
            subprocess.run([sys.executable, "-m", "baton", "umount", n, "--force"], capture_output=True,
                           timeout=120, env=e.env)


def make_disk(root: Path, fs: str, size: int) -> tuple[Path, bytes]:
    """A file system image with 60 MiB of other files and one 10 MiB file app/report.bin; returns its bytes."""
    disk = root / f"{fs}.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    subprocess.run([f"mkfs.{fs}", "-q", *(["-F", "-b", "4096"] if fs == "ext4" else ["-f"]), str(disk)],
                   check=True, capture_output=True, timeout=120)
    report = os.urandom(10 * MiB)
    (root / "report.bin").write_bytes(report)
    loop = subprocess.run(["losetup", "--find", "--show", str(disk)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        script = (f"m=$(mktemp -d); mount {loop} $m; trap 'umount $m; rmdir $m' EXIT; mkdir $m/app $m/data; "
                  f"cp {root / 'report.bin'} $m/app/report.bin; for i in 1 2 3 4 5 6; do "
                  "head -c 10485760 /dev/urandom > $m/data/f$i; done; sync")
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], timeout=30)
    return disk, report


def copy_out(dev: str, fs: str, src: str, dst: Path) -> None:
    opts = "ro,noload" if fs == "ext4" else "ro,norecovery"
    script = (f"m=$(mktemp -d); mount -o {opts} {dev} $m; trap 'umount $m; rmdir $m' EXIT; "
              f"ls $m/app >/dev/null; cp $m/{src} {dst}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def recover_one_file(env: Env, fs: str, repo: str) -> None:
    size = 512 * MiB
    disk, report = make_disk(env.root, fs, size)
    env.baton("init", str(disk))
    snap = env.json("backup", str(disk), "--repo", repo, "--node", "n1")["snapshot"]
    name = f"m{uuid.uuid4().hex[:8]}"
    res = env.json("mount", snap[:10], "--repo", repo, "--name", name, "--cache-size", "32M")
    env.mounted.append(res["name"])
    dev = res["device"]
    assert res["name"] == f"snap-{name}" and dev.endswith(f"/snap-{name}") and res["size"] == size
    loop = os.path.realpath(dev)
    assert subprocess.run(["blockdev", "--getro", loop], capture_output=True, text=True).stdout.strip() == "1"
    # writing to it is refused
    with pytest.raises(OSError):
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
    out = env.root / "recovered.bin"
    copy_out(dev, fs, "app/report.bin", out)
    assert out.read_bytes() == report
    # the same NAME again: busy
    err = env.json("mount", snap[:10], "--repo", repo, "--name", name, rc=3)
    assert err["error"] == "DeviceBusy"
    # umount refused while the device is mounted somewhere
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                               f"m=$(mktemp -d); mount -o ro,{'noload' if fs == 'ext4' else 'norecovery'} {dev} $m; "
                               "echo up; read x; umount $m; rmdir $m"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        err = env.json("umount", name, rc=3)
        assert err["error"] == "DeviceBusy"
    finally:
        holder.communicate("done\n", timeout=60)
    st = env.json("umount", name)
    env.mounted.remove(res["name"])
    fetched = st["repository"]["bytes_read"]
    print(f"{fs}: read one 10 MiB file from a {size >> 20} MiB snapshot: {fetched:,} bytes fetched from the "
          f"repository ({100 * fetched / size:.2f} %), {st['statistics']['chunks_fetched']} chunks")
    assert fetched < 0.05 * size, st
    assert not os.path.lexists(dev) and not (env.root / "run" / res["name"]).exists()
    # the kernel keeps a loop device's read-only flag across a detach: umount must clear it for the next user
    assert Path(f"/sys/block/{Path(loop).name}/ro").read_text().strip() == "0"


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_recover_a_deleted_file_from_a_mounted_snapshot(env: Env, fs: str) -> None:
    repo = str(env.root / "repo")
    env.baton("repo", "init", repo)
    recover_one_file(env, fs, repo)


def test_mount_from_s3(tmp_path: Path) -> None:
    need_root()
    pytest.importorskip("moto.server")
    from baton.testing.storage_suite import MotoServer

    server = MotoServer(sys.executable)
    try:
        bucket = f"baton-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        e = Env(tmp_path, server.env())
        try:
            repo = f"s3://{bucket}/repo"
            e.baton("repo", "init", repo)
            recover_one_file(e, "ext4", repo)
        finally:
            for n in e.mounted:
                subprocess.run([sys.executable, "-m", "baton", "umount", n, "--force"], capture_output=True,
                               timeout=120, env=e.env)
    finally:
        server.stop()


def test_killed_mount_daemon_is_cleaned_up_and_bad_input(env: Env) -> None:
    repo = str(env.root / "repo")
    env.baton("repo", "init", repo)
    disk = env.root / "raw.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    env.baton("init", str(disk))
    snap = env.json("backup", str(disk), "--repo", repo, "--node", "n1")["snapshot"]
    res = env.json("mount", snap, "--repo", repo)
    env.mounted.append(res["name"])
    assert res["name"] == f"snap-{snap[:8]}"
    os.kill(res["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{res['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    out = env.json("umount", res["name"])
    env.mounted.remove(res["name"])
    assert out["was_running"] is False and any("detached" in a for a in out["cleaned_up"]), out
    assert not os.path.lexists(res["device"]) and not (env.root / "run" / res["name"]).exists()
    loop = res["loop"]
    assert subprocess.run(["losetup", loop], capture_output=True).returncode != 0 or \
        str(env.root) not in subprocess.run(["losetup", loop], capture_output=True, text=True).stdout
    assert Path(f"/sys/block/{Path(loop).name}/ro").read_text().strip() == "0"
    # bad input
    err = env.json("mount", "abcdef99", "--repo", repo, rc=7)
    assert "no snapshot" in err["message"]
    err = env.json("mount", snap, "--repo", str(env.root / "missing"), rc=7)
    assert err["error"] == "RepoNotFound"
    err = env.json("mount", snap, "--repo", repo, "--name", "bad/name", rc=2)
    assert err["error"] == "UsageError"
    err = env.json("umount", "nothing-here", rc=6)
    assert "no snapshot is mounted" in err["message"]
