"""The format-v2 golden record (tests/data/format-v2, made by its make_golden.py) decodes with today's code: the
v2 header (repository regions, file-system marker fields), a repository region naming the committed backup,
and the same dirty chunks and history as the v1 scenario. Kept forever, like format-v1."""

from __future__ import annotations

import json
from pathlib import Path

from test_record_golden import BytesDev

from baton.format.record import ANCHOR_BLOCKS, BLOCK, REGION_REPO, Anchor
from baton.record.core import Record

DATA = Path(__file__).resolve().parents[1] / "data" / "format-v2"


def test_v2_golden_decodes() -> None:
    blob = (DATA / "tail-record.bin").read_bytes()
    exp = json.loads((DATA / "expected.json").read_text())
    size = exp["disk_size"] - exp["record_offset"]
    assert len(blob) == size
    for copy in range(ANCHOR_BLOCKS):
        a = Anchor.unpack(blob[size - (ANCHOR_BLOCKS - copy) * BLOCK :][:BLOCK], copy=copy,
                          disk_size=exp["disk_size"])
        assert a.disk_uuid == exp["disk_uuid"]
    area = BytesDev(blob[: exp["record_size"]])
    rec = Record.load(area, record_offset=exp["record_offset"])
    h = rec.header
    assert (h.version, h.nrepos, h.nslots, h.owner, h.epoch) == (2, exp["nrepos"], exp["nslots"], "node-b", 2)
    assert (h.seq, h.last_backup, h.backup_seq, h.flags) == (exp["seq"], exp["last_backup"], 1, exp["flags"])
    assert sorted(rec.dirty_bits().iter_set(h.nchunks)) == exp["dirty_chunks"]
    reg = rec.find_repo(exp["repo_id"])
    assert reg is not None and reg.hdr.kind == REGION_REPO and reg.hdr.last_backup == exp["repo_last_backup"]
    assert rec.repo_state(exp["repo_id"]) is not None
    for got, want in zip(rec.regions, exp["slots"], strict=True):
        assert (got.hdr.generation, got.hdr.seq, got.hdr.page_map.hex()) == (
            want["generation"], want["seq"], want["page_map"])
    hist = rec.history()
    assert [e.snapshot_id for e in hist] == [x["snapshot_id"] for x in exp["history"]]
    assert hist[0].version == 2 and not rec.notes
