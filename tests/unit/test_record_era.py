"""Record format v3 on a crash-simulating device: the era region, the dm-era header writes (begin_era,
set_era_folded), attach's frontend, distrust with a reason that the next backup states (after a restart too), the
v2 -> v3 upgrade in place, and the message for records the dm frontend cannot use."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from baton.backup import plan_backup, run_backup
from baton.errors import Fenced, RecordError
from baton.format.record import (
    BLOCK,
    ERA_ALIGN,
    ERA_MIN_SIZE,
    ERA_ZERO_BYTES,
    FLAG_DISTRUSTED,
    FLAG_ERA_PENDING,
    FLAG_RESET,
    PLACEMENT_EXTERNAL,
    PLACEMENT_FILE,
    PLACEMENT_TAIL,
    HistoryEntry,
    RecordHeader,
    area_for_era,
    era_region_size,
    geometry_for,
)
from baton.record.core import Record, era_room, era_unsupported_reason, format_record, upgrade_for_era
from baton.repo import DiskIdentity, Repository
from baton.testing.crashdev import CrashDevice
from baton.tracker.core import Tracker

CHUNK = 4096
DATA = 64 * CHUNK


def v3(nrepos: int = 2, *, extra: int = 0, fill: int = 0) -> CrashDevice:
    """A v3 record with an era region (the floor size) at the end of its area; ``fill`` pre-fills the device."""
    geo = geometry_for(DATA, CHUNK, 2, nrepos)
    era = era_region_size(DATA, CHUNK)
    size = area_for_era(geo.size, era) + extra
    dev = CrashDevice(size)
    if fill:
        dev.durable[:] = bytes([fill]) * size
    hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=2, chunk_size=CHUNK, disk_uuid=str(uuid.uuid4()),
                       lineage="", disk_size=DATA + size, data_size=DATA, record_offset=DATA, record_size=size,
                       pages_per_slot=geo.pages_per_slot, nrepos=nrepos, era_offset=size - era, era_size=era)
    format_record(dev, hdr)
    return dev


def v2(extra: int = 0, *, version: int = 2, placement: int = PLACEMENT_TAIL) -> CrashDevice:
    nrepos = 2 if version >= 2 else 0
    geo = geometry_for(DATA, CHUNK, 2, nrepos)
    size = geo.size + extra
    dev = CrashDevice(size)
    hdr = RecordHeader(placement=placement, nslots=2, chunk_size=CHUNK, disk_uuid=str(uuid.uuid4()), lineage="",
                       disk_size=DATA + size, data_size=DATA, record_offset=DATA, record_size=size,
                       pages_per_slot=geo.pages_per_slot, nrepos=nrepos, version=version)
    format_record(dev, hdr)
    return dev


def test_fresh_v3_record_has_a_zeroed_region_after_every_structure() -> None:
    dev = v3(fill=0xEE)
    rec = Record.load(dev)
    h = rec.header
    assert (h.version, h.frontend, h.era_folded, rec.era_pending, h.distrust_reason) == (3, "", 0, False, "")
    region = rec.era_region()
    assert region is not None
    assert region.device == "" and region.size == h.era_size == ERA_MIN_SIZE
    assert region.extents == [(h.era_offset, h.era_size)]  # a bare device: the area is the device
    assert h.era_offset % ERA_ALIGN == 0 and h.era_offset >= rec.geo.size
    assert h.era_offset + h.era_size == h.record_size  # at the end of the area
    raw = bytes(dev.durable)
    assert raw[h.era_offset : h.era_offset + ERA_ZERO_BYTES] == bytes(ERA_ZERO_BYTES)  # dm-era: fresh metadata
    assert raw[h.era_offset + ERA_ZERO_BYTES : h.era_offset + ERA_ZERO_BYTES + 16] == b"\xee" * 16  # its own
    # Nothing of the record lives in the region: every structure's block is before era_offset.
    assert rec.geo.size <= h.era_offset
    assert rec.status()["era"] == {"offset": h.era_offset, "size": h.era_size, "folded": 0, "pending": False}


def test_record_writes_never_touch_the_era_region() -> None:
    dev = v3()
    h = Record.load(dev).header
    dev.durable[h.era_offset : h.era_offset + h.era_size] = b"\xa5" * h.era_size  # "dm-era's metadata"
    rec = Record.load(dev)
    rec.attach("a", "dm")
    rec.begin_era()
    rec.mark(range(0, DATA // CHUNK, 3))
    rec.freeze("ab" * 16)
    rec.commit_backup(HistoryEntry(seq=0, snapshot_id="cd" * 16, lineage="", node="a", start_ns=1, end_ns=2,
                                   chunks_read=1, bytes_read=1, chunks_stored=1, bytes_stored=1, bytes_deduped=0,
                                   mode="full", result="ok", reason="x", digest="", epoch=0, era=7))
    rec.set_era_folded(8, pending=False)
    rec.detach()
    assert bytes(dev.durable[h.era_offset : h.era_offset + h.era_size]) == b"\xa5" * h.era_size


def test_begin_era_and_set_era_folded_are_durable() -> None:
    dev = v3()
    rec = Record.load(dev)
    rec.attach("a", "fuse")
    assert Record.load(dev).header.frontend == "fuse"
    syncs = rec.stats.metadata_syncs
    rec.begin_era()
    assert rec.stats.metadata_syncs == syncs + 1
    dev.crash("drop")  # power loss: only what was synced survives
    again = Record.load(dev)
    assert again.era_pending and again.header.frontend == "dm" and again.header.flags & FLAG_ERA_PENDING
    assert again.status()["era"]["pending"] is True and again.status()["owner_frontend"] == "dm"
    b = Record.load(dev)
    b.attach("b", "dm")  # a takeover keeps the pending flag and era_folded: the new owner folds first
    assert b.era_pending and b.header.era_folded == 0
    b.set_era_folded(5, pending=True)
    dev.crash("drop")
    c = Record.load(dev)
    assert (c.header.era_folded, c.era_pending) == (5, True)
    c.attach("c", "dm")
    c.set_era_folded(9, pending=False)  # a clean dm detach's last fold
    c.detach()
    dev.crash("drop")
    d = Record.load(dev)
    assert (d.header.era_folded, d.era_pending, d.header.clean, d.header.frontend) == (9, False, True, "dm")
    d.attach("d")  # an owner with no frontend (an offline backup) records none
    assert Record.load(dev).header.frontend == "" and Record.load(dev).header.era_folded == 9


def test_era_header_writes_are_fenced() -> None:
    dev = v3()
    a = Record.load(dev)
    a.attach("a", "dm")
    b = Record.load(dev)
    b.attach("b", "dm")
    writes = dev.writes
    with pytest.raises(Fenced):
        a.begin_era()
    with pytest.raises(Fenced):
        a.set_era_folded(3, pending=False)
    assert dev.writes == writes  # the stale owner wrote nothing
    assert Record.load(dev).header.owner == "b"


def test_attach_refuses_an_unknown_frontend_and_v2_keeps_no_frontend() -> None:
    rec = Record.load(v3())
    with pytest.raises(ValueError):
        rec.attach("a", "iscsi")
    dev = v2()
    old = Record.load(dev)
    old.attach("a", "nbd")
    assert Record.load(dev).header.version == 2 and Record.load(dev).header.frontend == ""
    assert old.era_region() is None
    with pytest.raises(RecordError, match="format v2 has no era metadata region"):
        old.begin_era()
    with pytest.raises(RecordError, match="keeps no era"):
        old.set_era_folded(1, pending=False)


def _backup_env(tmp_path: Path, dev: CrashDevice, node: str) -> tuple[Tracker, Repository, DiskIdentity]:
    rec = Record.load(dev)
    rec.attach(node)
    tracker = Tracker(rec, CrashDevice(DATA))
    url = str(tmp_path / "repo")
    if not (tmp_path / "repo").exists():
        Repository.init(url)
    h = rec.header
    return tracker, Repository.open(url), DiskIdentity(disk_uuid=h.disk_uuid, size=DATA, chunk_size=CHUNK)


def test_distrust_reason_makes_the_next_backup_full_with_that_reason_after_a_restart(tmp_path: Path) -> None:
    dev = v3()
    tracker, repo, disk = _backup_env(tmp_path, dev, "a")
    tracker.write(0, b"x" * CHUNK)
    assert run_backup(tracker, repo, node="a")["mode"] == "full"
    tracker.write(CHUNK, b"y" * CHUNK)
    assert plan_backup(tracker, repo, disk).mode == "incremental"
    why = "era metadata failed its check: superblock checksum mismatch"
    tracker.record.distrust(why)
    tracker.record.distrust(why)  # the same reason twice is kept once
    dev.crash("drop")  # the process and the machine die: the reason must be on disk
    tracker, repo, disk = _backup_env(tmp_path, dev, "b")
    h = tracker.record.header
    assert h.flags & FLAG_DISTRUSTED and h.flags & FLAG_RESET and h.distrust_reason == why
    assert tracker.record.status()["distrusted"] == why
    plan = plan_backup(tracker, repo, disk)
    assert (plan.mode, plan.reason) == ("full", why)
    res = run_backup(tracker, repo, node="b")
    assert (res["mode"], res["reason"]) == ("full", why)
    assert tracker.record.history()[-1].reason == why[:96]
    h = Record.load(dev).header
    assert not h.flags & (FLAG_DISTRUSTED | FLAG_RESET) and h.distrust_reason == ""  # a full backup covers it
    tracker.write(2 * CHUNK, b"z" * CHUNK)
    assert plan_backup(tracker, repo, disk).mode == "incremental"


def test_a_second_reason_is_appended_and_every_repository_gets_its_full_backup(tmp_path: Path) -> None:
    dev = v3(nrepos=2)
    tracker, repo, disk = _backup_env(tmp_path, dev, "a")
    url2 = str(tmp_path / "repo2")
    Repository.init(url2)
    repo2 = Repository.open(url2)
    run_backup(tracker, repo, node="a")
    run_backup(tracker, repo2, node="a")
    tracker.record.distrust("first")
    tracker.record.distrust("second")
    assert tracker.record.header.distrust_reason == "first; second"
    assert run_backup(tracker, repo, node="a")["reason"] == "first; second"
    # The other repository still owes its full backup, and still says why.
    assert plan_backup(tracker, repo2, disk).reason == "first; second"
    assert plan_backup(tracker, repo, disk).mode == "incremental"
    assert run_backup(tracker, repo2, node="a")["reason"] == "first; second"
    assert Record.load(dev).header.distrust_reason == ""


def test_distrust_during_a_backup_survives_its_incremental_commit(tmp_path: Path) -> None:
    """A flag set after the plan (a dm fold failing during the freeze) is not cleared by that backup's commit:
    only a full backup's commit clears the full-backup flags."""
    dev = v3()
    tracker, repo, disk = _backup_env(tmp_path, dev, "a")
    run_backup(tracker, repo, node="a")
    tracker.write(0, b"q" * CHUNK)

    def fault(point: str) -> None:
        if point == "after-freeze":
            tracker.record.distrust("era metadata could not be loaded")

    res = run_backup(tracker, repo, node="a", fault=fault)
    assert res["mode"] == "incremental"
    assert Record.load(dev).header.flags & FLAG_DISTRUSTED
    plan = plan_backup(tracker, repo, disk)
    assert (plan.mode, plan.reason) == ("full", "era metadata could not be loaded")


