"""The whole-lifecycle model (issue 9, tier 1): record x tracker x backup engine x repository, in one process.

This is the oracle for DESIGN.md's invariants 1 and 2. A Hypothesis state machine drives one shared disk
through writes, kills of the owner at every named point (idle, in the middle of a write's mark, and during
full and incremental backups: after the freeze, after each checkpoint, during an upload, before the commit,
after the snapshot is published and before the record knows it, and after the commit), takeovers by other
nodes, clean detaches with offline backups, ``--full`` backups, restores, forget + prune, backups that alternate between two repositories, repository faults (ENOSPC, a lost index, a
corrupt pack) and record damage (a header copy, a bitmap page). On a format-v3 record (the default layout)
owners alternate between a userspace frontend (writes through the tracker, marked in Baton's bitmaps) and a
simulated dm frontend (``SimEra``: writes recorded only in dm-era's metadata, folded into the record at the
takeover, at every backup's freeze and at a clean detach, with power failures inside the fold; a node without
dm-era distrusts what a crashed dm owner left; era metadata lost or re-created).

* The shadow disk is the oracle. Every backup that returns (the CLI would exit 0), and every complete snapshot
  a killed backup left, is restored at once and must equal the shadow at its freeze point, byte for byte;
  earlier ones are restored again at random (after forget/prune, faults and takeovers). A restore may fail only
  with a typed error when the repository was damaged on purpose; it may never return wrong bytes.
* "A kill" is a process kill plus a power loss of the record device: every later record write fails, the
  storage the dying process uses refuses every call, the volatile cache of the record device is dropped,
  kept or torn (seeded), and the Record/Tracker/Repository objects are abandoned, cleaning up nothing.
* Data writes are acknowledged only after FUA (the data device never loses an acknowledged write), so the
  shadow is exact.

The seed is printed (``--hypothesis-seed`` = BATON_SEED in CI; see scripts/run-tests.sh). CI runs
BATON_LIFECYCLE_EXAMPLES x up to 50 steps (CI: 500 runs, about 14,000 steps, at least 10,000 checked).
"""

from __future__ import annotations

import os
import random
import tempfile
import uuid
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import note as _hnote
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from baton.backup import run_backup
from baton.errors import BatonError, RepoCorrupt, RepoError, RepoFull
from baton.format.record import BLOCK, ERA_ZERO_BYTES, PLACEMENT_TAIL, FormatError, RecordHeader, geometry_for
from baton.record.core import Record, format_record
from baton.repo import Repository
from baton.repo.maintenance import forget, prune
from baton.restore import restore
from baton.storage import open_base_store
from baton.testing.crashdev import CrashDevice, PowerLoss
from baton.testing.faulty_storage import Fault, FaultyStore
from baton.tracker.core import Tracker
from baton.tracker.era import fold

CHUNK = 4096
NCHUNKS = 40
DATA = NCHUNKS * CHUNK
NODES = ("n1", "n2", "n3")
BATCH = 4  # chunks per checkpoint: a full backup of this disk stores ten checkpoints
LAYOUTS = ((3, 2), (3, 2), (3, 1), (2, 2), (1, 0))  # (record format version, repository regions)
ERA_SIZE = ERA_ZERO_BYTES  # the model's era region: dm-era itself is simulated (SimEra), so it stays this small
STEPS = [0]  # steps executed in this process (the CI run must reach 10,000)
TOTALS: dict[str, int] = {}  # steps by kind, and backups by outcome, printed after the run
# "after-publish": the snapshot's manifest is in the repository, the record's commit has not happened.
KILL_POINTS = ("after-freeze", "after-batch", "upload", "before-commit", "after-publish", "after-commit")


def _in_hypothesis() -> bool:
    from hypothesis.control import _current_build_context

    return _current_build_context.value is not None


def note(msg: str) -> None:
    """Hypothesis' note inside the machine; print when a fixed sequence is replayed outside it."""
    try:
        _hnote(msg)
    except InvalidArgument:
        print(msg)


class Killed(BaseException):
    """The owner's process died at a named point (never caught by the engine's error handling)."""


