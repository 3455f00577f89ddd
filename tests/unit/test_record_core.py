"""The record core on a crash-simulating device: marking, takeover merge, fencing, backups, corruption."""

from __future__ import annotations

import uuid

import pytest

from baton.errors import Fenced, RecordCorrupt, RecordNotFound
from baton.format.record import BLOCK, PAGE_BITS, PLACEMENT_TAIL, RecordHeader, geometry_for, sector_bit_range
from baton.record.core import Record, format_record
from baton.testing.crashdev import CrashDevice, PowerLoss

CHUNK = 4096
DATA = 64 * 1024 * 1024  # 16384 chunks -> 1 page per region


def make(seed: int = 0, nslots: int = 4, data: int = DATA) -> tuple[CrashDevice, RecordHeader]:
    geo = geometry_for(data, CHUNK, nslots)
    dev = CrashDevice(geo.size, seed=seed)
    hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=nslots, chunk_size=CHUNK, disk_uuid=str(uuid.uuid4()),
                       lineage="", disk_size=data + geo.size, data_size=data, record_offset=data,
                       record_size=geo.size, pages_per_slot=geo.pages_per_slot)
    format_record(dev, hdr)
    return dev, hdr


def reopen(dev: CrashDevice) -> Record:
    return Record.load(dev)


def test_marks_survive_crash_and_takeover() -> None:
    dev, _ = make()
    a = reopen(dev)
    a.attach("a")
    a.mark([1, 2, 3])
    a.mark([2])  # already marked: no I/O
    assert a.stats.marks_fast == 1
    dev.crash("drop")
    b = reopen(dev)
    b.attach("b")
    assert set(b.dirty_bits().iter_set()) == {1, 2, 3}
    assert b.header.epoch == 2
    b.mark([100])
    dev.crash("tear")
    c = reopen(dev)
    c.attach("c")
    assert {1, 2, 3, 100} <= set(c.dirty_bits().iter_set())


def test_stale_owner_is_fenced_and_never_writes_again() -> None:
    dev, _ = make()
    a = reopen(dev)
    a.attach("a")
    a.mark([5])
    b = reopen(dev)
    b.attach("b")
    writes = dev.writes
    with pytest.raises(Fenced):
        a.mark([6])
    with pytest.raises(Fenced):
        a.mark([7])
    assert dev.writes == writes
    assert not b.is_marked(6)


def test_backup_freeze_checkpoint_commit() -> None:
    dev, _ = make()
    a = reopen(dev)
    a.attach("a")
    a.mark(range(10))
    frozen = a.freeze("ab" * 16)
    assert set(frozen.iter_set()) == set(range(10))
    a.mark([50])  # a write during the backup is recorded in the owner slot
    a.checkpoint("cd" * 16, range(5))
    dev.crash("drop")
    b = reopen(dev)
    assert b.header.last_backup == "cd" * 16
    b.attach("b")
    assert set(b.dirty_bits().iter_set()) == set(range(5, 10)) | {50}


def test_commit_clears_frozen_and_records_history() -> None:
    dev, _ = make()
    a = reopen(dev)
    a.attach("a")
    a.mark([1])
    a.freeze("11" * 16)
    from baton.format.record import HistoryEntry

    a.commit_backup(HistoryEntry(seq=0, snapshot_id="22" * 16, lineage="", node="a", start_ns=1, end_ns=2,
                                 chunks_read=1, bytes_read=CHUNK, chunks_stored=1, bytes_stored=10,
                                 bytes_deduped=0, mode="full", result="ok", reason="no previous snapshot",
                                 digest="ff" * 32, epoch=0))
    r = reopen(dev)
    st = r.status()
    assert st["dirty_chunks"] == 0
    assert st["last_backup"]["snapshot"] == "22" * 16
    assert st["last_backup"]["reason"] == "no previous snapshot"


def test_abort_merges_frozen_back() -> None:
    dev, _ = make()
    a = reopen(dev)
    a.attach("a")
    a.mark([7, 8])
    a.freeze("33" * 16)
    a.abort_backup()
    assert a.is_marked(7) and a.is_marked(8)
    assert a.frozen_bits().count() == 0


def test_corrupt_page_marks_only_its_region() -> None:
    data = 2 * PAGE_BITS * CHUNK  # two pages per region
    dev, _ = make(data=data)
    a = reopen(dev)
    a.attach("a")
    a.mark([3, PAGE_BITS + 100])
    a.mark([5])  # page 0 now has two versions, one per copy
    region = a.owner_region
    blk = a.geo.page_block(region, 0, 0)
    # damage sector 0 of both copies of page 0: only that sector's chunks become dirty
    dev.durable[blk * BLOCK + 100] ^= 0xFF
    dev.durable[(blk + 1) * BLOCK + 100] ^= 0xFF
    b = reopen(dev)
    bits = set(b.dirty_bits().iter_set())
    lo, hi = sector_bit_range(0)
    assert bits == set(range(lo * 8, hi * 8)) | {PAGE_BITS + 100}
    assert any("bitmap page 0" in n for n in b.notes)


