"""A daemon that dies before it says it is ready (here: a broken installation, so `python -m baton` fails at its
first import in the child only): `attach` and `mount` fail with a DaemonError that names the daemon, its exit
status and its log, the log holds why, no process is left, and nothing is left in the way of the next attempt,
which succeeds. Both go through the one spawn (`baton.daemon.protocol.spawn_until_ready`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.errors import DaemonError
from faults.procs import Env, need_fuse_loop, new_name, raw_disk

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20
WHY = "baton-test: this installation is broken on purpose"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    need_fuse_loop()
    e = Env(tmp_path)
    # The calls under test run in this process (which has baton imported already) and read these.
    monkeypatch.setenv("BATON_RUN_DIR", str(e.run_dir))
    monkeypatch.setenv("BATON_DEV_DIR", str(e.dev_dir))
    try:
        yield e
    finally:
        e.cleanup()


def break_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `python -m baton` started from now on imports a `baton` package that exits 3 with WHY."""
    broken = tmp_path / "broken"
    (broken / "baton").mkdir(parents=True)
    (broken / "baton" / "__init__.py").write_text(f"import sys\nsys.stderr.write({WHY!r} + '\\n')\nsys.exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(broken))


def check_failure(e: DaemonError, what: str, log: Path) -> None:
    # The exit status, not "None": the pipe closes as the child exits, before it is reaped.
    assert str(e) == f"{what} did not become ready: it exited with status 3", str(e)
    assert str(log) in e.hint, e.hint
    assert WHY in log.read_text(), log.read_text()


def test_attach_of_a_daemon_that_dies_before_ready(env: Env, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from baton.daemon.client import attach, detach
    from baton.daemon.runtime import log_path

    disk = raw_disk(tmp_path, 16 * MiB)
    env.baton("init", str(disk))
    name = env.name()
    with monkeypatch.context() as m:
        break_children(tmp_path, m)
        with pytest.raises(DaemonError) as ei:
            attach(str(disk), node="n1", name=name, frontend="fuse")
    check_failure(ei.value, f"the daemon for {name}", log_path(name))
    assert not (env.run_dir / name / "daemon.json").exists()
    # Nothing in the way: the same attach with a working installation serves the disk.
    st = attach(str(disk), node="n1", name=name, frontend="fuse")
    try:
        assert st["name"] == name and os.path.exists(st["device"]), st
    finally:
        detach(name)


def test_mount_of_a_daemon_that_dies_before_ready(env: Env, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from baton.mount import mount, umount

    disk = raw_disk(tmp_path, 16 * MiB)
    with open(disk, "r+b") as f:
        f.write(os.urandom(MiB))
    repo = str(tmp_path / "repo")
    env.baton("init", str(disk))
    env.baton("repo", "init", repo)
    snap = env.json("backup", str(disk), "--repo", repo, "--node", "n1")["snapshot"]
    name = new_name("m")
    with monkeypatch.context() as m:
        break_children(tmp_path, m)
        with pytest.raises(DaemonError) as ei:
            mount(snap, repo, name=name)
    full = f"snap-{name}"
    check_failure(ei.value, f"the mount daemon of {full}", env.run_dir / full / "mount.log")
    res = mount(snap, repo, name=name)
    try:
        with open(res["device"], "rb") as dev, open(disk, "rb") as src:
            assert dev.read(MiB) == src.read(MiB)
    finally:
        umount(full)
