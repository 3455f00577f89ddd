"""The Debian package, installed as an operator would on a clean Debian 12 root (debootstrap bookworm minbase):
apt-get install ./baton_*.deb with its dependencies from Debian's mirror, then an end-to-end run there (init,
attach over FUSE, writes, backups, an upgrade while the disk is attached, a kill -9 takeover, restore and
compare), then purge, checking that nothing is left.

Two builds of the committed HEAD (scripts/build-deb.sh --revision 0~test1 and 0~test2) stand for the old and new
versions. BATON_TEST_DEB_WORKTREE=1 packages the working tree instead. Budget: about 4 minutes with a warm cache
(the first run bootstraps the base root, about 90 s more).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.packaging.chroot import Chroot, need_packaging_tools

pytestmark = [pytest.mark.packaging]

ROOT = Path(__file__).resolve().parents[2]
OLD, NEW = "0~test1", "0~test2"
NAME = "pkgt"
DEV = f"/run/baton-dev/{NAME}"
ENV = {"BATON_DEV_DIR": "/run/baton-dev"}
# What a package's life may change without leaving anything behind: package-manager state, caches, logs, and
# this test's own files.
VOLATILE = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/", "/var/log/", "/tmp/", "/run/", "/srv/",
            "/root/", "/var/tmp/")


def build(revision: str, out: Path, log: list[str], wheels: Path | None = None) -> Path:
    """scripts/build-deb.sh --fast (gzip -1: the compression is not what is tested), reusing ``wheels``."""
    t0 = time.monotonic()
    args = ["scripts/build-deb.sh", "--revision", revision, "--out", str(out), "--fast"]
    if os.environ.get("BATON_TEST_DEB_WORKTREE") == "1":
        args.append("--worktree")
    if wheels is not None:
        args += ["--wheels", str(wheels)]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=os.environ | {"BATON_DEB_BUILD_DIR": str(out / f"build-{revision}")})
    assert r.returncode == 0, f"build-deb failed:\n{r.stdout}\n{r.stderr}"
    deb = Path(r.stdout.strip().splitlines()[-1])
    log.append(f"built {deb.name} in {time.monotonic() - t0:.0f} s ({deb.stat().st_size // 2**20} MiB)")
    return deb


def files_of(ch: Chroot) -> set[str]:
    """Every path (with its type) on the root's own file system, minus the volatile places."""
    r = ch.sh("find / -xdev -printf '%y %p\\n'")
    out = set()
    for line in r.stdout.splitlines():
        kind, path = line.split(" ", 1)
        if path != "/" and not any((path + "/").startswith(v) for v in VOLATILE):
            out.add(f"{kind} {path}")
    return out


def baton(ch: Chroot, args: str, check: bool = True) -> dict:
    r = ch.sh(f"baton {args} --json", env=ENV, check=check, timeout=120)
    return json.loads(r.stdout) if r.stdout.strip() else {}


def dd(ch: Chroot, seek_chunks: int, count: int) -> None:
    """Random 64 KiB blocks written through the tracked device, synchronously."""
    ch.sh(f"dd if=/dev/urandom of={DEV} bs=64K seek={seek_chunks} count={count} oflag=direct conv=fsync "
          "status=none", env=ENV)


def dpkg_list(ch: Chroot) -> list[str]:
    return [p for p in ch.sh("dpkg -L baton").stdout.splitlines() if p.strip() and p != "/."]


