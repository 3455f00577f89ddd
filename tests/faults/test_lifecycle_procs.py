"""The whole-lifecycle model test, real-process tier (issue 9 §1): a seeded random walk of writes, kill -9 of the
owner's daemon (idle, under a writer, in the middle of a backup, after a backup's first checkpoint), takeovers by
other nodes, clean detaches with offline backups (also killed), `--full` backups, two repositories in turn,
restores, forget and prune, all through the `baton` CLI and /dev/baton/NAME (FUSE + loop) or the NBD socket.

The oracle is a shadow of the disk, updated only with acknowledged writes. Every backup that exits 0, and every
complete snapshot a killed backup left behind, is restored at once and compared byte for byte with the shadow at
its freeze point; earlier snapshots are restored again at random later steps (after prunes). No writes run
during a backup in this tier, so a snapshot's freeze point is the shadow when the backup started (the in-process
tier covers writes racing a backup). A write in flight when its daemon died may or may not have landed: the next
owner reads its range back, every 512-byte sector must hold the old or the new data, and the shadow takes what
is there. After each takeover the whole data area must equal the shadow (no acknowledged write lost).

Beyond data: the next backup into a repository that has a successful backup must be incremental, across kill
-9 takeovers, detach/offline and backups into the other repository (issue 9 defect 12), unless a backup into it
was killed since (its checkpoint may legitimately change the parent) or its last snapshot was forgotten; an
incremental whose parent is the last successful snapshot (of either repository) reads at least the chunks
written since it and at most those plus the ranges of writes in flight at kills; when that snapshot was left
complete by a killed backup (which may have died before its record commit), plus the chunks that backup may
have read. A full says why.

Replay: BATON_SEED (default 20261124) and BATON_LIFECYCLE_STEPS (default 60). The seed and every step are printed
(`pytest -s` shows them live; a failure message repeats the steps).

Geometry: a 64 MiB image of random data with 4 KiB chunks, so a full backup reads 16 K chunks and checkpoints
every 4096 (backup.DEFAULT_BATCH_CHUNKS, which no CLI option or environment variable changes) about four times.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from baton.util import pid_alive
from faults.procs import BOUND, Env, kill_pid, log_lines, need_fuse_loop, wait_for, writer_argv, writes_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

SEED = int(os.environ.get("BATON_SEED", "20261124"))
STEPS = int(os.environ.get("BATON_LIFECYCLE_STEPS", "60"))
KiB, MiB = 1 << 10, 1 << 20
IMAGE = 64 * MiB
CHUNK = 4 * KiB
NODES = ("n1", "n2", "n3")
SECTOR = 512
CLI_TIMEOUT = 90.0


@dataclass
class Snap:
    sid: str
    repo: str       # "R1" | "R2"
    version: int    # len(Walk.ops) at the freeze point
    step: int
    how: str        # what produced it (for messages)
    settled: bool = True  # False: a killed backup left it complete; its record commit may not have happened


class Found(AssertionError):
    """A violated invariant; the message names the step."""


class Walk:
    """The system under test (three node environments over one image) and its model (the shadow and its
    history, the snapshots that must restore, what the next backup must be)."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.envs = {n: Env(root, f"-{n}") for n in NODES}
        for e in self.envs.values():
            e.env["BATON_SPILL_DIR"] = str(root)
        self.name = f"hD-{uuid.uuid4().hex[:8]}"
        self.disk = root / f"{self.name}.img"
        self.repos = {r: str(root / r) for r in ("R1", "R2")}
        self.steps: list[str] = []
        self.step_no = 0
        # The disk's state: owner node and whether its daemon lives ("dead": killed, record not clean).
        self.owner: str | None = None
        self.state = "detached"  # detached | attached | dead
        self.frontend = "fuse"
        self.target = ""
        self.epoch = 0
        self.procs: list[subprocess.Popen[Any]] = []  # writers and backups this test started
        # The model.
        self.size = self.nchunks = 0
        self.initial = b""
        self.shadow = bytearray()
        self.ops: list[tuple[str, int, Any]] = []  # ("w", seed, count) | ("p", offset, bytes)
        self.snaps: dict[str, Snap] = {}  # restorable: exited 0 (or complete after a kill), not forgotten
        self.last_ok: Snap | None = None  # the last snapshot whose commit we know of
        # Per repository: its last snapshot, if the next backup into it must be incremental (it has one, not
        # forgotten, and no backup into it was killed since: a checkpoint may change the parent).
        self.expect_incr: dict[str, Snap] = {}
        self.dirty_since: set[int] = set()  # chunks written since last_ok
        self.inflight_since: set[int] = set()  # chunks of writes in flight at kills since last_ok
        # Per repository: chunks written or in flight since the last backup into it that exited 0 (its record
        # commit known to have happened); None before any. A killed backup can publish its manifest and die
        # before the record commit: its chunks stay marked (docs/design.md, commit row) and the next incremental
        # from that snapshot reads them again. They are all among these.
        self.unsettled: dict[str, set[int] | None] = {"R1": None, "R2": None}
        self.killed_backup_since = False
        self.uncertain: list[tuple[int, bytes]] = []  # writes in flight at a kill, not yet read back
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------- plumbing

    def say(self, what: str) -> None:
        line = f"step {self.step_no}: {what}"
        self.steps.append(line)
        print(line, flush=True)

    def fail(self, what: str) -> Found:
        tail = "\n".join(self.steps[-40:])
        return Found(f"{what}\n(lifecycle-procs seed={SEED}, step {self.step_no}; replay with BATON_SEED={SEED}"
                     f"{'' if STEPS == 60 else f' BATON_LIFECYCLE_STEPS={STEPS}'})\nlast steps:\n{tail}")

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def env(self, node: str | None = None) -> Env:
        return self.envs[node or self.owner or NODES[0]]

    def chunks(self, off: int, n: int) -> set[int]:
        return set(range(off // CHUNK, (off + n - 1) // CHUNK + 1))

    def shadow_at(self, version: int) -> bytearray:
        if version == len(self.ops):
            return bytearray(self.shadow)
        img = bytearray(self.initial)
        for kind, a, b in self.ops[:version]:
            if kind == "w":
                for off, n, data in writes_of(a, self.size, b):
                    img[off : off + n] = data
            else:
                img[a : a + len(b)] = b
        return img

    def read_data_area(self) -> bytes:
        with open(self.disk, "rb") as f:
            return f.read(self.size)

    def wait_dead(self, pid: int) -> None:
        wait_for(lambda: not pid_alive(pid), f"pid {pid} to die after SIGKILL")

    def kill_owner(self) -> int:
        pid = self.env().daemon_pid(self.name)
        kill_pid(pid)
        self.wait_dead(pid)
        self.state = "dead"
        return pid

    def snapshot_ids(self, repo: str) -> set[str]:
        d = Path(self.repos[repo]) / "snapshots"  # created by the first backup
        return set(os.listdir(d)) if d.is_dir() else set()

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        data = random.Random(SEED ^ 0x5EED).randbytes(IMAGE)
        with open(self.disk, "wb") as f:
            f.write(data)
        env = self.env(NODES[0])
        init = env.json("init", str(self.disk), "--chunk-size", "4K")
        self.size = int(init["data_size"])
        self.nchunks = int(init["chunks"])
        self.initial = data[: self.size]
        self.shadow = bytearray(self.initial)
        for r in self.repos.values():
            env.baton("repo", "init", r, timeout=CLI_TIMEOUT)
        print(f"lifecycle-procs seed={SEED} steps={STEPS} image={IMAGE >> 20} MiB chunk={CHUNK >> 10} KiB "
              f"chunks={self.nchunks} name={self.name}", flush=True)

    # ------------------------------------------------------------------------------------------ the steps

    def takeover(self) -> None:
        prev = self.owner if self.state == "dead" else None
        node = self.rng.choice([n for n in NODES if n != prev])
        frontend = "nbd" if self.rng.random() < 0.25 else "fuse"
        self.say(f"takeover: attach on {node} ({frontend}) after {self.state}"
                 f"{f' owner {self.owner}' if self.owner else ''}")
        res = self.env(node).attach(self.disk, node, self.name, frontend)
        if res["epoch"] <= self.epoch:
            raise self.fail(f"attach on {node}: epoch {res['epoch']}, not above the previous {self.epoch}")
        self.epoch = int(res["epoch"])
        self.owner, self.state, self.frontend = node, "attached", frontend
        self.target = res["device"] if frontend == "fuse" else res["socket"]
        self.count(f"takeover-{frontend}")
        # Writes in flight at a kill: each sector holds the old or the new data; the shadow takes what is there.
        actual = self.read_data_area()
        for off, data in self.uncertain:
            for s in range(off, off + len(data), SECTOR):
                got = actual[s : s + SECTOR]
                if got != self.shadow[s : s + SECTOR] and got != data[s - off : s - off + SECTOR]:
                    raise self.fail(f"sector at {s} (write in flight at a kill, {off}+{len(data)}) holds neither "
                                    "the old nor the new data")
            self.ops.append(("p", off, actual[off : off + len(data)]))
            self.shadow[off : off + len(data)] = actual[off : off + len(data)]
        self.uncertain = []
        if actual != self.shadow:
            bad = [c for c in range(self.nchunks) if actual[c * CHUNK : (c + 1) * CHUNK]
                   != self.shadow[c * CHUNK : (c + 1) * CHUNK]]
            raise self.fail(f"after the takeover the disk differs from the acknowledged writes in {len(bad)} "
                            f"chunks, first {bad[:10]}")
        if not self.killed_backup_since:
            st = self.env().json("status", self.name)
            if int(st["dirty_chunks"]) < len(self.dirty_since):
                raise self.fail(f"status after the takeover: {st['dirty_chunks']} dirty chunks, but "
                                f"{len(self.dirty_since)} chunks were written since the last backup")

    def write(self) -> None:
        n = self.rng.randint(1, 40)
        seed = self.rng.randrange(1 << 62)
        self.say(f"write: {n} writes (seed {seed}) through {self.frontend}")
        log = self.root / f"w-{self.step_no}.log"
        p = subprocess.Popen(writer_argv(self.frontend, self.target, self.name, log, seed, self.size),
                             env=os.environ | {"WRITES": str(n)}, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        try:
            _, err = p.communicate(timeout=BOUND * 2)
        except subprocess.TimeoutExpired:
            raise self.fail(f"{n} writes did not finish within {BOUND * 2} s") from None
        if p.returncode != 0:
            raise self.fail(f"writer exit {p.returncode} with a live owner: {err}")
        self.apply(seed, len(log_lines(log)))
        self.count("write")

    def apply(self, seed: int, count: int) -> None:
        self.ops.append(("w", seed, count))
        for off, n, data in writes_of(seed, self.size, count):
            self.shadow[off : off + n] = data
            self.dirty_since |= self.chunks(off, n)
            self._unsettle(self.chunks(off, n))

    def _unsettle(self, chunks: set[int]) -> None:
        for u in self.unsettled.values():
            if u is not None:
                u |= chunks

    def kill_idle(self) -> None:
        pid = self.kill_owner()
        self.say(f"kill -9 idle daemon of {self.owner} (pid {pid})")
        self.count("kill-idle")

    def kill_writing(self) -> None:
        want = self.rng.randint(1, 30)
        seed = self.rng.randrange(1 << 62)
        log = self.root / f"w-{self.step_no}.log"
        p = subprocess.Popen(writer_argv(self.frontend, self.target, self.name, log, seed, self.size),
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        wait_for(lambda: len(log_lines(log)) >= want or p.poll() is not None, f"{want} acknowledged writes")
        if p.poll() is not None:
            raise self.fail(f"writer died early: exit {p.returncode}: {p.stderr.read() if p.stderr else ''}")
        pid = self.kill_owner()
        try:
            rc = p.wait(BOUND)
        except subprocess.TimeoutExpired:
            raise self.fail(f"a writer hung on its device after its daemon died (>{BOUND} s)") from None
        if p.stderr:
            p.stderr.close()
        if rc != 3:
            raise self.fail(f"writer exit {rc} after its daemon died, expected its write to fail (3)")
        acked = len(log_lines(log))
        self.say(f"kill -9 daemon of {self.owner} (pid {pid}) under a writer (seed {seed}) after {acked} "
                 "acknowledged writes")
        self.apply(seed, acked)
        off, n, data = writes_of(seed, self.size, acked + 1)[-1]
        self.uncertain.append((off, data))
        self.inflight_since |= self.chunks(off, n)
        self._unsettle(self.chunks(off, n))
        self.count("kill-writing")

    def detach(self) -> None:
        self.say(f"detach on {self.owner}")
        self.env().baton("detach", self.name, timeout=CLI_TIMEOUT)
        st = self.env().json("status", str(self.disk))
        if not st["clean"]:
            raise self.fail(f"record not clean after a clean detach: {st}")
        self.state = "detached"
        self.count("detach")

    def _backup_args(self, repo: str, full: bool, offline_node: str | None) -> list[str]:
        target = [str(self.disk), "--node", offline_node] if offline_node else [self.name]
        return ["backup", *target, "--repo", self.repos[repo], "--json", *(["--full"] if full else [])]

    def backup(self, offline: bool = False) -> None:
        repo = self.rng.choice(["R1", "R2"])
        full = self.rng.random() < 0.15
        node = self.rng.choice(NODES) if offline else None
        where = f"offline on {node}" if offline else f"on {self.owner}"
        self.say(f"backup {where} into {repo}{' --full' if full else ''}")
        r = self.env(node).baton(*self._backup_args(repo, full, node), rc=None, timeout=CLI_TIMEOUT)
        if r.returncode != 0:
            raise self.fail(f"backup {where} into {repo} exited {r.returncode} with no fault injected:\n"
                            f"{r.stdout}{r.stderr}")
        res = json.loads(r.stdout)
        self.check_result(res, repo, full)
        self.committed(res["snapshot"], repo, f"{res['mode']} backup {where}")
        self.count(f"backup-{'offline' if offline else 'online'}-{res['mode']}")

    def check_result(self, res: dict[str, Any], repo: str, full: bool) -> None:
        mode, reason = res["mode"], res["reason"]
        self.say(f"  -> {res['snapshot'][:12]} {mode}{f' ({reason})' if reason else ''}, read "
                 f"{res['chunks_read']} chunks, parent {(res['parent'] or '-')[:12]}")
        if full and mode != "full":
            raise self.fail(f"--full gave mode {mode}")
        if mode == "full":
            if not reason:
                raise self.fail("a full backup without a reason")
            if res["chunks_read"] != self.nchunks:
                raise self.fail(f"a full backup read {res['chunks_read']} of {self.nchunks} chunks")
        if repo in self.expect_incr and not full and mode != "incremental":
            raise self.fail(f"expected an incremental into {repo} (its last snapshot "
                            f"{self.expect_incr[repo].sid[:12]}, no backup into it killed since), got {mode} "
                            f"({reason})")
        if mode == "incremental" and self.last_ok is not None and res["parent"] == self.last_ok.sid:
            lo, hi = len(self.dirty_since), len(self.dirty_since | self.inflight_since)
            why = f"{lo} were written since, {hi} with the writes in flight at kills"
            if not self.last_ok.settled:
                # The killed backup that left the parent may have died before its record commit: its own
                # chunks may be read again, and no others.
                u = self.unsettled[repo]
                hi = self.nchunks if u is None else len(self.dirty_since | self.inflight_since | u)
                why += f", {hi} with those its killed backup may not have committed to the record"
            if not lo <= res["chunks_read"] <= hi:
                raise self.fail(f"incremental from {self.last_ok.sid[:12]} read {res['chunks_read']} chunks; {why}")

    def committed(self, sid: str, repo: str, how: str) -> None:
        snap = Snap(sid, repo, len(self.ops), self.step_no, how)
        self.snaps[sid] = snap
        self.last_ok = snap
        self.expect_incr[repo] = snap
        self.dirty_since, self.inflight_since = set(), set()
        self.unsettled[repo] = set()
        self.killed_backup_since = False
        self.restore(snap)

    def backup_killed(self, offline: bool = False) -> None:
        repo = self.rng.choice(["R1", "R2"])
        full = self.rng.random() < 0.5
        when = self.rng.choice(["delay", "checkpoint", "checkpoint"])
        node = self.rng.choice(NODES) if offline else None
        where = f"offline on {node}" if offline else f"on {self.owner}"
        delay = self.rng.uniform(0.0, 0.6)
        before = self.snapshot_ids(repo)
        p = self.env(node).popen(*self._backup_args(repo, full, node))
        self.procs.append(p)
        victim = 0
        try:
            if when == "delay":
                time.sleep(delay)
            else:
                wait_for(lambda: p.poll() is not None or self.snapshot_ids(repo) - before, "a first checkpoint",
                         timeout=CLI_TIMEOUT)
            if offline:
                victim = p.pid
                kill_pid(victim)
            else:
                victim = self.env().daemon_pid(self.name)
                kill_pid(victim)
            self.wait_dead(victim)
            out, err = p.communicate(timeout=BOUND)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(BOUND)
        if offline:  # the killed process had attached the record; one that finished detached it again
            self.owner, self.state = node, "detached" if p.returncode == 0 else "dead"
        else:
            self.state = "dead"
        what = f"{'the backup process' if offline else 'the daemon'} (pid {victim})"
        at = f"after {delay:.2f} s" if when == "delay" else "at its first checkpoint"
        self.say(f"backup {where} into {repo}{' --full' if full else ''}, kill -9 {what} {at}: exit "
                 f"{p.returncode}")
        if p.returncode == 0:
            # It finished before the kill: a successful backup like any other.
            res = json.loads(out)
            self.check_result(res, repo, full)
            self.committed(res["snapshot"], repo, f"{res['mode']} backup {where} (finished before its kill)")
            self.count("backup-finished-before-kill")
            return
        if not offline and not (err.strip() or out.strip()):
            raise self.fail(f"a backup whose daemon died exited {p.returncode} without saying why")
        self.count(f"backup-killed-{'offline' if offline else 'online'}-{when}")
        self.killed_backup_since = True
        self.expect_incr.pop(repo, None)
        # Anything it left that claims to be complete must be a correct snapshot too.
        new = self.snapshot_ids(repo) - before
        listed = json.loads(self.env().baton("snapshots", "--repo", self.repos[repo], "--all", "--json",
                                             timeout=CLI_TIMEOUT).stdout) if new else []
        for sid in sorted(new):
            if any(x["snapshot_id"] == sid and x["complete"] for x in listed):
                self.say(f"  killed backup left complete snapshot {sid[:12]}")
                snap = Snap(sid, repo, len(self.ops), self.step_no, "complete snapshot of a killed backup",
                            settled=False)
                self.snaps[sid] = snap
                self.last_ok = snap
                self.dirty_since, self.inflight_since = set(), set()
                self.restore(snap)
            else:
                self.count("checkpoints-left")

    def restore(self, snap: Snap) -> None:
        out = self.root / "restore.img"
        try:
            r = self.env().baton("restore", snap.sid, "--repo", self.repos[snap.repo], "--to", str(out), "--json",
                                 rc=None, timeout=CLI_TIMEOUT)
            if r.returncode != 0:
                raise self.fail(f"restore of {snap.sid[:12]} ({snap.how}, step {snap.step}) exited "
                                f"{r.returncode}:\n{r.stdout}{r.stderr}")
            with open(out, "rb") as f:
                got = f.read()
        finally:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
        want = self.shadow_at(snap.version)
        if got != want:
            bad = [c for c in range(self.nchunks) if got[c * CHUNK : (c + 1) * CHUNK] != want[c * CHUNK : (c + 1) * CHUNK]]
            zeros = sum(1 for c in bad if not any(got[c * CHUNK : (c + 1) * CHUNK]))
            raise self.fail(f"snapshot {snap.sid[:12]} in {snap.repo} ({snap.how}, step {snap.step}) restores wrong "
                            f"data while every command exited 0: {len(bad)} of {self.nchunks} chunks differ "
                            f"({zeros} of them restored as zeros; size {len(got)} vs {len(want)}), first "
                            f"{bad[:8]}")
        self.count("restore")

    def restore_earlier(self) -> None:
        snap = self.snaps[self.rng.choice(sorted(self.snaps))]
        self.say(f"restore earlier snapshot {snap.sid[:12]} from {snap.repo} (step {snap.step}, {snap.how})")
        self.restore(snap)

    def forget_prune(self) -> None:
        repo = self.rng.choice(["R1", "R2"])
        mine = sorted(s for s, v in self.snaps.items() if v.repo == repo)
        if len(mine) < 2:
            return self.restore_earlier() if self.snaps else None
        victims = self.rng.sample(mine, self.rng.randint(1, min(2, len(mine) - 1)))
        self.say(f"forget {[v[:12] for v in victims]} in {repo}, prune --grace 0, verify")
        env = self.env()
        env.baton("forget", *victims, "--repo", self.repos[repo], "--json", timeout=CLI_TIMEOUT)
        env.baton("prune", "--repo", self.repos[repo], "--grace", "0", "--json", timeout=CLI_TIMEOUT)
        env.baton("verify", "--repo", self.repos[repo], "--json", timeout=CLI_TIMEOUT)
        for v in victims:
            del self.snaps[v]
            if repo in self.expect_incr and v == self.expect_incr[repo].sid:
                del self.expect_incr[repo]  # its parent is gone: a full (with a reason) is right
        self.count("forget-prune")
        return None

    # --------------------------------------------------------------------------------------------- the walk

    def step(self) -> None:
        self.step_no += 1
        rng = self.rng
        if self.state == "attached":
            choices = {"write": 26, "kill_writing": 8, "kill_idle": 4, "backup": 18, "backup_killed": 14,
                       "detach": 6, "restore_earlier": 5, "forget_prune": 4}
            if self.last_ok is None:  # the first backup of the disk: kill it after a checkpoint often
                choices["backup_killed"] = 20
        elif self.state == "dead":
            choices = {"takeover": 10, "restore_earlier": 1, "forget_prune": 1}
        else:
            choices = {"takeover": 10, "offline_backup": 7, "offline_backup_killed": 3, "restore_earlier": 1,
                       "forget_prune": 1}
        if not self.snaps:
            choices.pop("restore_earlier", None)
            choices.pop("forget_prune", None)
        op = rng.choices(list(choices), weights=list(choices.values()))[0]
        if op == "offline_backup":
            self.backup(offline=True)
        elif op == "offline_backup_killed":
            self.backup_killed(offline=True)
        else:
            getattr(self, op)()

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(BOUND)
            for s in (p.stdout, p.stderr):
                if s:
                    s.close()
        for node, e in self.envs.items():
            st = e.run_dir / self.name / "daemon.json"
            if not st.exists():
                continue
            r = e.baton("detach", self.name, rc=None, timeout=CLI_TIMEOUT)
            if r.returncode != 0:
                print(f"teardown: detach on {node}: rc {r.returncode}: {r.stderr.strip()}", flush=True)
                with contextlib.suppress(OSError, ValueError, KeyError):
                    pid = e.daemon_pid(self.name)
                    if pid_alive(pid):
                        kill_pid(pid)
                        self.wait_dead(pid)
                    e.baton("detach", self.name, rc=None, timeout=CLI_TIMEOUT)  # cleans up a dead one
        for p in (self.disk, self.root / "restore.img"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def test_lifecycle_random_walk_real_processes(tmp_path: Path) -> None:
    need_fuse_loop()
    rng = random.Random(SEED)
    walk = Walk(tmp_path, rng)
    t0 = time.monotonic()
    try:
        walk.setup()
        while walk.step_no < STEPS:
            walk.step()
        # End on a backup that must restore: take over if needed, back up, restore every snapshot left.
        walk.step_no += 1
        if walk.state != "attached":
            walk.takeover()
        walk.backup()
        for sid in sorted(walk.snaps):
            walk.restore(walk.snaps[sid])
    finally:
        walk.teardown()
        print(f"lifecycle-procs seed={SEED}: {walk.step_no} steps in {time.monotonic() - t0:.1f} s; "
              f"{dict(sorted(walk.stats.items()))}", flush=True)
    assert walk.stats.get("restore", 0) > 0


@pytest.mark.parametrize("stop", ["kill9-daemon", "sigint-offline"])
def test_full_backup_stopped_after_a_checkpoint_then_next_backup_restores_right(tmp_path: Path, stop: str) -> None:
    """Issue 9 defect 1, the walk's finding kept as a fixed sequence: a full backup stopped after its first
    checkpoint (the owner's daemon killed -9, or an offline backup interrupted with Ctrl-C), then the next backup
    into the same repository (after a takeover, or offline) must restore the whole disk, not zeros where the
    full backup had not reached."""
    need_fuse_loop()
    walk = Walk(tmp_path, random.Random(SEED))
    try:
        walk.setup()
        env = walk.env("n1")
        repo = walk.repos["R1"]
        before = walk.snapshot_ids("R1")
        if stop == "kill9-daemon":
            env.attach(walk.disk, "n1", walk.name)
            p = env.popen("backup", walk.name, "--repo", repo, "--json")
        else:
            p = env.popen("backup", str(walk.disk), "--node", "n1", "--repo", repo, "--json")
        walk.procs.append(p)
        wait_for(lambda: p.poll() is not None or walk.snapshot_ids("R1") - before, "a first checkpoint")
        assert p.poll() is None, "the full backup ended before its first checkpoint"
        if stop == "kill9-daemon":
            pid = env.daemon_pid(walk.name)
            kill_pid(pid)
            walk.wait_dead(pid)
        else:
            p.send_signal(signal.SIGINT)
        p.communicate(timeout=BOUND)
        assert p.returncode != 0, "the stopped backup exited 0"
        if stop == "kill9-daemon":
            walk.envs["n2"].attach(walk.disk, "n2", walk.name)
            res = walk.envs["n2"].json("backup", walk.name, "--repo", repo)
        else:
            res = env.json("backup", str(walk.disk), "--node", "n2", "--repo", repo)
        print(f"{stop}: next backup {res['mode']} ({res['reason']}), read {res['chunks_read']} chunks, parent "
              f"{res['parent']}")
        walk.restore(Snap(res["snapshot"], "R1", 0, 0, f"{res['mode']} backup after a stopped full"))
    finally:
        walk.teardown()


def test_offline_backup_on_a_node_whose_old_daemon_died_after_the_disk_moved_on(tmp_path: Path) -> None:
    """Found by the walk (seed 4, 100 steps): n2's daemon is killed, n3 takes the disk over and detaches it
    cleanly; an offline backup of the detached disk on n2, where n2's dead attachment (epoch 1) was never
    cleaned up, must run: the record (clean, epoch 2) says nobody owns the disk, so n2's stale state file must
    not make the CLI claim that n2 "still owns" it."""
    need_fuse_loop()
    walk = Walk(tmp_path, random.Random(SEED))
    try:
        walk.setup()
        n2, n3 = walk.envs["n2"], walk.envs["n3"]
        n2.attach(walk.disk, "n2", walk.name)
        pid = n2.daemon_pid(walk.name)
        kill_pid(pid)
        walk.wait_dead(pid)
        assert n3.attach(walk.disk, "n3", walk.name)["epoch"] == 2
        n3.baton("detach", walk.name)
        r = n2.baton("backup", str(walk.disk), "--node", "n2", "--repo", walk.repos["R1"], "--json", rc=None)
        assert r.returncode == 0, f"offline backup of a cleanly detached disk on n2: rc {r.returncode}\n{r.stdout}"
        res = json.loads(r.stdout)
        walk.restore(Snap(res["snapshot"], "R1", 0, 0, "offline backup on a node with a dead attachment"))
    finally:
        walk.teardown()
