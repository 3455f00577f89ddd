"""The dm-era frontend's host-side parts: tables, the tools' outputs parsed, the fold's rules, the auto choice.

Everything here runs without device-mapper (this host has none). The kernel side runs in QEMU guests:
tests/vm/test_dm_frontend.py. ``era_invalidate`` and ``era_restore`` (thin-provisioning-tools) work on plain
files, so the listing parser is checked against the real tool's output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from baton import frontends
from baton.errors import DeviceError, Fenced, UsageError
from baton.format.record import PLACEMENT_TAIL, RecordHeader, geometry_for
from baton.frontends.dm import PENDING_NO_DM, Names, cow_size_bytes, default_cow_size, settle_era
from baton.host import dm
from baton.host.attachments import check_name
from baton.record.core import Record, format_record
from baton.testing.crashdev import CrashDevice
from baton.tracker.era import fold

CHUNK = 64 << 10
DATA = 64 << 20  # 1024 chunks
ERA_SIZE = 1 << 20


# ------------------------------------------------------------------------------------------------ tables


def test_linear_table_is_one_line_per_extent_in_sectors() -> None:
    t = dm.linear_table("254:3", [(1 << 20, 4096), (8 << 20, 1 << 20), (0, 0)])
    assert t == "0 8 linear 254:3 2048\n8 2048 linear 254:3 16384\n"
    assert dm.table_sectors(t) == 2056
    assert dm.target_of(t) == "linear"


def test_tables_refuse_what_is_not_whole_sectors() -> None:
    with pytest.raises(DeviceError, match="sectors"):
        dm.linear_table("7:0", [(100, 4096)])
    with pytest.raises(DeviceError, match="sectors"):
        dm.linear_table("7:0", [(0, 1000)])
    with pytest.raises(DeviceError, match="at least one extent"):
        dm.linear_table("7:0", [])


def test_era_snapshot_origin_and_error_tables() -> None:
    assert dm.era_table("254:0", "254:1", 507904, 128) == "0 507904 era 254:0 254:1 128\n"
    assert dm.origin_table("254:2", 100) == "0 100 snapshot-origin 254:2\n"
    assert dm.snapshot_table("254:2", "7:4", 100, 128) == "0 100 snapshot 254:2 7:4 N 128\n"
    assert dm.error_table(100) == "0 100 error\n"
    # `dmsetup table` prints what was loaded, spaced its own way: the comparison ignores spacing only
    assert dm.same_table("0 507904 era 254:0 254:1 128 \n", dm.era_table("254:0", "254:1", 507904, 128))
    assert not dm.same_table("0 507904 era 254:0 254:1 64\n", dm.era_table("254:0", "254:1", 507904, 128))
    assert not dm.same_table("", dm.error_table(8))


def test_inner_device_names_never_collide_with_another_attachments_top() -> None:
    for a, b in [("x", "x-era"), ("x", "x.meta"), ("x", "x_snap"), ("data", "data-snap")]:
        check_name(a)
        check_name(b)
        na, nb = Names.of(a), Names.of(b)
        assert nb.top not in na.all()[1:] and na.top not in nb.all()[1:]
        assert not na.ours(nb.top) and not nb.ours(na.top)
    n = Names.of("db")
    assert n.all() == ["baton-db", "baton-db:snap", "baton-db:era", "baton-db:meta", "baton-db:origin"]
    assert n.ours("baton-db:fold123:era") and not n.ours("baton-dbx")
    with pytest.raises(UsageError):
        Names.of("a:b")


# ------------------------------------------------------------------------------------------------ statuses


def test_era_status_fields() -> None:
    st = dm.EraStatus.parse("0 507904 era 8 12/2048 1 -\n")
    assert (st.era, st.held_root, st.used, st.total, st.failed) == (1, None, 12, 2048, False)
    st = dm.EraStatus.parse("0 507904 era 8 58/2048 4 58")
    assert (st.era, st.held_root) == (4, 58)
    assert dm.EraStatus.parse("0 507904 era Error").failed
    with pytest.raises(DeviceError, match="unexpected era status"):
        dm.EraStatus.parse("0 507904 linear 8:0 0")


def test_snapshot_status_valid_and_invalid() -> None:
    st = dm.SnapshotStatus.parse("0 204800 snapshot 16/2097152 16")
    assert st.valid and (st.allocated, st.total) == (16, 2097152)
    st = dm.SnapshotStatus.parse("0 204800 snapshot Invalid")
    assert not st.valid and st.state == "Invalid"
    assert not dm.SnapshotStatus.parse("0 204800 snapshot Overflow").valid


def test_dmsetup_info_columns() -> None:
    text = "baton-db|BATON-u-top|254|3|1|Active\nbaton-db:era|BATON-u-era|254|2|1|Suspended\n"
    a, b = dm.parse_info(text)
    assert (a.name, a.uuid, a.devno, a.open_count, a.suspended) == ("baton-db", "BATON-u-top", "254:3", 1, False)
    assert b.suspended and b.path == "/dev/mapper/baton-db:era"
    assert dm.parse_info("No devices found\n") == []


# ------------------------------------------------------------------------------------------------ era_invalidate


def test_listing_parser_on_the_tools_own_output() -> None:
    assert list(dm.parse_blocks('<blocks>\n  <block block="0"/>\n  <range begin="100" end = "103"/>\n'
                                '  <block block="10"/>\n</blocks>\n')) == [0, 100, 101, 102, 10]
    assert list(dm.parse_blocks("<blocks>\n</blocks>\n")) == []
    for bad in ("", "no metadata snapshot taken.", "<superblock/>", '<blocks><range begin="5" end="2"/></blocks>',
                '<blocks><block/></blocks>', '<blocks><bit block="1"/></blocks>'):
        with pytest.raises(DeviceError):
            list(dm.parse_blocks(bad))


ERA_XML = """<superblock uuid="" block_size="128" nr_blocks="300" current_era="5">
  <writeset era="4" nr_bits="300">
    <bit block="7" value="true"/>
    <bit block="250" value="true"/>
  </writeset>
  <era_array>
    <era block="0" era="1"/>
    <era block="1" era="2"/>
    <era block="2" era="3"/>
    <era block="3" era="3"/>
    <era block="100" era="2"/>
  </era_array>