class SimEra:
    """dm-era as the record sees it, loaded over the disk's era metadata (an :class:`baton.tracker.era.EraSource`).
    Its metadata is the kernel's and survives every crash: dm-era commits a block's writeset bit before it issues
    the write (kernels with the 2021 fixes), so a write that reached the disk is listed. ``take_snapshot`` opens a
    new era; ``written_since(F)`` lists the blocks written in eras F .. current-1, as a held snapshot does."""

    def __init__(self) -> None:
        self.fresh()

    def fresh(self) -> None:
        """Fresh metadata (a zeroed superblock): era 1, nothing written."""
        self.era = 1
        self.last: dict[int, int] = {}  # block -> era of its latest write
        self.held: int | None = None  # era when the held metadata snapshot was taken

    def write(self, chunks: range) -> None:
        for c in chunks:
            self.last[c] = self.era

    def take_snapshot(self) -> int:
        assert self.held is None, "a metadata snapshot is already held (dm-era refuses a second one)"
        self.era += 1
        self.held = self.era
        return self.era

    def written_since(self, era: int) -> list[int]:
        assert self.held is not None
        return [c for c, e in self.last.items() if era <= e < self.held]

    def drop_snapshot(self) -> None:
        self.held = None


class FrozenImage:
    """The snapshot device of a dm backup: the disk as it was at the freeze."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise OSError(30, "the frozen image is read-only")

    def sync(self) -> None:
        return None

    def close(self) -> None:
        return None


class SimPit:
    """The dm frontend's point in time (``Tracker.pit``): the freeze folds the era metadata into the record,
    then the backup reads a frozen image."""

    def __init__(self, machine: LifecycleMachine) -> None:
        self.m = machine

    def freeze(self) -> tuple[FrozenImage, int]:
        assert self.m.rec is not None
        res = fold(self.m.rec, self.m.era, pending=True)
        return FrozenImage(bytes(self.m.ddev.pread(0, DATA))), res.era

    def check(self) -> None:
        return None

    def thaw(self) -> None:
        return None


class LifecycleMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**32 - 1), layout=st.sampled_from(LAYOUTS))
    def setup(self, seed: int, layout: tuple[int, int] = (3, 2)) -> None:
        """``layout`` is (record format version, repository regions): v3 (with its era region: dm owners too) with a
        region per repository, v3 with one region that the two repositories take from each other, v2, and a v1
        record (one last_backup)."""
        version, nrepos = layout
        note(f"lifecycle seed {seed}, record v{version} with {nrepos} repository regions")
        self.rng = random.Random(seed)
        geo = geometry_for(DATA, CHUNK, 3, nrepos)
        era = (geo.size, ERA_SIZE) if version >= 3 else (0, 0)  # v3: the era region after the structures
        size = geo.size + era[1]
        self.rdev = CrashDevice(size, seed=seed)
        self.ddev = CrashDevice(DATA, seed=seed + 1)
        self.disk_uuid = str(uuid.uuid4())
        hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=3, chunk_size=CHUNK, disk_uuid=self.disk_uuid,
                           lineage="", disk_size=DATA + size, data_size=DATA, record_offset=DATA,
                           record_size=size, pages_per_slot=geo.pages_per_slot, nrepos=nrepos,
                           version=version, era_offset=era[0], era_size=era[1])
        self.version = version
        self.era = SimEra()  # the disk's era metadata (v3): survives every crash, as dm-era's does
        self.frontend = ""  # the current owner's: "fuse" (userspace, through the tracker) or "dm" (SimEra)
        format_record(self.rdev, hdr)
        # The disk holds data before Baton sees it (its first backup is full); a few chunks stay zero.
        self.shadow = bytearray(self.rng.randbytes(DATA))
        for c in self.rng.sample(range(NCHUNKS), 4):
            self.shadow[c * CHUNK : (c + 1) * CHUNK] = bytes(CHUNK)
        self.ddev.durable[:] = self.shadow
        self.urls = [f"memory://lifecycle-{uuid.uuid4().hex}" for _ in range(2)]
        self.bases = [open_base_store(u) for u in self.urls]
        self.faults: list[list[Fault]] = [[], []]
        for i, u in enumerate(self.urls):
            Repository.init(u, store=self.bases[i], pack_target=64 * 1024)
        self.damaged = [False, False]  # a pack was corrupted on purpose: restores may fail (typed), never lie
        self.rec: Record | None = None
        self.tracker: Tracker | None = None
        self.state = "detached"  # detached | attached | dead
        self.node = ""
        self.good: list[tuple[int, str, bytes, str]] = []  # (repo, snapshot, image at freeze, mode)
        self.forgotten: set[str] = set()
        self.tmp = tempfile.mkdtemp(prefix="baton-lifecycle-")
        self.counts: dict[str, int] = {}

    def teardown(self) -> None:
        if hasattr(self, "good") and _in_hypothesis():
            event(f"backups that returned: {min(len(self.good), 10)}{'+' if len(self.good) >= 10 else ''}")
            for name, n in sorted(self.counts.items()):
                event(f"step {name}: {'0' if not n else '1-4' if n < 5 else '5+'}")
        if hasattr(self, "tmp"):
            for f in os.listdir(self.tmp):
                os.unlink(os.path.join(self.tmp, f))
            os.rmdir(self.tmp)

    # ------------------------------------------------------------------------------------------- helpers

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        STEPS[0] += 1
        TOTALS[name] = TOTALS.get(name, 0) + 1

    def _repo(self, i: int, kill_at_put: int | None = None) -> tuple[Repository, FaultyStore]:
        """The repository as one process sees it: the injected faults, and (``kill_at_put``) its death at a
        put, after which it reaches the store no more."""
        rules = self.faults[i] if kill_at_put is None else [Fault("put", kind="dead", after=kill_at_put),
                                                               *self.faults[i]]
        store = FaultyStore(self.bases[i], rules, seed=self.rng.randrange(1 << 30))
        return Repository.open(self.urls[i], store=store), store

    def _take(self, node: str, frontend: str = "", *, dm_here: bool = True, fail_after: int | None = None) -> None:
        """Take over for ``node`` with ``frontend`` ("dm" only on a v3 record). A dm owner makes FLAG_ERA_PENDING
        durable, "loads the era target" (any metadata snapshot a dead owner held is dropped) and folds what the
        metadata holds since era_folded. Any other owner of a record with FLAG_ERA_PENDING folds it through a
        temporary era target (``dm_here``) or, on a node without dm-era, distrusts the record. ``fail_after``:
        power fails after that many record I/Os of the fold (the process dies: PowerLoss rises)."""
        rec = Record.load(self.rdev)
        dm = frontend == "dm" and self.version >= 3
        rec.attach(node, "dm" if dm else "fuse" if frontend else "")
        self.rec = rec
        self.tracker = Tracker(rec, self.ddev, size=DATA, spill_dir=self.tmp)
        self.node = node
        self.state = "attached"
        self.frontend = "dm" if dm else "fuse"
        self.era.held = None  # the new era target: a snapshot held by a dead owner's backup is dropped
        if fail_after is not None:
            self.rdev.power_fail_after = fail_after
        if dm:
            rec.begin_era()
            fold(rec, self.era, pending=True)
            self.tracker.pit = SimPit(self)
        elif rec.era_pending:
            self._count(f"era-pending-{'fold' if dm_here else 'distrust'}")
            if dm_here:
                fold(rec, self.era, pending=False)
            else:
                rec.distrust("the previous owner tracked this disk with dm-era and did not detach cleanly; this "
                             "node has no dm-era to read its changes")
                rec.set_era_folded(rec.header.era_folded, pending=False)
        self.rdev.power_fail_after = None

    def _write_some(self, n: int) -> None:
        assert self.tracker is not None
        for _ in range(n):
            off = self.rng.randrange(0, DATA - 512) // 512 * 512
            ln = min(DATA - off, self.rng.choice([512, 4096, 6144, 3 * CHUNK]))
            data = self.rng.randbytes(ln)
            if self.frontend == "dm":
                # dm-era: the block's bit is committed before the write is issued; Baton's record is not involved.
                self.era.write(range(off // CHUNK, (off + ln - 1) // CHUNK + 1))
                self.ddev.pwrite(off, data)
                self.ddev.sync()
            else:
                self.tracker.write(off, data, fua=True)
            self.shadow[off : off + ln] = data

    def _die(self, mode: str) -> None:
        """The owner's process is gone: record device loses power, nothing is cleaned up. Its repository
        locks stay behind; on a real host their pid is dead, so the next locker treats them as stale (here the
        "process" is this test's own, so they are removed as a real host's staleness check would)."""
        self.rdev.crash(mode)
        for base in self.bases:
            for o in list(base.list("locks/")):
                base.delete(o.key)
        self.rec = None
        self.tracker = None
        self.state = "dead"

    def _check_restore(self, repo_i: int, snap: str, image: bytes, why: str) -> None:
        repo, _ = self._repo(repo_i)
        out = os.path.join(self.tmp, "restored.img")
        try:
            m = repo.read_manifest(snap)
            restore(repo, m, out)
            with open(out, "rb") as f:
                got = f.read()
        except (RepoCorrupt, RepoError) as e:
            if self.damaged[repo_i]:
                note(f"restore of {snap[:8]} failed on a damaged repository, as allowed: {e}")
                return
            raise AssertionError(f"{why}: snapshot {snap[:12]} of repo {repo_i} does not restore: {e}") from e
        finally:
            if os.path.exists(out):
                os.unlink(out)
        if got != image:
            bad = sorted({i // CHUNK for i in range(DATA) if got[i] != image[i]})
            raise AssertionError(f"{why}: snapshot {snap[:12]} of repo {repo_i} restores wrong data in chunks "
                                 f"{bad[:20]} (of {NCHUNKS})")

    # ------------------------------------------------------------------------------------------- steps

    @precondition(lambda self: self.state == "attached")
    @rule(n=st.integers(1, 4))
    def write(self, n: int) -> None:
        self._count("write")
        self._write_some(n)

    @precondition(lambda self: self.state == "attached" and self.frontend != "dm")
    @rule(after=st.integers(0, 5), mode=st.sampled_from(["drop", "keep", "tear"]), rare=st.integers(0, 1))
    def kill_during_write(self, after: int, mode: str, rare: int) -> None:
        """Power fails ``after`` record I/Os into a write's mark: that write was never acknowledged."""
        if rare % 2:
            return
        self._count("kill_during_write")
        assert self.tracker is not None
        off = self.rng.randrange(0, NCHUNKS) * CHUNK
        data = self.rng.randbytes(CHUNK)
        self.rdev.power_fail_after = after
        try:
            self.tracker.write(off, data, fua=True)
            self.shadow[off : off + CHUNK] = data  # acknowledged before the power failed
        except (PowerLoss, BatonError, OSError):
            # Not acknowledged. Its data never reached the disk (mark comes first), so the shadow stands.
            assert bytes(self.ddev.pread(off, CHUNK)) == bytes(self.shadow[off : off + CHUNK])
        self._die(mode)

    @precondition(lambda self: self.state == "attached")
    @rule(mode=st.sampled_from(["drop", "keep", "tear"]), rare=st.integers(0, 1))
    def kill(self, mode: str, rare: int) -> None:
        if rare % 2:
            return
        self._count("kill")
        self._die(mode)

    @precondition(lambda self: self.state in ("dead", "detached"))
    @rule(node=st.sampled_from(NODES), frontend=st.sampled_from(["fuse", "dm", "dm"]), dm_here=st.booleans(),
          fail=st.sampled_from((None,) * 6 + tuple(range(6))), mode=st.sampled_from(["drop", "keep", "tear"]))
    def takeover(self, node: str, frontend: str = "fuse", dm_here: bool = True, fail: int | None = None,
                 mode: str = "drop") -> None:
        """A takeover by a userspace or a dm owner (v3). ``fail``: power fails inside its fold (takeovers of a
        record whose era is pending), ``fail`` record I/Os in."""
        self._count(f"takeover-{frontend if self.version >= 3 else 'fuse'}")
        pending = Record.load(self.rdev).era_pending
        try:
            self._take(node, frontend, dm_here=dm_here, fail_after=fail if pending or frontend == "dm" else None)
        except (PowerLoss, BatonError, OSError) as e:
            if fail is None:
                raise
            note(f"power failed during the takeover's fold: {type(e).__name__}")
            self.rdev.power_fail_after = None
            self._die(mode)

    @precondition(lambda self: self.state == "attached")
    @rule(rare=st.integers(0, 1))
    def detach(self, rare: int) -> None:
        if rare % 2:
            return
        self._count("detach")
        assert self.rec is not None
        if self.frontend == "dm":
            fold(self.rec, self.era, pending=False)  # the top device is gone: the last fold hands era's writes over
        self.rec.detach()
        self.rec = None
        self.tracker = None
        self.state = "detached"

    @precondition(lambda self: self.state in ("attached", "detached"))
    @rule(repo_i=st.integers(0, 1), full=st.sampled_from([False, False, False, True]), kill_at=st.sampled_from((None,) * 5 + KILL_POINTS),
          nth=st.integers(0, 6), writes=st.integers(0, 3), mode=st.sampled_from(["drop", "keep", "tear"]))
    def backup(self, repo_i: int, full: bool, kill_at: str | None, nth: int, writes: int, mode: str) -> None:
        """A backup in the owner's daemon (attached) or offline (a detached disk, on a node of its own).
        Writes go on between its batches. ``kill_at`` kills the process at the ``nth`` occurrence of a point
        (or the last one reached)."""
        offline = self.state == "detached"
        self._count(f"backup-{'offline' if offline else 'online'}-{kill_at or 'no-kill'}{'-full' if full else ''}")
        if offline:
            self._take(self.rng.choice(NODES))
        assert self.tracker is not None
        repo, store = self._repo(repo_i, kill_at_put=nth if kill_at == "upload" else None)
        before = {o.key for o in self.bases[repo_i].list("snapshots/")}
        frozen_image = bytes(self.shadow)
        seen = {p: 0 for p in KILL_POINTS}

        def fault(point: str) -> None:
            if point == "after-freeze":
                nonlocal frozen_image
                frozen_image = bytes(self.shadow)
            if kill_at == point:
                if seen[point] >= nth or point != "after-batch":
                    self._kill_hooks(store)
                    raise Killed(point)
                seen[point] += 1
            if point == "after-batch" and writes and not offline:
                self._write_some(writes)

        note(f"backup repo={repo_i} full={full} kill_at={kill_at}#{nth} offline={offline} node={self.node}")
        try:
            res = run_backup(self.tracker, repo, node=self.node, full=full, batch_chunks=BATCH, fault=fault)
        except (Killed, OSError, BatonError) as e:
            if store.dead:  # killed at a named point or during an upload (whatever the clean-up then raised)
                self._die(mode)
                self._left_complete(repo_i, before, frozen_image)
                return
            if not isinstance(e, BatonError):
                raise
            note(f"backup failed cleanly: {type(e).__name__}: {e}")
            if offline:
                self._end_offline()
            return
        note(f"backup ok: {res['mode']} ({res['reason']}) read {res['chunks_read']} chunks -> {res['snapshot'][:8]}")
        self.good.append((repo_i, res["snapshot"], frozen_image, res["mode"]))
        self._count(f"returned-{res['mode']}")
        self._check_restore(repo_i, res["snapshot"], frozen_image, f"backup {res['mode']} just made")
        if offline:
            self._end_offline()

    def _left_complete(self, repo_i: int, before: set[str], frozen_image: bytes) -> None:
        """A backup killed after-publish or after-commit left its snapshot complete: it must restore its freeze
        point like any other, now and later. (An upload kill dies before its put, and the manifest's is the
        last: it never leaves one.)"""
        plain = Repository.open(self.urls[repo_i], store=self.bases[repo_i])
        for key in sorted({o.key for o in self.bases[repo_i].list("snapshots/")} - before):
            m = plain.read_manifest(key.split("/", 1)[1])
            if not m.complete:
                continue  # a checkpoint: the next backup's parent, checked through that backup's restore
            TOTALS["killed-left-complete"] = TOTALS.get("killed-left-complete", 0) + 1  # an outcome, not a step
            note(f"the killed backup left complete snapshot {m.snapshot_id[:8]}")
            self.good.append((repo_i, m.snapshot_id, frozen_image, "killed-complete"))
            self._check_restore(repo_i, m.snapshot_id, frozen_image, "complete snapshot of a killed backup")

    def _kill_hooks(self, store: FaultyStore) -> None:
        """From the kill point on, the dying process writes nothing anywhere."""
        store.dead = True
        self.rdev.power_fail_after = 0

    def _end_offline(self) -> None:
        assert self.rec is not None
        if self.frontend == "dm":
            fold(self.rec, self.era, pending=False)
        self.rec.detach()
        self.rec = None
        self.tracker = None
        self.state = "detached"

    @precondition(lambda self: bool(self.good))
    @rule(pick=st.integers(0, 1 << 16))
    def restore_old(self, pick: int) -> None:
        self._count("restore_old")
        live = [g for g in self.good if g[1] not in self.forgotten]
        if not live:
            return
        repo_i, snap, image, mode = live[pick % len(live)]
        self._check_restore(repo_i, snap, image, f"earlier {mode} snapshot")

    @precondition(lambda self: bool(self.good))
    @rule(pick=st.integers(0, 1 << 16), rare=st.integers(0, 3))
    def forget_and_prune(self, pick: int, rare: int) -> None:
        if rare % 4:
            return
        self._count("forget_and_prune")
        live = [g for g in self.good if g[1] not in self.forgotten]
        if not live:
            return
        repo_i, snap, _, _ = live[pick % len(live)]
        repo, _ = self._repo(repo_i)
        try:
            forget(repo, [snap])
            self.forgotten.add(snap)
            repo, _ = self._repo(repo_i)
            prune(repo, grace=0.0, max_unused=0.0)
        except RepoFull as e:  # an injected ENOSPC: a clean failure; later restores show nothing was lost
            note(f"forget/prune failed cleanly: {e}")
        except RepoCorrupt as e:
            if not self.damaged[repo_i]:
                raise
            note(f"prune refused on a damaged repository, as allowed: {e}")

    def repo_full(self, repo_i: int, after: int) -> None:
        """The next pack upload to this repository fails with ENOSPC."""
        self._count("repo_full")
        self.faults[repo_i].append(Fault("put", "packs/", "enospc", after=after, times=1))

    def lose_index(self, repo_i: int) -> None:
        self._count("lose_index")
        base = self.bases[repo_i]
        for o in list(base.list("index/")):
            base.delete(o.key)

    def corrupt_pack(self, repo_i: int, pick: int) -> None:
        self._count("corrupt_pack")
        base = self.bases[repo_i]
        packs = [o for o in base.list("packs/") if o.size > 200]
        if not packs:
            return
        o = packs[pick % len(packs)]
        raw = bytearray(base.get(o.key))
        pos = 100 + pick % (len(raw) - 100)
        raw[pos] ^= 0x5A
        base.put(o.key, bytes(raw))
        self.damaged[repo_i] = True

    @rule(kind=st.sampled_from(["repo_full", "lose_index", "corrupt_pack", "damage_header_copy", "damage_page",
                                "era_metadata_lost"]),
          repo_i=st.integers(0, 1), n=st.integers(0, 1 << 16), rare=st.integers(0, 3))
    def fault(self, kind: str, repo_i: int, n: int, rare: int) -> None:
        """One repository fault or piece of record damage (one step in four draws one: faults are rarer than
        the work they disturb). Record damage happens while no owner runs."""
        if rare:
            return
        if kind == "repo_full":
            self.repo_full(repo_i, n % 4)
        elif kind == "lose_index":
            self.lose_index(repo_i)
        elif kind == "corrupt_pack":
            self.corrupt_pack(repo_i, n)
        elif self.state != "attached":
            if kind == "damage_header_copy":
                self.damage_header_copy(n % 2)
            elif kind == "era_metadata_lost":
                self.era_metadata_lost()
            else:
                self.damage_page(n % 8, n // 8 % 2, n // 16 % 8)

    def era_metadata_lost(self) -> None:
        """The era metadata is gone (damaged, zeroed and loaded fresh, or re-created): whatever it held that was
        not folded yet is lost, so the next fold must distrust the record (its era is below era_folded)."""
        self._count("era_metadata_lost")
        self.era.fresh()

    def damage_header_copy(self, copy: int) -> None:
        """One header copy goes bad (both at once needs `init --reset`, covered by the record's own tests)."""
        self._count("damage_header_copy")
        other = 1 - copy
        try:
            RecordHeader.unpack(bytes(self.rdev.pread(other * BLOCK, BLOCK)), copy=other)
        except FormatError:
            return
        pos = copy * BLOCK + 64
        self.rdev.durable[pos : pos + 8] = b"\xde\xad\xbe\xef" * 2

    def damage_page(self, region: int, copy: int, sector: int) -> None:
        self._count("damage_page")
        rec = Record.load(self.rdev)
        blk = rec.geo.page_block(region % rec.geo.nregions, 0, copy)
        pos = blk * BLOCK + sector * 512 + 40
        self.rdev.durable[pos : pos + 4] = b"\x00\xff\x00\xff"


EXAMPLES = int(os.environ.get("BATON_LIFECYCLE_EXAMPLES", "60"))


def test_lifecycle_model() -> None:
    """The machine, EXAMPLES runs of up to 50 steps; prints how many steps ran (CI: at least 10,000)."""
    STEPS[0] = 0
    TOTALS.clear()
    run_state_machine_as_test(LifecycleMachine, settings=settings(
        settings(), max_examples=EXAMPLES, stateful_step_count=50, deadline=None))
    print(f"lifecycle model: {STEPS[0]} steps in {EXAMPLES} runs (seed: see --hypothesis-seed / BATON_SEED)")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(TOTALS.items())))
    if os.environ.get("BATON_LIFECYCLE_MIN_STEPS"):
        assert STEPS[0] >= int(os.environ["BATON_LIFECYCLE_MIN_STEPS"]), STEPS[0]