def test_damaged_newest_copy_never_loses_its_marks() -> None:
    dev, _ = make()
    a = reopen(dev)
    a.attach("a")
    a.mark([2])
    a.mark([4000])  # sector 1 of the bits; written to the other copy
    region = a.owner_region
    newest = a.regions[region].page_copy[0]
    blk = a.geo.page_block(region, 0, newest)
    dev.durable[blk * BLOCK + 512 + 7] ^= 0x01  # rot in sector 1 of the newest copy
    b = reopen(dev)
    bits = set(b.dirty_bits().iter_set())
    assert {2, 4000} <= bits
    lo, hi = sector_bit_range(1)
    assert bits - {2} == set(range(lo * 8, hi * 8))


def test_torn_write_over_reports_only_in_flight() -> None:
    dev, _ = make(seed=7)
    a = reopen(dev)
    a.attach("a")
    a.mark([1])
    a.mark([2])
    dev.power_fail_after = 1  # the page write lands in the cache, the sync fails
    with pytest.raises(PowerLoss):
        a.mark([3000])
    dev.crash("tear")
    b = reopen(dev)
    assert set(b.dirty_bits().iter_set()) - {3000} == {1, 2}
    assert not b.notes


def test_both_headers_corrupt_says_reset_needed() -> None:
    dev, _ = make()
    dev.durable[10] ^= 1
    dev.durable[BLOCK + 10] ^= 1
    with pytest.raises(RecordCorrupt) as ei:
        reopen(dev)
    assert "reset" in ei.value.hint


def test_blank_area_is_not_found() -> None:
    dev = CrashDevice(1 << 20)
    with pytest.raises(RecordNotFound):
        Record.load(dev)


def test_status_of_a_live_record_never_puts_back_an_older_owed_set() -> None:
    """The daemon answers status from its live record while backups run. status() loads a repository region's
    bits lazily; if it did that outside the record's lock, a checkpoint could owe new chunks to that region in
    the meantime and status would then put back the older set, which the commit writes to disk: the chunks
    would be lost for that repository (an under-report). The device holds status's page read open until the
    checkpoint is done (or 0.5 s), which makes the interleaving certain when the lock is missing."""
    import threading

    geo = geometry_for(DATA, CHUNK, 2, 3)

    class GatedDev(CrashDevice):
        watch = -1  # byte offset of the page read to hold
        asker = 0  # thread whose read is held
        entered = threading.Event()
        gate = threading.Event()

        def pread(self, offset: int, length: int) -> bytes:
            data = super().pread(offset, length)
            if offset == self.watch and threading.get_ident() == self.asker:
                self.entered.set()
                self.gate.wait(0.5)
            return data

    dev = GatedDev(geo.size)
    format_record(dev, RecordHeader(placement=PLACEMENT_TAIL, nslots=2, chunk_size=CHUNK,
                                    disk_uuid=str(uuid.uuid4()), lineage="", disk_size=DATA + geo.size,
                                    data_size=DATA, record_offset=DATA, record_size=geo.size,
                                    pages_per_slot=geo.pages_per_slot, nrepos=3))
    repos = ["11" * 16, "22" * 16, "33" * 16]
    rec = reopen(dev)
    rec.attach("a")
    for i, r in enumerate(repos):  # every repository gets a region and a first snapshot
        rec.use_repo(r)
        rec.freeze(f"{i:032x}")
        rec.commit_backup(_entry(f"{i + 1:032x}"))
    rec.mark(range(10))
    rec.use_repo(repos[0])
    rec.freeze(f"{4:032x}")
    rec.commit_backup(_entry(f"{5:032x}"))  # chunks 0..9 owed to repos 1 and 2: their pages are mapped
    q = rec.find_repo(repos[1])
    assert q is not None
    rec.detach()

    rec = reopen(dev)  # a new owner: repository regions are loaded lazily
    rec.attach("a")
    written = list(range(100, 140))
    rec.mark(written)
    rec.use_repo(repos[0])
    rec.freeze(f"{6:032x}")
    dev.watch = geo.page_block(q.index, 0, 0) * BLOCK

    def ask() -> None:
        dev.asker = threading.get_ident()
        rec.status()

    t = threading.Thread(target=ask)
    t.start()
    assert dev.entered.wait(10)
    rec.checkpoint(f"{7:032x}", written[:20])  # owes 100..119 to repos 1 and 2
    dev.gate.set()
    t.join(10)
    rec.commit_backup(_entry(f"{8:032x}"))  # owes the rest
    after = reopen(dev)
    for r in repos[1:]:
        owed = set(after.repo_dirty_bits(r).iter_set())
        assert set(written) | set(range(10)) <= owed, (r, sorted(set(written) - owed))


def _entry(snapshot_id: str):  # type: ignore[no-untyped-def]
    from baton.format.record import HistoryEntry

    return HistoryEntry(seq=0, snapshot_id=snapshot_id, lineage="", node="a", start_ns=0, end_ns=1, chunks_read=0,
                        bytes_read=0, chunks_stored=0, bytes_stored=0, bytes_deduped=0, mode="incremental",
                        result="ok", reason="", digest="", epoch=0)