def test_distrust_without_a_reason_or_on_v2_is_a_reset(tmp_path: Path) -> None:
    dev = v2()
    tracker, repo, disk = _backup_env(tmp_path, dev, "a")
    run_backup(tracker, repo, node="a")
    tracker.record.distrust("era metadata failed its check")
    h = Record.load(dev).header
    assert h.flags & FLAG_RESET and not h.flags & FLAG_DISTRUSTED and h.version == 2
    assert plan_backup(tracker, repo, disk).reason.startswith("record reset")
    dev3 = v3()
    rec = Record.load(dev3)
    rec.attach("a")
    rec.distrust()
    h = Record.load(dev3).header
    assert h.flags & FLAG_RESET and not h.flags & FLAG_DISTRUSTED


def test_history_entries_keep_the_era() -> None:
    dev = v3()
    rec = Record.load(dev)
    rec.attach("a", "dm")
    rec.mark([1])
    rec.freeze("ab" * 16)
    rec.commit_backup(HistoryEntry(seq=0, snapshot_id="cd" * 16, lineage="", node="a", start_ns=1, end_ns=2,
                                   chunks_read=1, bytes_read=1, chunks_stored=1, bytes_stored=1, bytes_deduped=0,
                                   mode="full", result="ok", reason="x", digest="", epoch=0, era=41))
    dev.crash("drop")
    hist = Record.load(dev).history()
    assert [(e.version, e.era) for e in hist] == [(3, 41)]