def run_steps(*steps: tuple[str, dict[str, Any]], seed: int = 1) -> LifecycleMachine:
    """Replay a fixed sequence of steps (regression tests for sequences the machine found)."""
    m = LifecycleMachine()
    m.setup(seed=seed)
    try:
        for name, kw in steps:
            getattr(m, name)(**kw)
    finally:
        m.teardown()
    return m


@pytest.mark.parametrize("kill_at", ["after-batch", "upload"])
def test_killed_full_backup_then_takeover_is_not_silently_incomplete(kill_at: str) -> None:
    """Defect 1 of issue 9 (found by the machine): a full backup killed after its first checkpoint pointed the
    record at a partial snapshot whose base is empty, while the chunks the full backup had not reached were
    not marked; after a takeover the next "incremental" restored them as zeros."""
    run_steps(
        ("takeover", {"node": "n1"}),
        ("write", {"n": 4}),
        ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"}),
        ("write", {"n": 2}),
        ("backup", {"repo_i": 0, "full": True, "kill_at": kill_at, "nth": 0, "writes": 0, "mode": "keep"}),
        ("takeover", {"node": "n2"}),
        ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"}),
    )


@pytest.mark.parametrize("full", [False, True])
def test_backup_killed_after_publishing_its_snapshot_then_takeover(full: bool) -> None:
    """The window the real-process walk hit (seed 20261124, step 28): the daemon died after the snapshot's
    manifest was published and before the record's commit. The snapshot must restore its freeze point, and the
    next backup, on another node, is an incremental from it that reads at most that backup's chunks again (the
    record still marks them: over-read, never under-read) and restores right. Before the kill point existed, the
    in-process model never reached this state (a kill at "upload" dies before its put, and the manifest's put
    is the last), and no test restored the complete snapshot a killed backup left."""
    plain = ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"})
    m = run_steps(
        ("takeover", {"node": "n1", "frontend": "fuse"}),
        plain,
        ("write", {"n": 3}),
        ("backup", {"repo_i": 0, "full": full, "kill_at": "after-publish", "nth": 0, "writes": 0, "mode": "keep"}),
        ("takeover", {"node": "n2", "frontend": "fuse"}),
        plain,
    )
    assert [g[3] for g in m.good] == ["full", "killed-complete", "incremental"]
    repo = Repository.open(m.urls[0], store=m.bases[0])
    killed, nxt = (repo.read_manifest(g[1]) for g in m.good[1:])
    if full:
        # The record still names the previous snapshot: the next backup may build on either (both hold the
        # chunks it does not read); it reads the written chunks again, not the whole disk.
        assert nxt.parent in (killed.snapshot_id, m.good[0][1]) and 0 < nxt.chunks_read < NCHUNKS
    else:
        assert nxt.parent == killed.snapshot_id and 0 < nxt.chunks_read <= killed.chunks_read


