"""Point-in-time backups (issue 4 §3/§7) while writes go on, and a backup killed with SIGKILL then redone by the
next owner.

1. In-process, for exact control of the freeze point: a writer thread writes through the Tracker behind a gate.
   The test closes the gate (no write in progress), copies the disk, starts ``run_backup`` and opens the gate only
   from the engine's "after-freeze" hook, so the copy is the disk at the freeze point while the writer hammers
   chunks the backup has not read yet (copy-before-write must save them). The restored snapshot must equal the
   copy byte for byte, and every chunk written after the freeze must still be marked in the record.
2. Real processes: `baton attach` (FUSE), data written through /dev/baton/NAME, a first backup, a large rewrite,
   `baton backup NAME` killed by SIGKILL of the daemon while the record shows the backup in progress, takeover by
   another node, `baton backup` again: complete, and it restores byte-identical to the disk.

Seeds are fixed and printed (env BATON_SEED, default 20261124).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.backup import run_backup
from baton.daemon import open_tracker
from baton.record.placement import init_disk, locate
from baton.repo import Repository
from baton.restore import restore
from baton.tracker.core import Tracker
from conftest import need_root, need_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20
KiB = 1 << 10
BOUND = 30.0
SEED = int(os.environ.get("BATON_SEED", "20261124"))


def read_all(t: Tracker) -> bytes:
    return b"".join(t.read(off, min(4 * MiB, t.size - off)) for off in range(0, t.size, 4 * MiB))


class GatedWriter(threading.Thread):
    """Random 4..64 KiB writes through the tracker, one at a time, each inside ``gate``. Holding the gate means
    no write is in progress. Records (offset, length, phase) of every completed write."""

    def __init__(self, tracker: Tracker, seed: int) -> None:
        super().__init__(daemon=True)
        self.t = tracker
        self.rng = random.Random(seed)
        self.gate = threading.Lock()
        self.stop = threading.Event()
        self.phase = 0
        self.done: list[tuple[int, int, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                n = self.rng.randrange(1, 17) * 4 * KiB
                off = self.rng.randrange(0, (self.t.size - n) // 4096 + 1) * 4096
                data = self.rng.randbytes(n)
                with self.gate:
                    self.t.write(off, data)
                    self.done.append((off, n, self.phase))
        except BaseException as e:  # surfaced by the test
            self.error = e

    def writes_in(self, phase: int) -> list[tuple[int, int]]:
        return [(o, n) for o, n, p in self.done if p == phase]


def pit_backup(tracker: Tracker, repo: Repository, w: GatedWriter, phase: int) -> tuple[dict[str, Any], bytes]:
    """Close the gate, copy the disk, back up; the writer resumes (next phase) right after the freeze."""
    w.gate.acquire()
    try:
        frozen_copy = read_all(tracker)
        before = len(w.done)
    except BaseException:
        w.gate.release()
        raise
    released = [False]

    def fault(point: str) -> None:
        if point == "after-freeze" and not released[0]:
            w.phase = phase
            released[0] = True
            w.gate.release()

    def slow(done: int, total: int) -> None:
        time.sleep(0.004)  # let the writer overtake the reader (not a timing assertion)

    try:
        res = run_backup(tracker, repo, node="pit-node", name="pit", batch_chunks=64, progress=slow, fault=fault)
    finally:
        if not released[0]:
            w.gate.release()
    assert len(w.done) > before, "the writer made no progress during the backup"
    return res, frozen_copy


def test_point_in_time_while_a_writer_hammers(tmp_path: Path) -> None:
    print(f"BATON_SEED={SEED}")
    disk = tmp_path / "pit.img"
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)
    init_disk(str(disk), record="tail", chunk_size=16 * KiB).close()
    loc = locate(str(disk))
    loc.record.attach("pit-node")
    tracker = open_tracker(loc)
    repo = Repository.init(str(tmp_path / "repo"))
    w = GatedWriter(tracker, SEED)
    try:
        w.start()
        time.sleep(0.3)  # phase 0: some history before the first backup
        results = []
        for phase in (1, 2):
            res, copy = pit_backup(tracker, repo, w, phase)
            assert w.error is None, w.error
            results.append(res)
            out = tmp_path / f"restored-{phase}.img"
            r = restore(repo, repo.read_manifest(res["snapshot"]), str(out))
            assert r is not None
            got = out.read_bytes()
            assert len(got) == len(copy)
            if got != copy:
                bad = [c for c in range(0, len(copy), 16 * KiB) if got[c : c + 16 * KiB] != copy[c : c + 16 * KiB]]
                raise AssertionError(f"backup {phase} is not the disk at its freeze point: chunks "
                                     f"{[c // (16 * KiB) for c in bad[:20]]} differ (seed {SEED})")
            print(f"backup {phase}: {res['mode']} ({res['reason'] or 'from the record'}), "
                  f"{res['chunks_read']} chunks read, {res['cbw_copies']} copy-before-write saves, "
                  f"{len(w.writes_in(phase))} writes during/after it")
        assert results[0]["mode"] == "full" and results[1]["mode"] == "incremental"
        assert sum(r["cbw_copies"] for r in results) > 0, "no write raced the reader: the test proved nothing"
        # Writes after the last freeze are not in that backup, so they must still be marked.
        w.stop.set()
        w.join(BOUND)
        assert not w.is_alive() and w.error is None
        dirty = set(loc.record.dirty_bits().iter_set(loc.header.nchunks))
        after = {c for off, n in w.writes_in(2) for c in range(off // (16 * KiB), (off + n - 1) // (16 * KiB) + 1)}
        assert after and after <= dirty, f"writes racing the backup lost from the record: {sorted(after - dirty)[:20]}"
    finally:
        w.stop.set()
        if w.gate.locked():
            with contextlib.suppress(RuntimeError):
                w.gate.release()
        w.join(BOUND)
        tracker.close()
        with contextlib.suppress(Exception):
            loc.record.detach()
        loc.close()


# ------------------------------------------------------------------------------------------ kill -9 mid-backup


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = os.environ | {"BATON_RUN_DIR": str(root / "run"), "BATON_DEV_DIR": str(root / "dev")}

    def baton(self, *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=180,
                           env=self.env)
        assert r.returncode == rc, f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n{r.stdout}{r.stderr}"
        return r

    def json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.baton(*args, "--json").stdout)
        return out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("losetup", "fusermount3")
    if not Path("/dev/fuse").exists():
        pytest.skip("needs /dev/fuse")
    yield Env(tmp_path)


def write_random(dev: str, seed: int, offset: int, length: int) -> None:
    rng = random.Random(seed)
    fd = os.open(dev, os.O_WRONLY)
    try:
        for off in range(offset, offset + length, MiB):
            os.pwrite(fd, rng.randbytes(min(MiB, offset + length - off)), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_backup_killed_mid_way_then_taken_over_and_redone(env: Env) -> None:
    print(f"BATON_SEED={SEED}")
    disk = env.root / "kb.img"
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
    init = env.json("init", str(disk), "--chunk-size", "16K")
    size = int(init["data_size"])
    repo = str(env.root / "repo")
    env.baton("repo", "init", repo)
    name = f"pit-{uuid.uuid4().hex[:8]}"
    attached = False
    try:
        dev = env.json("attach", str(disk), "--node", "node-a", "--name", name)["device"]
        attached = True
        write_random(dev, SEED, 0, 96 * MiB)
        first = env.json("backup", name, "--repo", repo)
        assert first["mode"] == "full"
        write_random(dev, SEED + 1, 32 * MiB, 192 * MiB)  # 12288 chunks to back up: several record batches
        bk = subprocess.Popen([sys.executable, "-m", "baton", "backup", name, "--repo", repo, "--json"],
                              env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + BOUND
            while True:
                st = env.json("status", name)
                if st.get("backup_in_progress"):
                    break
                assert bk.poll() is None, "the backup ended before it could be killed"
                assert time.monotonic() < deadline, "the backup never showed as in progress"
                time.sleep(0.02)
            time.sleep(0.3)  # well inside it
            pid = json.loads((env.root / "run" / name / "daemon.json").read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            _, err = bk.communicate(timeout=BOUND)
        finally:
            if bk.poll() is None:
                bk.kill()
                bk.wait(BOUND)
        assert bk.returncode == 8, f"backup CLI after its daemon died: rc {bk.returncode}\n{err}"
        assert "did it die" in err or "daemon" in err, err

        res = env.json("attach", str(disk), "--node", "node-b", "--name", name)
        assert res["epoch"] == 2
        st = env.json("status", name)
        assert st["backup_in_progress"] is None  # the frozen set was merged into node-b's slot
        again = env.json("backup", name, "--repo", repo)
        print(f"first {first['mode']}; killed backup; redo on node-b: {again['mode']} ({again['reason']}), "
              f"{again['chunks_read']} chunks read, parent {again['parent']}")
        assert again["node"] == "node-b"
        env.baton("detach", name)
        attached = False
        assert env.json("status", str(disk))["dirty_chunks"] == 0
        out = env.root / "restored.img"
        r = env.json("restore", again["snapshot"], "--repo", repo, "--to", str(out))
        assert r is not None
        with open(disk, "rb") as a, open(out, "rb") as b:
            for off in range(0, size, 4 * MiB):
                n = min(4 * MiB, size - off)
                assert a.read(n) == b.read(n), f"restore differs from the disk in [{off}, {off + n}) (seed {SEED})"
            assert b.read() == b""
    finally:
        if attached:
            subprocess.run([sys.executable, "-m", "baton", "detach", name], capture_output=True, timeout=60,
                           env=env.env)


def test_backup_of_an_attached_disk_with_a_relative_repo_path(env: Env) -> None:
    """The backup runs inside the daemon, whose working directory is not the caller's: a relative --repo (and
    --key-file) must mean the caller's."""
    disk = env.root / "rel.img"
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)
    env.baton("init", str(disk))
    env.baton("repo", "init", str(env.root / "relrepo"))
    name = f"pitr-{uuid.uuid4().hex[:8]}"
    env.baton("attach", str(disk), "--node", "node-a", "--name", name)
    try:
        r = subprocess.run([sys.executable, "-m", "baton", "backup", name, "--repo", "relrepo", "--json"],
                           capture_output=True, text=True, timeout=120, env=env.env, cwd=env.root)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["mode"] == "full"
    finally:
        env.baton("detach", name)


