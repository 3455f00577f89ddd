"""The format-v3 golden record (tests/data/format-v3, made by its make_golden.py) decodes with today's code: the
v3 header (frontend, era region, era_folded, a distrust reason with FLAG_DISTRUSTED), the era kept by the
history entry, the era region's first 64 KiB zeroed after every other structure, and the dirty chunks of a dm
owner's crash and takeover. Kept forever, like format-v1 and format-v2."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

from test_record_golden import BytesDev

from baton.format.record import (
    ANCHOR_BLOCKS,
    BLOCK,
    ERA_ALIGN,
    ERA_ZERO_BYTES,
    FLAG_CLEAN,
    FLAG_DISTRUSTED,
    FLAG_ERA_PENDING,
    FLAG_RESET,
    HISTORY_ENTRY_SIZE,
    Anchor,
    HistoryEntry,
    RecordHeader,
    era_region_size,
)
from baton.record.core import Record, era_unsupported_reason

DATA = Path(__file__).resolve().parents[1] / "data" / "format-v3"


def _load() -> tuple[bytes, dict, int]:  # type: ignore[type-arg]
    blob = gzip.decompress((DATA / "tail-record.bin.gz").read_bytes())
    exp = json.loads((DATA / "expected.json").read_text())
    return blob, exp, exp["disk_size"] - exp["record_offset"]


def test_v3_golden_header_decodes() -> None:
    blob, exp, size = _load()
    assert len(blob) == size
    for copy in range(ANCHOR_BLOCKS):
        a = Anchor.unpack(blob[size - (ANCHOR_BLOCKS - copy) * BLOCK :][:BLOCK], copy=copy,
                          disk_size=exp["disk_size"])
        assert (a.disk_uuid, a.record_offset, a.record_size) == (exp["disk_uuid"], exp["record_offset"],
                                                                 exp["record_size"])
    h = RecordHeader.unpack(blob[exp["copy"] * BLOCK :][:BLOCK], copy=exp["copy"], record_offset=exp["record_offset"])
    assert (h.version, h.seq, h.owner, h.epoch, h.flags) == (3, exp["seq"], "node-b", 2, exp["flags"])
    assert h.flags == FLAG_CLEAN | FLAG_RESET | FLAG_DISTRUSTED and not h.flags & FLAG_ERA_PENDING
    assert (h.frontend, h.era_offset, h.era_size, h.era_folded, h.distrust_reason) == (
        exp["frontend"], exp["era_offset"], exp["era_size"], exp["era_folded"], exp["distrust_reason"])
    # The v3 fields at the offsets docs/format.md gives.
    raw = blob[exp["copy"] * BLOCK :][:BLOCK]
    assert struct.unpack_from("<HH", raw, 8) == (3, 492) and raw[334] == 3
    assert struct.unpack_from("<QQQ", raw, 336) == (exp["era_offset"], exp["era_size"], exp["era_folded"])
    assert raw[360:488].rstrip(b"\0").decode() == exp["distrust_reason"]


def test_v3_golden_record_loads_with_its_era_region() -> None:
    blob, exp, _ = _load()
    rec = Record.load(BytesDev(blob[: exp["record_size"]]), record_offset=exp["record_offset"])
    h = rec.header
    assert not rec.notes and era_unsupported_reason(rec) is None and rec.era_pending is exp["era_pending"]
    region = rec.era_region()
    assert region is not None and region.extents == [(exp["era_offset"], exp["era_size"])]
    # 1 MiB aligned on the disk, after every structure, running to the end of the record area; sized by the rule.
    assert (exp["record_offset"] + h.era_offset) % ERA_ALIGN == 0 and rec.geo.size <= h.era_offset
    assert h.era_offset + h.era_size == h.record_size and h.era_size >= era_region_size(h.data_size, h.chunk_size)
    assert blob[h.era_offset : h.era_offset + ERA_ZERO_BYTES] == bytes(ERA_ZERO_BYTES)
    assert sorted(rec.dirty_bits().iter_set(h.nchunks)) == exp["dirty_chunks"]
    reg = rec.find_repo(exp["repo_id"])
    assert reg is not None and reg.hdr.last_backup == exp["last_backup"]
    for got, want in zip(rec.regions, exp["slots"], strict=True):
        assert (got.hdr.generation, got.hdr.seq, got.hdr.page_map.hex(), got.hdr.version) == (
            want["generation"], want["seq"], want["page_map"], want["version"])
    st = rec.status()
    assert st["era"] == {"offset": exp["era_offset"], "size": exp["era_size"], "folded": exp["era_folded"],
                         "pending": exp["era_pending"]}
    assert st["owner_frontend"] == "dm" and st["distrusted"] == exp["distrust_reason"]


def test_v3_golden_history_keeps_the_era() -> None:
    blob, exp, _ = _load()
    rec = Record.load(BytesDev(blob[: exp["record_size"]]), record_offset=exp["record_offset"])
    want = exp["history"][0]
    (got,) = rec.history()
    assert (got.version, got.era, got.seq, got.snapshot_id, got.reason, got.epoch) == (
        3, want["era"], want["seq"], want["snapshot_id"], want["reason"], want["epoch"])
    raw = blob[rec.geo.history_offset(0) :][:HISTORY_ENTRY_SIZE]
    assert struct.unpack_from("<Q", raw, 320)[0] == want["era"] and not any(raw[328:508])
    assert HistoryEntry.unpack(raw, slot=0) == got
