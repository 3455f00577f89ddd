"""The format-v1 golden record (tests/data/format-v1, made by its make_golden.py) decodes with today's code to
the values it was written with. A failure here means format v1 changed: that needs a new version, not an edit
of the golden files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from baton.format.bitmap import Bitmap
from baton.format.record import (
    ANCHOR_BLOCKS,
    BLOCK,
    HISTORY_ENTRY_SIZE,
    PLACEMENT_NAMES,
    Anchor,
    HistoryEntry,
    RecordHeader,
    SlotHeader,
    parse_page,
)
from baton.record.core import Record

DATA = Path(__file__).resolve().parents[1] / "data" / "format-v1"


class BytesDev:
    """A read-only BlockDev over bytes (a failing test must not be able to change the golden data)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= self.size, (offset, length)
        return self.data[offset : offset + length]

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("the golden record must only be read")

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def golden() -> tuple[bytes, dict[str, Any]]:
    blob = (DATA / "tail-record.bin").read_bytes()
    exp: dict[str, Any] = json.loads((DATA / "expected.json").read_text())
    assert len(blob) == exp["disk_size"] - exp["record_offset"]
    return blob, exp


def test_anchors(golden: tuple[bytes, dict[str, Any]]) -> None:
    blob, exp = golden
    for copy in range(ANCHOR_BLOCKS):
        raw = blob[len(blob) - (ANCHOR_BLOCKS - copy) * BLOCK :][:BLOCK]
        a = Anchor.unpack(raw, copy=copy, disk_size=exp["disk_size"])
        assert (a.disk_uuid, a.record_offset, a.record_size) == (exp["disk_uuid"], exp["record_offset"],
                                                                 exp["record_size"])
        assert a.pack() == raw  # byte-identical re-encoding


def test_header_copies(golden: tuple[bytes, dict[str, Any]]) -> None:
    blob, exp = golden
    hdrs = [RecordHeader.unpack(blob[c * BLOCK : (c + 1) * BLOCK], copy=c, record_offset=exp["record_offset"])
            for c in (0, 1)]
    for h, c in zip(hdrs, (0, 1), strict=True):
        assert h.pack() == blob[c * BLOCK : (c + 1) * BLOCK]
        assert h.version == 1
    best = max(hdrs, key=lambda h: h.seq)
    assert (best.seq, best.copy) == (exp["seq"], exp["copy"])
    assert min(h.seq for h in hdrs) == exp["seq"] - 1  # the other copy is the previous state
    for k in ("disk_size", "data_size", "record_offset", "record_size", "chunk_size", "nslots", "pages_per_slot",
              "disk_uuid", "lineage", "owner", "epoch", "clean", "last_backup", "backup_seq", "created_ns",
              "updated_ns", "flags"):
        assert getattr(best, k) == exp[k], k
    assert PLACEMENT_NAMES[best.placement] == exp["placement"]
    assert best.fs_uuid == "" and best.hw_id == "" and best.nextents == 0


def test_record_load_status_and_dirty_bits(golden: tuple[bytes, dict[str, Any]]) -> None:
    blob, exp = golden
    rec = Record.load(BytesDev(blob[: exp["record_size"]]), record_offset=exp["record_offset"])
    assert rec.notes == [] and not rec.suspect
    assert sorted(rec.dirty_bits().iter_set(rec.header.nchunks)) == exp["dirty_chunks"]
    for reg, e in zip(rec.regions, exp["slots"], strict=True):
        assert (reg.index, reg.hdr.node, reg.hdr.generation, reg.hdr.epoch, reg.hdr.seq,
                reg.hdr.page_map.hex()) == (e["region"], e["node"], e["generation"], e["epoch"], e["seq"],
                                            e["page_map"])
    st = rec.status()
    assert (st["placement"], st["owner"], st["epoch"], st["clean"], st["dirty_chunks"]) == (
        "tail", exp["owner"], exp["epoch"], True, len(exp["dirty_chunks"]))
    assert st["last_backup"]["snapshot"] == exp["last_backup"] and st["last_backup"]["node"] == "node-a"
    assert st["backup_in_progress"] is None and st["problems"] == []


def test_slot_headers_and_pages_decode_exactly(golden: tuple[bytes, dict[str, Any]]) -> None:
    blob, exp = golden
    rec = Record.load(BytesDev(blob[: exp["record_size"]]), record_offset=exp["record_offset"])
    geo = rec.geo
    for reg in rec.regions:
        for copy in (0, 1):
            off = geo.slot_header_block(reg.index, copy) * BLOCK
            raw = blob[off : off + BLOCK]
            s = SlotHeader.unpack(raw, region=reg.index, copy=copy, disk_uuid=exp["disk_uuid"])
            assert s.pack() == raw
    owner = next(r for r in rec.regions if r.hdr.node == exp["owner"])
    copies = [parse_page(blob[geo.page_block(owner.index, 0, c) * BLOCK :][:BLOCK], region=owner.index, page=0,
                         copy=c, disk_uuid=exp["disk_uuid"], generation=owner.hdr.generation) for c in (0, 1)]
    assert all(not c.damaged for c in copies)
    newest = max((c for c in copies if c.seq is not None), key=lambda c: c.seq or 0)
    assert newest.complete
    assert sorted(Bitmap.from_bytes(newest.bits).iter_set(rec.header.nchunks)) == exp["dirty_chunks"]


def test_history_entry(golden: tuple[bytes, dict[str, Any]]) -> None:
    blob, exp = golden
    rec = Record.load(BytesDev(blob[: exp["record_size"]]), record_offset=exp["record_offset"])
    hist = rec.history()
    assert len(hist) == len(exp["history"])
    for h, e in zip(hist, exp["history"], strict=True):
        for k, v in e.items():
            assert getattr(h, k) == v, k
        off = rec.geo.history_offset(h.slot)
        raw = blob[off : off + HISTORY_ENTRY_SIZE]
        assert HistoryEntry.unpack(raw, slot=h.slot).pack() == raw