HAMMER = r'''
import mmap, os, random, sys
rng = random.Random(int(sys.argv[3]))
size = int(sys.argv[2])
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 64 * 1024)
while True:
    n = rng.randrange(1, 17) * 4096
    off = rng.randrange(0, (size - n) // 4096 + 1) * 4096
    buf[:n] = rng.randbytes(n)
    os.pwrite(fd, memoryview(buf)[:n], off)
'''


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def test_point_in_time_through_the_device_with_a_paused_writer(env: Env) -> None:
    """The same through /dev/baton/NAME and the CLI: the writer process is stopped (SIGSTOP: its synchronous
    O_DIRECT write has returned, nothing is in flight), the disk is copied, `baton backup` starts, and the writer
    resumes only once status shows the backup in progress (the freeze is done)."""
    print(f"BATON_SEED={SEED}")
    disk = env.root / "pd.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    size = int(env.json("init", str(disk), "--chunk-size", "16K")["data_size"])
    repo = str(env.root / "repo")
    env.baton("repo", "init", repo)
    name = f"pitd-{uuid.uuid4().hex[:8]}"
    dev = env.json("attach", str(disk), "--node", "node-a", "--name", name)["device"]
    writer = subprocess.Popen([sys.executable, "-c", HAMMER, dev, str(size), str(SEED)])
    try:
        time.sleep(0.5)
        for phase in (1, 2):
            os.kill(writer.pid, signal.SIGSTOP)
            deadline = time.monotonic() + BOUND
            while not _stopped(writer.pid):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with open(disk, "rb") as f:
                copy = f.read(size)
            bk = subprocess.Popen([sys.executable, "-m", "baton", "backup", name, "--repo", repo, "--json"],
                                  env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + BOUND
                while bk.poll() is None and not env.json("status", name).get("backup_in_progress"):
                    assert time.monotonic() < deadline, "the backup never showed as in progress"
                    time.sleep(0.01)
            finally:
                os.kill(writer.pid, signal.SIGCONT)
            out, err = bk.communicate(timeout=120)
            assert bk.returncode == 0, err
            res = json.loads(out)
            assert writer.poll() is None, "the writer died"
            target = env.root / f"restored-{phase}.img"
            env.baton("restore", res["snapshot"], "--repo", repo, "--to", str(target))
            got = target.read_bytes()
            assert len(got) == size
            bad = [c for c in range(0, size, 16 * KiB) if got[c : c + 16 * KiB] != copy[c : c + 16 * KiB]]
            assert not bad, (f"backup {phase} differs from the disk at its freeze point in chunks "
                             f"{[c // (16 * KiB) for c in bad[:20]]} (seed {SEED})")
            print(f"backup {phase}: {res['mode']}, {res['chunks_read']} chunks read, "
                  f"{res['cbw_copies']} copy-before-write saves")
            assert res["mode"] == ("full" if phase == 1 else "incremental")
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGCONT)
            writer.kill()
            writer.wait(BOUND)
        subprocess.run([sys.executable, "-m", "baton", "detach", name], capture_output=True, timeout=60,
                       env=env.env)