def test_one_damaged_header_copy_costs_one_full_backup_not_all() -> None:
    """Defect 5 of issue 9: the suspect state of a damaged header copy was never cleared by a successful
    commit, so every later backup of the same attachment was full."""
    m = run_steps(
        ("damage_header_copy", {"copy": 0}),
        ("takeover", {"node": "n1"}),
        ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"}),
        ("write", {"n": 2}),
        ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"}),
    )
    assert [g[3] for g in m.good] == ["full", "incremental"]


def test_incremental_after_the_index_files_were_lost_restores() -> None:
    """Defect 7 of issue 9 (found by the machine): with the index files gone, a backup exited 0 with an
    incremental whose unchanged chunks the index lacked; it could not be restored until rebuild-index."""
    m = run_steps(
        ("takeover", {"node": "n1"}),
        ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"}),
        ("lose_index", {"repo_i": 0}),
        ("write", {"n": 2}),
        ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"}),
        ("restore_old", {"pick": 0}),
    )
    assert [g[3] for g in m.good] == ["full", "incremental"]


def test_killed_first_offline_backup_then_takeover_is_not_silently_incomplete() -> None:
    """Defect 1 as the machine shrank it (seed 20261124, the fix reverted): the first, offline (full) backup of
    a detached disk killed after its first checkpoint; a takeover and a clean detach; the next offline backup
    was an "incremental" of 0 chunks that restored chunks 16-39 wrong."""
    m = run_steps(
        ("backup", {"repo_i": 0, "full": False, "kill_at": "after-batch", "nth": 0, "writes": 0, "mode": "drop"}),
        ("takeover", {"node": "n1"}),
        ("detach", {"rare": 0}),
        ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"}),
    )
    assert [g[3] for g in m.good] == ["full"]