</superblock>
"""


@pytest.mark.skipif(shutil.which("era_restore") is None, reason="thin-provisioning-tools is not installed")
def test_listing_of_real_era_metadata_and_no_snapshot_is_an_error(tmp_path: Path) -> None:
    """Metadata made by era_restore (no kernel needed), listed by the real era_invalidate: eras >= N, from the
    era array and the archived writesets. Without a held metadata snapshot the listing Baton asks for fails
    instead of coming back empty."""
    (tmp_path / "e.xml").write_text(ERA_XML)
    meta = tmp_path / "meta.bin"
    meta.write_bytes(bytes(4 << 20))
    subprocess.run(["era_restore", "-i", str(tmp_path / "e.xml"), "-o", str(meta)], check=True)
    since3 = dm.run(["era_invalidate", "--written-since", "3", str(meta)])
    assert sorted(dm.parse_blocks(since3)) == [2, 3, 7, 250]
    since2 = dm.run(["era_invalidate", "--written-since", "2", str(meta)])
    assert sorted(dm.parse_blocks(since2)) == [1, 2, 3, 7, 100, 250]
    with pytest.raises(DeviceError, match="snapshot"):
        dm.era_invalidate(str(meta), 1)


# ------------------------------------------------------------------------------------------------ fold


def _record() -> tuple[CrashDevice, Record]:
    geo = geometry_for(DATA, CHUNK, 4)
    size = geo.size + ERA_SIZE
    dev = CrashDevice(size, seed=11)
    hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=4, chunk_size=CHUNK, disk_uuid=str(uuid.uuid4()),
                       lineage="", disk_size=DATA + size, data_size=DATA, record_offset=DATA, record_size=size,
                       pages_per_slot=geo.pages_per_slot, era_offset=geo.size, era_size=ERA_SIZE)
    format_record(dev, hdr)
    rec = Record.load(dev)
    rec.attach("a", frontend="dm")
    rec.begin_era()
    return dev, rec


class ScriptedEra:
    """An era target's answers, scripted: eras only grow, blocks written per era. (The kernel's own answers are
    checked in tests/vm/test_dm_frontend.py; this is the fold's bookkeeping.)"""

    def __init__(self, era: int, written: dict[int, set[int]], fail_listing: bool = False) -> None:
        self.era, self.written, self.fail_listing = era, written, fail_listing
        self.held = False
        self.taken = self.dropped = 0

    def take_snapshot(self) -> int:
        assert not self.held, "one metadata snapshot at a time"
        self.held = True
        self.taken += 1
        self.era += 1
        return self.era

    def written_since(self, era: int) -> list[int]:
        assert self.held, "listing without a metadata snapshot"
        if self.fail_listing:
            raise DeviceError("era_invalidate failed: metadata contains errors")
        return sorted({b for e, blocks in self.written.items() if e >= era and e < self.era for b in blocks})

    def drop_snapshot(self) -> None:
        assert self.held
        self.held = False
        self.dropped += 1


def test_fold_marks_what_era_listed_and_moves_era_folded_past_it() -> None:
    dev, rec = _record()
    era = ScriptedEra(3, {1: {5}, 2: {6, 7}, 3: {900}})
    res = fold(rec, era, pending=True)
    assert (res.since, res.era, res.chunks) == (0, 4, 4)
    assert rec.header.era_folded == 4 and rec.era_pending
    assert set(rec.dirty_bits().iter_set()) == {5, 6, 7, 900}
    assert era.held is False and era.dropped == 1
    era.written[4] = {8}
    res = fold(rec, era, pending=False)  # only what was written since the last fold
    assert (res.since, res.era, res.chunks) == (4, 5, 1)
    assert not rec.era_pending
    # durable: a power loss right after keeps all of it
    dev.crash("drop")
    again = Record.load(dev)
    assert again.header.era_folded == 5 and not again.era_pending
    again.attach("b")
    assert set(again.dirty_bits().iter_set()) == {5, 6, 7, 8, 900}