def test_upgrade_in_place_keeps_everything_and_adds_a_zeroed_region(tmp_path: Path) -> None:
    era = era_region_size(DATA, CHUNK)
    geo = geometry_for(DATA, CHUNK, 2, 2)
    dev = v2(extra=area_for_era(geo.size, era) - geo.size)  # room for the region after the structures
    dev.durable[geo.size :] = b"\xee" * (len(dev.durable) - geo.size)
    tracker, repo, disk = _backup_env(tmp_path, dev, "a")
    run_backup(tracker, repo, node="a")
    tracker.write(3 * CHUNK, b"w" * CHUNK)
    tracker.record.detach()
    rec = Record.load(dev)
    before = rec.header
    assert era_room(rec) is not None
    msg = era_unsupported_reason(rec)
    assert msg is not None and "baton init --upgrade" in msg and "stays incremental" in msg
    h = upgrade_for_era(rec)
    assert h.version == 3 and h.era_size == era and h.era_offset % ERA_ALIGN == 0
    assert bytes(dev.durable[h.era_offset : h.era_offset + ERA_ZERO_BYTES]) == bytes(ERA_ZERO_BYTES)
    assert upgrade_for_era(rec) == h  # once is enough
    dev.crash("drop")
    up = Record.load(dev)
    assert up.header == h and not up.notes and era_unsupported_reason(up) is None
    assert (up.header.lineage, up.header.last_backup, up.header.backup_seq) == (
        before.lineage, before.last_backup, before.backup_seq)
    assert sorted(up.dirty_bits().iter_set(up.header.nchunks)) == [3]
    assert [e.version for e in up.history()] == [2]  # written before: still v2 (same layout)
    tracker, repo, disk = _backup_env(tmp_path, dev, "b")
    assert plan_backup(tracker, repo, disk).mode == "incremental"
    res = run_backup(tracker, repo, node="b")
    assert res["mode"] == "incremental" and res["chunks_read"] == 1
    assert [e.version for e in Record.load(dev).history()] == [2, 3]