def test_deb_installs_upgrades_under_an_attachment_and_purges_clean(tmp_path: Path) -> None:
    need_packaging_tools()
    log: list[str] = []
    t_start = time.monotonic()

    def step(msg: str) -> None:
        log.append(f"{time.monotonic() - t_start:6.1f} s  {msg}")
        print(log[-1], flush=True)

    try:
        old_deb = build(OLD, tmp_path, log)
        new_deb = build(NEW, tmp_path, log, wheels=tmp_path / f"build-{OLD}" / "wheels")
        step("two builds done")
        work = Path(os.environ.get("BATON_TEST_CHROOT_DIR", "/var/tmp")) / f"baton-pkgtest-{os.getpid()}"
        with Chroot(work, log) as ch:
            for deb in (old_deb, new_deb):
                (ch.path("/tmp") / deb.name).write_bytes(deb.read_bytes())
            old_ver = f"0.1.0-{OLD}"
            new_ver = f"0.1.0-{NEW}"
            ch.sh("apt-get update -qq", timeout=300)
            # The dependencies first (as the package states them), so that the snapshot below holds them and
            # the comparison after the purge sees only what the package itself left.
            depends = ch.sh(f"dpkg-deb -f /tmp/{old_deb.name} Depends").stdout.strip()
            ch.sh(f"apt-get satisfy -y -qq '{depends}' >/dev/null", timeout=600)
            step("dependencies installed from the mirror")
            before = files_of(ch)

            # ---- install, as an operator would
            ch.sh(f"apt-get install -y -qq /tmp/{old_deb.name} >/dev/null", timeout=300)
            step(f"installed {old_deb.name}")
            listed = dpkg_list(ch)
            missing = [p for p in listed if not ch.path(p).exists() and not ch.path(p).is_symlink()]
            assert not missing, f"dpkg -L names files that are not there: {missing[:10]}"
            assert ch.sh("dpkg --verify baton", check=False).stdout == "", "dpkg --verify found changed files"
            assert os.readlink(ch.path("/opt/baton/current")) == old_ver
            assert "baton, version" in ch.sh("baton --version").stdout
            assert ch.path("/usr/lib/ocf/resource.d/baton/disk").stat().st_mode & 0o111
            for u in ("baton-agent.service", "baton-backup.service", "baton-backup.timer"):
                assert "ExecStart=/usr/bin/baton" in ch.path(f"/lib/systemd/system/{u}").read_text() or \
                    u.endswith(".timer")
            assert ch.path("/etc/systemd/system/multi-user.target.wants/baton-agent.service").is_symlink()
            mans = ch.sh("ls /usr/share/man/man8").stdout.split()
            assert {"baton.8.gz", "baton-backup.8.gz", "baton-attach.8.gz", "baton-repo-init.8.gz"} <= set(mans)
            assert "Back up a disk" in ch.sh("zcat /usr/share/man/man8/baton-backup.8.gz").stdout
            for f in ("/usr/share/baton/grafana/baton.json", "/usr/share/baton/prometheus/baton-rules.yml",
                      "/usr/share/doc/baton/README.Debian", "/usr/share/doc/baton/copyright"):
                assert ch.path(f).is_file(), f
            # The system's Python is untouched: baton's modules are only in its own tree.
            assert ch.sh("python3 -c 'import baton'", check=False).returncode != 0

            # ---- a disk, attached over FUSE, written, backed up
            ch.sh("mkdir -p /srv && truncate -s 64M /srv/disk.img")
            baton(ch, "init /srv/disk.img")
            baton(ch, "repo init /srv/repo")
            att = baton(ch, f"attach /srv/disk.img --node n1 --name {NAME}")
            pid_old = int(att.get("pid") or baton(ch, f"status {NAME}")["pid"])
            assert ch.sh(f"readlink -f /proc/{pid_old}/exe; tr '\\0' ' ' < /proc/{pid_old}/cmdline").stdout \
                .split("\n")[1].startswith(f"/opt/baton/{old_ver}/bin/python")
            dd(ch, 10, 32)
            b1 = baton(ch, f"backup {NAME} --repo /srv/repo")
            assert b1["mode"] == "full", b1
            dd(ch, 200, 8)
            b2 = baton(ch, f"backup {NAME} --repo /srv/repo")
            assert b2["mode"] == "incremental", b2
            step(f"attached over FUSE; full then incremental backup (read {b2['bytes_read']} bytes)")

            # ---- removal is refused while a daemon runs Baton's code
            r = ch.sh("apt-get remove -y -qq baton", check=False, timeout=120)
            assert r.returncode != 0 and "detach the disks first" in (r.stdout + r.stderr), r.stdout + r.stderr
            assert ch.sh("dpkg-query -W -f='${Status}' baton").stdout == "install ok installed"

            # ---- upgrade while attached: the daemon keeps running its own version
            ch.sh(f"apt-get install -y -qq /tmp/{new_deb.name} >/dev/null", timeout=300)
            step(f"upgraded to {new_deb.name} with {NAME} attached")
            assert os.readlink(ch.path("/opt/baton/current")) == new_ver
            assert ch.sh(f"kill -0 {pid_old}", check=False).returncode == 0, "the upgrade killed the daemon"
            assert ch.path(f"/opt/baton/{old_ver}").is_dir(), "the running daemon's runtime was removed"
            assert not ch.path(f"/usr/lib/baton/runtime/{old_ver}").exists()
            listed_new = dpkg_list(ch)
            assert not [p for p in listed_new if not ch.path(p).exists() and not ch.path(p).is_symlink()]
            assert f"/usr/lib/baton/runtime/{old_ver}/bin/baton" not in listed_new
            # The old daemon still serves writes and runs a backup: that loads its backup engine now, from its
            # own (kept) runtime, for a request made by the new command.
            dd(ch, 300, 8)
            b3 = baton(ch, f"backup {NAME} --repo /srv/repo")
            assert b3["mode"] == "incremental", b3
            step("the old daemon served writes and an incremental backup after the upgrade")

            # ---- a takeover: kill -9 the owner, attach on "another node" with the new version
            ch.sh(f"kill -9 {pid_old}")
            time.sleep(0.5)
            baton(ch, f"attach /srv/disk.img --node n2 --name {NAME}")
            pid_new = int(baton(ch, f"status {NAME}")["pid"])
            assert ch.sh(f"tr '\\0' ' ' < /proc/{pid_new}/cmdline").stdout.startswith(
                f"/opt/baton/{new_ver}/bin/python")
            dd(ch, 400, 8)
            b4 = baton(ch, f"backup {NAME} --repo /srv/repo")
            assert b4["mode"] == "incremental", b4
            assert b4["bytes_read"] <= 64 * 2**20 // 4, b4
            # The old runtime is unused now: pruned.
            ch.sh("/usr/lib/baton/prune-runtimes")
            assert not ch.path(f"/opt/baton/{old_ver}").exists()
            assert ch.path(f"/opt/baton/{new_ver}").is_dir()
            step(f"kill -9 takeover by n2; incremental backup read {b4['bytes_read']} bytes; old runtime pruned")

            # ---- restore and compare with the device's content at the last backup
            data_size = int(baton(ch, f"status {NAME}")["data_size"])
            ch.sh(f"dd if={DEV} of=/srv/shadow.img bs=1M iflag=direct status=none", env=ENV)
            baton(ch, f"detach {NAME}")
            baton(ch, "restore latest --repo /srv/repo --to /srv/restored.img")
            shadow = ch.path("/srv/shadow.img").read_bytes()
            restored = ch.path("/srv/restored.img").read_bytes()
            assert len(shadow) == data_size
            expect = hashlib.sha256(shadow).hexdigest()
            assert hashlib.sha256(restored[:data_size]).hexdigest() == expect
            v = baton(ch, "verify --repo /srv/repo")
            assert v.get("ok", True), v
            step("restored the last snapshot: identical to the device; verify passed")

            # ---- purge: nothing of the package is left
            ch.sh("apt-get purge -y -qq baton >/dev/null", timeout=120)
            step("purged")
            left = [p for p in set(listed) | set(listed_new) if ch.path(p).exists() or ch.path(p).is_symlink()]
            # Directories shared with other packages (/usr/bin, /lib/systemd/system, ...) stay, of course.
            left = [p for p in left if not ch.path(p).is_dir() or "baton" in p]
            assert not left, f"left after purge: {left[:20]}"
            assert not ch.path("/opt/baton").exists()
            assert not ch.sh("find /etc /lib/systemd /var/lib/systemd -name '*baton*'").stdout.strip()
            after = files_of(ch)
            assert after == before, (f"the purge left {sorted(after - before)[:20]} and removed "
                                     f"{sorted(before - after)[:20]}")
            step("nothing left: the root's files equal those before the install")
    finally:
        print("\n".join(["packaging test timeline:", *log]), flush=True)
