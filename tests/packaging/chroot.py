"""A clean Debian 12 root for package tests: debootstrap once (cached), then a fresh copy per test, entered in a
private mount namespace.

* The base root is ``debootstrap --variant=minbase bookworm``, cached as a tarball under
  ``/var/cache/baton-tests`` (``BATON_TEST_CACHE``), so that later runs unpack it in seconds instead of
  bootstrapping for a minute and a half. Downloaded .debs are cached there too (bind-mounted over the root's
  /var/cache/apt/archives).
* ``Chroot`` keeps one ``unshare --mount`` holder process; every command runs as ``nsenter --mount`` into it
  plus ``chroot``. /proc, /sys and /dev are bind-mounted *inside that namespace*: the host never sees them under
  the root, they are unmounted in ``close()``, and they vanish with the namespace even if a test dies. The root
  directory is removed only after checking that nothing is mounted under it.
* Processes started inside (a ``baton serve`` daemon) are found by their root directory and killed by pid in
  ``close()``; loop devices whose backing file lies in the root are detached.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SUITE = "bookworm"
CACHE = Path(os.environ.get("BATON_TEST_CACHE", "/var/cache/baton-tests"))
MIRROR = os.environ.get("BATON_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_VERSION = "1"  # bump to rebuild every cached base root (e.g. after changing what goes into it)


def need_packaging_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("packaging tier: needs root (chroot, mounts, loop devices)")
    for tool in ("debootstrap", "dpkg-deb", "unshare", "nsenter", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"packaging tier: needs {tool} (installed by scripts/setup.sh test)")
    if not os.path.exists("/usr/bin/python3.11"):
        pytest.skip("packaging tier: needs the system's python3.11 to build the package")


def base_tarball(log: list[str]) -> Path:
    """The cached minbase root tarball, bootstrapped now if missing (about 90 s once)."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    tar = CACHE / f"debootstrap-{SUITE}-minbase-{arch}-v{BASE_VERSION}.tar"
    if tar.exists():
        log.append(f"base root: cached {tar.name}")
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="bootstrap-") as tmp:
        root = Path(tmp) / "root"
        r = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap failed (exit {r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
        part = tar.with_suffix(".part")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(part), "."], check=True)
        part.rename(tar)
    log.append(f"base root: debootstrap {SUITE} minbase in {time.monotonic() - t0:.0f} s, cached as {tar}")
    return tar


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or under ``path`` in this (the host's) mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == str(path) or mp.startswith(str(path) + "/"):
                out.append(mp)
    return out


class Chroot:
    """A fresh copy of the base root in a private mount namespace. Use as a context manager."""

    def __init__(self, workdir: Path, log: list[str]) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.log = log
        self.holder: subprocess.Popen[bytes] | None = None
        self.mounted: list[str] = []

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Chroot:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        tar = base_tarball(self.log)
        t0 = time.monotonic()
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(self.root), "--numeric-owner", "-xf", str(tar)], check=True)
        self.log.append(f"unpacked the base root in {time.monotonic() - t0:.1f} s")
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"])
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --mount did not create a mount namespace")
            time.sleep(0.02)
        archives = CACHE / f"apt-archives-{SUITE}"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        for src, dst, opts in (("/proc", "proc", ["--bind"]), ("/sys", "sys", ["--rbind"]),
                               ("/dev", "dev", ["--rbind"]), (str(archives), "var/cache/apt/archives", ["--bind"])):
            self.ns(["mount", *opts, src, str(self.root / dst)])
            self.mounted.append(str(self.root / dst))
        # The root's own configuration: no services started by package scripts, the host's resolver and proxy,
        # and snapshot mirrors accepted (their Release files are past Valid-Until).
        pol = self.root / "usr/sbin/policy-rc.d"
        pol.write_text("#!/bin/sh\nexit 101\n")
        pol.chmod(0o755)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        conf = ['Acquire::Check-Valid-Until "false";', 'APT::Install-Recommends "false";',
                'Binary::apt::APT::Keep-Downloaded-Packages "true";']
        proxy = subprocess.run(["apt-config", "dump", "Acquire::http::Proxy"], capture_output=True, text=True)
        conf += [ln for ln in proxy.stdout.splitlines() if ln.startswith("Acquire::http::Proxy ")]
        (self.root / "etc/apt/apt.conf.d/90test-chroot").write_text("\n".join(conf) + "\n")
        with contextlib.suppress(FileNotFoundError):
            (self.root / "etc/apt/apt.conf.d/docker-clean").unlink()  # it would empty the shared .deb cache

    def close(self) -> None:
        """Kill what runs inside, detach its loop devices, unmount, end the namespace, remove the root."""
        self._kill_inside()
        self._detach_loops()
        if self.holder is not None and self.holder.poll() is None:
            for mp in reversed(self.mounted):
                self.ns(["umount", "-R", "-l", mp], check=False)
            self.holder.kill()
            self.holder.wait(timeout=10)
        self.mounted = []
        left = _mounts_under(self.workdir)
        if left:
            self.log.append(f"NOT removing {self.workdir}: still mounted {left}")
            return
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _inside_pids(self) -> list[int]:
        """Processes whose root directory is this chroot (started by this test)."""
        pids = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{p}/root") == str(self.root):
                    pids.append(int(p))
        return pids

    def _kill_inside(self) -> None:
        for pid in self._inside_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._inside_pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    def _detach_loops(self) -> None:
        sysblock = Path("/sys/block")
        for dev in sysblock.glob("loop*"):
            with contextlib.suppress(OSError):
                backing = (dev / "loop/backing_file").read_text().strip()
                if backing.startswith(str(self.root) + "/") or backing.startswith(str(self.workdir)):
                    subprocess.run(["losetup", "-d", f"/dev/{dev.name}"], capture_output=True, timeout=30)

    # ------------------------------------------------------------------------------------------- commands
    def ns(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` (host paths) in the namespace, outside the chroot."""
        assert self.holder is not None
        return subprocess.run(["nsenter", "--mount", f"--target={self.holder.pid}", *argv], capture_output=True,
                              text=True, check=check, timeout=timeout)

    def sh(self, script: str, check: bool = True, timeout: float = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the chroot; on failure (with ``check``) raise with its output."""
        assert self.holder is not None
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
             "DEBIAN_FRONTEND": "noninteractive"} | (env or {})
        r = subprocess.run(["nsenter", "--mount", f"--target={self.holder.pid}", "chroot", str(self.root),
                            "/bin/sh", "-ec", script], capture_output=True, text=True, timeout=timeout, env=e)
        if check and r.returncode != 0:
            raise AssertionError(f"in the chroot, exit {r.returncode}:\n$ {script}\n--- stdout\n{r.stdout[-4000:]}"
                                 f"\n--- stderr\n{r.stderr[-4000:]}")
        return r

    def path(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path in the chroot)."""
        return self.root / inside.lstrip("/")