def test_upgrade_refuses_without_room_and_says_what_to_run() -> None:
    dev = v2()
    rec = Record.load(dev)
    with pytest.raises(RecordError, match="tail record cannot grow") as e:
        upgrade_for_era(rec)
    assert "--frontend fuse" in str(e.value)
    writes = dev.writes
    with pytest.raises(RecordError):
        upgrade_for_era(rec)
    assert dev.writes == writes
    attached = Record.load(v2(extra=64 << 20))
    attached.attach("a")
    with pytest.raises(RecordError, match="detach it"):
        upgrade_for_era(attached)


def test_unsupported_reason_per_placement_and_version() -> None:
    assert era_unsupported_reason(Record.load(v3())) is None
    geo = geometry_for(DATA, CHUNK, 2, 2)
    roomy = area_for_era(geo.size, era_region_size(DATA, CHUNK)) - geo.size

    def reason(*, version: int = 2, extra: int = 0, placement: int = PLACEMENT_TAIL, spec: str = "tail") -> str:
        rec = Record.load(v2(extra, version=version, placement=placement))
        rec.disk, rec.spec = "/dev/sdx", spec  # what placement.locate tells a record it found
        out = era_unsupported_reason(rec)
        assert out is not None
        return out

    tail = reason()
    assert tail.startswith("record format v2 has no era metadata region") and "tail record cannot grow" in tail
    file = reason(placement=PLACEMENT_FILE, spec="file")
    assert "`baton init --reset /dev/sdx`" in file and "record reset" in file
    small = reason(placement=PLACEMENT_EXTERNAL, spec="external:/dev/sdr#2")
    assert "--record-disk --slot-size" in small and "baton init --force --record external:RDISK /dev/sdx" in small
    v1_room = reason(version=1, placement=PLACEMENT_EXTERNAL, spec="external:/dev/sdr#2", extra=roomy + (1 << 20))
    assert "format v1" in v1_room and "`baton init --reset --record external:/dev/sdr#2 /dev/sdx`" in v1_room
    v2_room = reason(placement=PLACEMENT_EXTERNAL, spec="external:/dev/sdr#2", extra=roomy)
    assert "`baton init --upgrade --record external:/dev/sdr#2 /dev/sdx`" in v2_room
    for text in (tail, file, small, v1_room, v2_room):
        assert "--frontend fuse or --frontend nbd" in text