def test_a_listing_that_fails_leaves_era_folded_and_drops_the_snapshot() -> None:
    _, rec = _record()
    era = ScriptedEra(2, {1: {1}}, fail_listing=True)
    with pytest.raises(DeviceError, match="era_invalidate"):
        fold(rec, era, pending=True)
    assert rec.header.era_folded == 0 and not era.held
    era.fail_listing = False
    assert fold(rec, era, pending=True).chunks == 1  # the next fold lists them again: over-report only


def test_a_crash_between_mark_and_set_era_folded_lists_the_chunks_again() -> None:
    dev, rec = _record()
    fold(rec, ScriptedEra(1, {1: {3}}), pending=True)
    era = ScriptedEra(5, {4: {40, 41}})

    rec.set_era_folded = lambda *a, **k: dev.crash("drop")  # type: ignore[method-assign]  # power lost here
    fold(rec, era, pending=True)
    after = Record.load(dev)
    assert after.header.era_folded == 2  # unchanged: the next fold lists eras >= 2 again
    after.attach("b", frontend="dm")
    assert {3, 40, 41} <= set(after.dirty_bits().iter_set())


def test_re_created_metadata_is_distrusted_and_listed_from_era_zero() -> None:
    _, rec = _record()
    fold(rec, ScriptedEra(9, {9: {1}}), pending=True)
    assert rec.header.era_folded == 10
    fresh = ScriptedEra(1, {1: {2}})  # zeroed metadata starts at era 1 again
    res = fold(rec, fresh, pending=True)
    assert res.since == 0 and rec.header.era_folded == 2
    assert "re-created" in rec.header.distrust_reason
    assert 2 in set(rec.dirty_bits().iter_set())


def test_blocks_beyond_the_disk_distrust_the_record() -> None:
    _, rec = _record()
    res = fold(rec, ScriptedEra(1, {1: {2, 5000}}), pending=True)
    assert res.beyond == 1 and res.chunks == 1
    assert "beyond" in rec.header.distrust_reason


def test_a_fenced_owner_folds_nothing() -> None:
    dev, rec = _record()
    other = Record.load(dev)
    other.attach("b")
    era = ScriptedEra(1, {1: {7}})
    with pytest.raises(Fenced):
        fold(rec, era, pending=True)
    assert not era.held


@pytest.mark.skipif(dm.dm_support()[0], reason="this node has dm-era: the distrust path is for nodes without it")
def test_settle_on_a_node_without_dm_era_distrusts_and_clears_pending() -> None:
    _, rec = _record()
    assert settle_era(rec, "/nonexistent", name="t", size=DATA) is not None
    assert not rec.era_pending
    assert PENDING_NO_DM in rec.header.distrust_reason
    assert settle_era(rec, "/nonexistent", name="t", size=DATA) is None  # nothing pending any more


# ------------------------------------------------------------------------------------------------ sizes, choice


def test_cow_size_default_and_options() -> None:
    assert default_cow_size(10 << 30, CHUNK) == 1 << 30  # 10 % of the disk
    assert default_cow_size(16 << 20, CHUNK) == 64 * CHUNK  # at least 64 chunks
    assert cow_size_bytes(None, 10 << 30, CHUNK) == 1 << 30
    assert cow_size_bytes("15%", 100 * CHUNK, CHUNK) == 15 * CHUNK
    assert cow_size_bytes("1M", 10 << 30, CHUNK) == 1 << 20
    assert cow_size_bytes("100000", 10 << 30, CHUNK) == 2 * CHUNK  # rounded up to whole chunks
    for bad in ("0%", "101%", "x%", "1K", "lots"):
        with pytest.raises(UsageError):
            cow_size_bytes(bad, 10 << 30, CHUNK)


@pytest.mark.skipif(dm.dm_support()[0], reason="this node has device-mapper with dm-era")
def test_auto_chooses_fuse_on_this_node_and_says_why(tmp_path: Path) -> None:
    ok, why = dm.dm_support()
    assert not ok and why
    print(f"dm_support: {why}")
    _, rec = _record()
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, DATA)
    kind, reason = frontends.choose("auto", disk=str(img), record=rec)
    assert kind == "fuse"
    assert reason.startswith("auto: fuse, because ") and why in reason
    assert frontends.choose("nbd", disk=str(img), record=rec) == ("nbd", "requested (--frontend nbd)")
    with pytest.raises(DeviceError, match="--frontend dm: ") as e:
        frontends.choose("dm", disk=str(img), record=rec)
    assert "fuse" in e.value.hint
    assert frontends.choices()[0] == "auto" and "dm" in frontends.kinds()
    with pytest.raises(UsageError, match="expected one of auto, fuse, nbd, dm"):
        frontends.choose("iscsi", disk=str(img), record=rec)
