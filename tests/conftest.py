"""Test tiers: unit and property tests run anywhere; integration, faults and cluster tests need root and
real tools, and are skipped with a stated reason when those are missing (CI installs them all)."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(
    "ci", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The chunk index's run files and the node-local chunk-index cache (baton.repo.indexcache) go to a directory of
# this session, not to the machine's /var/cache/baton: the tests make hundreds of repositories, which would
# evict an operator's caches (at most 8 repositories are kept) and leave files behind. Daemons and CLI
# processes that the tests start inherit it. A test of the default location unsets it for itself.
_CACHE_DIR: str | None = None
if "BATON_CACHE_DIR" not in os.environ:
    import tempfile

    _CACHE_DIR = tempfile.mkdtemp(prefix="baton-test-cache-")
    os.environ["BATON_CACHE_DIR"] = _CACHE_DIR


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def need_tool(*names: str) -> None:
    for n in names:
        if shutil.which(n) is None:
            pytest.skip(f"needs {n} (installed by scripts/setup.sh test)")


# ---------------------------------------------------------------------------------------------------------------
# Safety net: a FUSE connection that lost both its daemon and its mount while the kernel still holds requests
# for it (seen with loop devices over killed daemons' files) blocks every `losetup`, `mount -o loop` and
# `sync` on the machine forever, which would hang the whole run rather than fail a test. A watchdog aborts such
# orphans when they were created during this session, have waited more than a minute and are mounted nowhere,
# and the session summary reports each one (the test that made it still shows its own failure).

_ORPHANS: list[str] = []


def _fuse_conns() -> dict[int, int]:
    out = {}
    base = "/sys/fs/fuse/connections"
    if os.path.isdir(base):
        for c in os.listdir(base):
            try:
                with open(f"{base}/{c}/waiting") as f:
                    out[int(c)] = int(f.read())
            except (OSError, ValueError):
                continue
    return out


def _mounted_devs() -> set[int]:
    devs: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    major, minor = line.split()[2].split(":")
                    if major == "0":
                        devs.add(int(minor))
        except (OSError, ValueError, IndexError):
            continue
    return devs


@pytest.fixture(scope="session", autouse=True)
def _fuse_orphan_watchdog():  # type: ignore[no-untyped-def]
    import threading
    import time

    if os.geteuid() != 0:
        yield
        return
    before = set(_fuse_conns())
    stop = threading.Event()
    since: dict[int, float] = {}

    def run() -> None:
        while not stop.wait(5):
            now = time.monotonic()
            conns = _fuse_conns()
            stuck = {c for c, w in conns.items() if w > 0 and c not in before}
            for c in list(since):
                if c not in stuck:
                    del since[c]
            for c in stuck:
                since.setdefault(c, now)
            old = [c for c, t in since.items() if now - t > 60]
            if not old:
                continue
            mounted = _mounted_devs()
            for c in old:
                if c in mounted:
                    continue
                try:
                    with open(f"/sys/fs/fuse/connections/{c}/abort", "w") as f:
                        f.write("1")
                    _ORPHANS.append(f"FUSE connection {c}: no daemon answered and no mount for over 60 s; aborted")
                except OSError:
                    pass
                since.pop(c, None)

    t = threading.Thread(target=run, name="fuse-orphan-watchdog", daemon=True)
    t.start()
    yield
    stop.set()


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    for line in _ORPHANS:
        terminalreporter.write_line(f"WARNING: {line}", yellow=True)