# ---------------------------------------------------------------------------------------------- dm owners (v3)


def _plain_backup(**kw: Any) -> tuple[str, dict[str, Any]]:
    return ("backup", {"repo_i": 0, "full": False, "kill_at": None, "nth": 0, "writes": 0, "mode": "drop"} | kw)


def test_a_crashed_dm_owner_on_a_node_without_dm_era_makes_the_next_backup_full() -> None:
    """The dm owner's last writes are only in the era metadata; the next owner cannot read it: it distrusts the
    record, and the next backup is full with that reason (an incremental would miss chunks)."""
    m = run_steps(
        ("takeover", {"node": "n1", "frontend": "dm"}),
        ("write", {"n": 4}),
        _plain_backup(),
        ("write", {"n": 3}),
        ("kill", {"mode": "drop", "rare": 0}),
        ("takeover", {"node": "n2", "frontend": "fuse", "dm_here": False}),
        _plain_backup(),
    )
    assert [g[3] for g in m.good] == ["full", "full"]


def test_a_crashed_dm_owner_is_folded_by_the_next_owner_and_stays_incremental() -> None:
    m = run_steps(
        ("takeover", {"node": "n1", "frontend": "dm"}),
        ("write", {"n": 4}),
        _plain_backup(),
        ("write", {"n": 3}),
        ("kill", {"mode": "tear", "rare": 0}),
        ("takeover", {"node": "n2", "frontend": "fuse", "dm_here": True}),
        ("write", {"n": 2}),
        _plain_backup(writes=2),
        ("detach", {"rare": 0}),
        ("takeover", {"node": "n3", "frontend": "dm"}),
        ("write", {"n": 2}),
        _plain_backup(writes=1),
    )
    assert [g[3] for g in m.good] == ["full", "incremental", "incremental"]