def test_a_region_that_overlaps_the_structures_is_refused() -> None:
    dev = v3()
    rec = Record.load(dev)
    bad = replace(rec.header, era_offset=BLOCK * 12)
    with pytest.raises(ValueError):
        format_record(CrashDevice(rec.header.record_size), bad)
    rec.header = bad
    with pytest.raises(RecordError, match="era region"):
        rec.era_region()


def test_a_rewrite_in_place_starts_fresh_era_metadata_and_keeps_history() -> None:
    """What restore's rewrite (baton.record.after_restore) and --reset do to a v3 record: the era superblock
    zeroed again, era_folded 0, nothing pending or distrusted; the history ring kept when asked."""
    dev = v3()
    rec = Record.load(dev)
    rec.attach("a", "dm")
    rec.begin_era()
    rec.mark([2])
    rec.freeze("ab" * 16)
    rec.commit_backup(HistoryEntry(seq=0, snapshot_id="cd" * 16, lineage="", node="a", start_ns=1, end_ns=2,
                                   chunks_read=1, bytes_read=1, chunks_stored=1, bytes_stored=1, bytes_deduped=0,
                                   mode="full", result="ok", reason="x", digest="", epoch=0, era=3))
    rec.set_era_folded(9, pending=True)
    rec.distrust("why not")
    h = rec.header
    dev.durable[h.era_offset : h.era_offset + h.era_size] = b"\x5a" * h.era_size  # dm-era's metadata
    format_record(dev, replace(h, epoch=h.epoch + 1, owner="", flags=h.flags & ~FLAG_RESET), keep_history=True)
    new = Record.load(dev)
    assert (new.header.era_folded, new.era_pending, new.header.distrust_reason) == (0, False, "")
    assert not new.header.flags & (FLAG_DISTRUSTED | FLAG_RESET)
    assert bytes(dev.durable[h.era_offset : h.era_offset + ERA_ZERO_BYTES]) == bytes(ERA_ZERO_BYTES)
    assert bytes(dev.durable[h.era_offset + ERA_ZERO_BYTES : h.era_offset + ERA_ZERO_BYTES + 4]) == b"\x5a" * 4
    assert [e.era for e in new.history()] == [3]
