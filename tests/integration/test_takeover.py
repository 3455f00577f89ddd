"""Takeovers with real processes (issue 3 §5): owners killed with SIGKILL in the middle of writes, the next node
attaches, and the record still holds every chunk of every acknowledged write.

A writer process writes random 4 KiB..256 KiB blocks at random 4 KiB-aligned offsets, through /dev/baton/NAME
(FUSE + loop, O_DIRECT) or the NBD export (a minimal NBD client: fixed newstyle, NBD_OPT_GO, WRITE), and
logs each write only after it was acknowledged (one fsync'ed log line per write). Its random stream is a fixed
function of the printed seed (env BATON_SEED, default 20261124), so the test can regenerate every write's data
and also knows the one write that was in flight when the owner died. The writer and the CLI wrapper are shared
with the lifecycle model test (tests/faults/procs.py).

Every test has its own BATON_RUN_DIR/BATON_DEV_DIR under its tmp dir and random attachment names; daemons are
detached (or their leftovers cleaned) in finally blocks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.record.placement import locate
from conftest import need_tool
from faults.procs import (
    BOUND,
    WRITER,
    Env,
    kill_pid,
    log_lines,
    need_fuse_loop,
    new_name,
    raw_disk,
    wait_for,
    writes_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20
KiB = 1 << 10
CHUNK = 64 * KiB
SEED = int(os.environ.get("BATON_SEED", "20261124"))
MAX_WRITE = 256 * KiB

def chunks_of(off: int, n: int) -> range:
    return range(off // CHUNK, (off + n - 1) // CHUNK + 1)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_fuse_loop()
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.cleanup()


@pytest.mark.parametrize("frontend", ["fuse", "nbd"])
def test_acknowledged_writes_survive_kill9_takeovers(env: Env, frontend: str) -> None:
    print(f"BATON_SEED={SEED} frontend={frontend}")
    disk = raw_disk(env.root, 64 * MiB)
    init = env.json("init", str(disk))
    size = int(init["data_size"])
    name = new_name("tk")
    acked: list[tuple[int, int, int, int]] = []  # (owner round, i, off, n)
    in_flight: list[tuple[int, int]] = []  # (off, n) of the write each killed owner had outstanding
    for rnd, node in enumerate(["node-a", "node-b"]):
        res = env.attach(disk, node, name, frontend)
        assert res["epoch"] == rnd + 1
        seed = SEED + rnd
        log = env.root / f"writes-{rnd}.log"
        target = res["device"] if frontend == "fuse" else res["socket"]
        writer = subprocess.Popen([sys.executable, "-c", WRITER, frontend, target, name, str(log), str(seed),
                                   str(size)], stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: len(log_lines(log)) >= 40 or writer.poll() is not None, "40 acknowledged writes")  # noqa: B023
            assert writer.poll() is None, f"writer died early: {writer.stderr.read() if writer.stderr else ''}"
            kill_pid(env.daemon_pid(name))  # mid-writes: the writer has one write outstanding at any time
            # A killed daemon never hangs its writers: the outstanding write fails within a bound.
            rc = writer.wait(BOUND)
            assert rc == 3, f"writer exit {rc}"
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(BOUND)
            if writer.stderr:
                writer.stderr.close()
        lines = log_lines(log)
        assert [i for i, _, _ in lines] == list(range(len(lines)))
        acked += [(rnd, i, off, n) for i, off, n in lines]
        nxt = writes_of(seed, size, len(lines) + 1)[-1]
        in_flight.append((nxt[0], nxt[1]))
        print(f"owner {node}: {len(lines)} acknowledged writes before kill -9")

    res = env.attach(disk, "node-c", name, frontend)
    assert res["epoch"] == 3
    live = env.json("status", name)
    expected = {c for _, _, off, n in acked for c in chunks_of(off, n)}
    assert live["owner"] == "node-c" and live["dirty_chunks"] >= len(expected)
    env.baton("detach", name)

    loc = locate(str(disk), writable=False)
    try:
        bits = loc.record.dirty_bits()
        status = loc.record.status()
    finally:
        loc.close()
    dirty = {c for c in range(size // CHUNK) if bits.test(c)}
    missing = sorted(expected - dirty)
    assert not missing, f"acknowledged writes not in the record: chunks {missing[:20]} (seed {SEED})"
    # Over-reporting is bounded by the writes in flight at the kills (the writer has one outstanding).
    possible = expected | {c for off, n in in_flight for c in chunks_of(off, n)}
    extra = sorted(dirty - possible)
    assert not extra, f"chunks marked that no write touched: {extra[:20]}"
    assert status["dirty_chunks"] == len(dirty) and status["epoch"] == 3 and status["clean"]

    # And the data: replaying the acknowledged writes in order gives the disk, outside the in-flight ranges.
    model = bytearray(size)
    for rnd in range(2):
        count = sum(1 for r, *_ in acked if r == rnd)
        for off, n, data in writes_of(SEED + rnd, size, count):
            model[off : off + n] = data
    with open(disk, "rb") as f:
        actual = bytearray(f.read(size))
    for off, n in in_flight:
        actual[off : off + n] = model[off : off + n]
    assert actual == model, f"acknowledged data differs after takeovers (seed {SEED})"


def test_ext4_survives_kill9_and_takeover(env: Env) -> None:
    need_tool("mkfs.ext4", "e2fsck")
    print(f"BATON_SEED={SEED}")
    disk = raw_disk(env.root, 128 * MiB)
    env.json("init", str(disk))
    name = new_name("tkfs")
    dev = env.attach(disk, "node-a", name)["device"]
    subprocess.run(["mkfs.ext4", "-F", "-q", dev], check=True, capture_output=True, timeout=120)
    # Mount privately, write files and sync them, then keep writing (unsynced) until the owner dies.
    script = (f"m=$(mktemp -d); mount {dev} $m; mkdir $m/d; "
              f"for i in 0 1 2 3 4 5 6 7; do head -c 300000 /dev/urandom > $m/d/f$i; done; sync -f $m/d; "
              f"(cd $m/d && sha256sum f*); echo READY; "
              f"i=0; while true; do head -c 200000 /dev/urandom > $m/g$i 2>/dev/null || true; i=$((i+1)); done")
    sh = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
    sums: list[str] = []
    # Only this file system is synced (syncfs): a global sync can block on any other stuck file system.
    watchdog = threading.Timer(2 * BOUND, lambda: os.killpg(sh.pid, signal.SIGKILL))
    watchdog.start()
    try:
        assert sh.stdout is not None
        for line in sh.stdout:
            if line.strip() == "READY":
                break
            sums.append(line.strip())
        assert len(sums) == 8, sums
        time.sleep(0.5)  # writes in flight through the device
        kill_pid(env.daemon_pid(name))
        time.sleep(0.5)
    finally:
        watchdog.cancel()
        # The mount dies with its namespace (a lazy unmount of a dead device).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sh.pid, signal.SIGKILL)
        sh.wait(BOUND)
        if sh.stdout:
            sh.stdout.close()
    dev = env.attach(disk, "node-b", name)["device"]
    r = subprocess.run(["e2fsck", "-fy", dev], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1), f"e2fsck -fy: rc {r.returncode}\n{r.stdout}{r.stderr}"
    r = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"e2fsck -fn after repair: rc {r.returncode}\n{r.stdout}{r.stderr}"
    # The files synced before the kill are intact on the new owner.
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                        f"m=$(mktemp -d); mount -o ro {dev} $m; cd $m/d && sha256sum f*; cd /; umount $m"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == sums
    st = env.json("status", name)
    assert st["epoch"] == 2 and st["owner"] == "node-b" and st["dirty_chunks"] > 0


def _write_once(frontend: str, target: str, export: str, offset: int) -> int:
    """One 4 KiB write in a child process (it may block on a dying device): its errno, or 0 if acknowledged."""
    return subprocess.run([sys.executable, "-c", WRITER, frontend, target, export, os.devnull, "0", "0"],
                          env=os.environ | {"ONE_WRITE": str(offset)}, timeout=BOUND).returncode


@pytest.mark.parametrize("frontend", ["fuse", "nbd"])
def test_superseded_owner_gets_eio_exits_5_and_never_writes_again(env: Env, frontend: str) -> None:
    disk = raw_disk(env.root, 64 * MiB)
    init = env.json("init", str(disk))
    size = int(init["data_size"])
    name = new_name("tkf")
    env_a, env_b = Env(env.root, "-a"), Env(env.root, "-b")  # two "nodes": separate run and device dirs
    proc = subprocess.Popen([sys.executable, "-m", "baton", "attach", str(disk), "--node", "node-a", "--name",
                             name, "--frontend", frontend, "--foreground"], env=env_a.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    env_a.names.add(name)
    try:
        target_a = str(env_a.dev_dir / name if frontend == "fuse" else env_a.run_dir / f"{name}.sock")
        wait_for(lambda: (env_a.run_dir / name / "daemon.json").exists() or proc.poll() is not None,
                 "A ready")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert _write_once(frontend, target_a, name, 0) == 0  # A owns the disk: a first-touch write succeeds
        res_b = env_b.attach(disk, "node-b", name, frontend)
        assert res_b["epoch"] == 2
        target_b = res_b["device"] if frontend == "fuse" else res_b["socket"]

        def record_area() -> bytes:
            with open(disk, "rb") as f:
                f.seek(size)
                return f.read()

        before = record_area()
        assert _write_once(frontend, target_a, name, 10 * CHUNK) == errno.EIO  # first touch: A finds epoch 2
        assert proc.wait(BOUND) == 5, "the superseded daemon must exit with status 5 (Fenced)"
        assert record_area() == before, "the superseded owner wrote the record"
        st = env_b.json("status", name)
        assert (st["epoch"], st["owner"], st["dirty_chunks"]) == (2, "node-b", 1)
        # B still works and records.
        assert _write_once(frontend, target_b, name, 20 * CHUNK) == 0
        assert env_b.json("status", name)["dirty_chunks"] == 2
        env_b.baton("detach", name)
        st = env.json("status", str(disk))
        assert (st["epoch"], st["owner"], st["clean"], st["dirty_chunks"]) == (2, "node-b", True, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(BOUND)
        if proc.stderr:
            proc.stderr.close()
        env_a.cleanup()
        env_b.cleanup()


def test_second_live_attach_on_same_machine_is_refused(env: Env) -> None:
    disk = raw_disk(env.root, 64 * MiB)
    env.json("init", str(disk))
    name = new_name("tk2")
    res = env.attach(disk, "node-a", name)
    r = env.baton("attach", str(disk), "--node", "node-a", "--name", new_name("tk2b"), rc=3)
    assert "already attached" in r.stderr and name in r.stderr
    r = env.baton("attach", str(disk), "--node", "node-b", "--name", name, rc=3)
    assert "already attached" in r.stderr
    st = env.json("status", name)
    assert st["pid"] == res["pid"] and st["epoch"] == 1 and st["state"] == "running"