@pytest.mark.parametrize("fail", range(6))
def test_power_fails_inside_a_dm_takeovers_fold(fail: int) -> None:
    """The fold's marks and its era_folded header write are cut at every record I/O; the next takeover folds
    the same blocks again (an over-report) and the next backup restores."""
    m = run_steps(
        ("takeover", {"node": "n1", "frontend": "dm"}),
        _plain_backup(),
        ("write", {"n": 4}),
        ("kill", {"mode": "keep", "rare": 0}),
        ("takeover", {"node": "n2", "frontend": "dm", "fail": fail, "mode": "tear"}),
        ("takeover", {"node": "n3", "frontend": "dm"}),
        _plain_backup(),
    )
    assert [g[3] for g in m.good] == ["full", "incremental"]


def test_lost_era_metadata_makes_the_next_backup_full() -> None:
    m = run_steps(
        ("takeover", {"node": "n1", "frontend": "dm"}),
        _plain_backup(),
        ("write", {"n": 3}),
        ("kill", {"mode": "drop", "rare": 0}),
        ("era_metadata_lost", {}),
        ("takeover", {"node": "n2", "frontend": "dm"}),
        ("write", {"n": 1}),
        _plain_backup(),
    )
    assert [g[3] for g in m.good] == ["full", "full"]


def test_era_metadata_lost_under_an_attached_dm_owner_makes_that_backup_full() -> None:
    """The freeze's fold finds the era metadata re-created (its era is below era_folded) while the owner is
    attached: the backup planned as incremental before the freeze would read a changed set that misses the writes
    the lost metadata held. The engine must notice the distrust at the freeze and back up in full instead."""
    m = run_steps(
        ("takeover", {"node": "n1", "frontend": "dm"}),
        _plain_backup(),
        ("write", {"n": 3}),
        _plain_backup(),
        ("write", {"n": 3}),
        ("era_metadata_lost", {}),
        _plain_backup(),
    )
    assert [g[3] for g in m.good] == ["full", "incremental", "full"]
