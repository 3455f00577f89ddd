"""Write the format-v3 golden files: the record area (with its tail anchors) of a small tail-placed image whose
record ends with an era region, after a dm owner's life.

    python tests/data/format-v3/make_golden.py     # run from the project root; needs no root privileges

What it does, with the real record code (so the files are what Baton v3 writes):

1. an 8 MiB image, ``tail`` placement laid out as ``baton init`` lays out v3 (data area ending on 1 MiB, era
   region sized by era_region_size at the end of the record area), 64 KiB chunks, 2 node slots, 2 repository
   regions, fixed disk UUID and lineage;
2. node-a attaches with the dm frontend, begin_era, marks chunks 1, 2, 3 of the 32 (a fold), then
   set_era_folded(4, pending); a backup freezes them and commits a history entry with era 4;
3. node-a marks 0, 5, 17, 29 and "crashes" (no detach: FLAG_ERA_PENDING stays);
4. node-b takes over with dm (its slot receives node-a's bits), finds the era metadata re-created: distrust
   with a reason, set_era_folded(0), marks 31, folds to era 2 and detaches cleanly (pending cleared).

Outputs, next to this script: ``tail-record.bin.gz`` (the image from the start of the record area to its end,
anchors included; gzip, as the era region is megabytes of zeros) and ``expected.json`` (the values
tests/unit/test_record_golden_v3.py checks). Generations and wall-clock fields differ on every run;
expected.json records them. Regenerate only when the format changes on purpose (that is a new version, with a
new directory).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

from baton.device import DirectDev, SubDev
from baton.format.record import (
    ANCHOR_BLOCKS,
    BLOCK,
    ERA_ALIGN,
    PLACEMENT_TAIL,
    Anchor,
    HistoryEntry,
    RecordHeader,
    area_for_era,
    era_offset_at_end,
    era_region_size,
    geometry_for,
)
from baton.record.core import Record, format_record

HERE = Path(__file__).resolve().parent
DISK_SIZE = 8 << 20
CHUNK = 64 << 10
NSLOTS = 2
NREPOS = 2
DISK_UUID = "0b7a70e5-1d2c-4e5f-8a9b-0c1d2e3f4a5b"
LINEAGE = "11111111-2222-4333-8444-555555555555"
SNAPSHOT = "5e" * 16
REPO = "7e" * 16
T0 = 1_795_000_000_000_000_000  # fixed "wall clock" for the history entry
REASON = "era metadata was re-created: its era 1 is below era_folded 4"


def main() -> int:
    geo = geometry_for(DISK_SIZE, CHUNK, NSLOTS, NREPOS)
    era_size = era_region_size(DISK_SIZE, CHUNK)
    avail = DISK_SIZE - ANCHOR_BLOCKS * BLOCK
    data_size = (avail - area_for_era(geo.size, era_size)) // ERA_ALIGN * ERA_ALIGN  # as placement.tail_layout
    rec_size = avail - data_size
    era_offset = era_offset_at_end(rec_size, geo.size, era_size)
    assert era_offset is not None
    era_size = rec_size - era_offset  # the region runs to the end of the record area
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "golden.img")
        with open(img, "wb") as f:
            f.truncate(DISK_SIZE)
        dev = DirectDev(img, writable=True, direct=False)
        try:
            area = SubDev(dev, data_size, rec_size)
            hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=NSLOTS, chunk_size=CHUNK, disk_uuid=DISK_UUID,
                               lineage=LINEAGE, disk_size=DISK_SIZE, data_size=data_size, record_offset=data_size,
                               record_size=rec_size, pages_per_slot=geo.pages_per_slot, created_ns=T0, version=3,
                               nrepos=NREPOS, era_offset=era_offset, era_size=era_size)
            format_record(area, hdr)
            for copy in range(ANCHOR_BLOCKS):
                a = Anchor(disk_uuid=DISK_UUID, disk_size=DISK_SIZE, record_offset=data_size,
                           record_size=rec_size, copy=copy)
                dev.pwrite(DISK_SIZE - (ANCHOR_BLOCKS - copy) * BLOCK, a.pack())
            rec = Record.load(area, record_offset=data_size)
            rec.attach("node-a", "dm")
            rec.begin_era()
            rec.mark([1, 2, 3])
            rec.set_era_folded(4, pending=True)
            rec.use_repo(REPO)
            rec.freeze(SNAPSHOT)
            rec.commit_backup(HistoryEntry(
                seq=0, snapshot_id=SNAPSHOT, lineage=LINEAGE, node="node-a", start_ns=T0, end_ns=T0 + 2_500_000_000,
                chunks_read=3, bytes_read=3 * CHUNK, chunks_stored=2, bytes_stored=70_000, bytes_deduped=CHUNK,
                mode="full", result="ok", reason="no previous snapshot", digest="ab" * 32, epoch=0, era=4))
            rec.mark([0, 5, 17, 29])  # then node-a "crashes": no detach, FLAG_ERA_PENDING stays
            rec_b = Record.load(area, record_offset=data_size)
            rec_b.attach("node-b", "dm")
            rec_b.distrust(REASON)  # before lowering era_folded (docs/format.md 1.5)
            rec_b.set_era_folded(0, pending=True)
            rec_b.mark([31])
            rec_b.set_era_folded(2, pending=False)
            rec_b.detach()
            dev.sync()
            final = Record.load(area, record_offset=data_size)
            h = final.header
            region = final.era_region()
            assert region is not None
            expected = {
                "disk_size": DISK_SIZE, "data_size": data_size, "record_offset": data_size, "record_size": rec_size,
                "chunk_size": CHUNK, "nslots": NSLOTS, "pages_per_slot": geo.pages_per_slot,
                "disk_uuid": DISK_UUID, "lineage": LINEAGE, "placement": "tail", "owner": "node-b", "epoch": 2,
                "clean": True, "seq": h.seq, "copy": h.copy, "last_backup": SNAPSHOT, "backup_seq": 1,
                "created_ns": T0, "updated_ns": h.updated_ns, "flags": h.flags,
                "frontend": h.frontend, "era_offset": h.era_offset, "era_size": h.era_size,
                "era_folded": h.era_folded, "era_pending": final.era_pending, "distrust_reason": h.distrust_reason,
                "dirty_chunks": [0, 5, 17, 29, 31],
                "nrepos": NREPOS, "repo_id": REPO,
                "slots": [{"region": r.index, "node": r.hdr.node, "generation": r.hdr.generation,
                           "epoch": r.hdr.epoch, "seq": r.hdr.seq, "page_map": r.hdr.page_map.hex(),
                           "version": r.hdr.version} for r in final.regions],
                "history": [{"seq": 1, "slot": 0, "snapshot_id": SNAPSHOT, "lineage": LINEAGE, "node": "node-a",
                             "start_ns": T0, "end_ns": T0 + 2_500_000_000, "chunks_read": 3,
                             "bytes_read": 3 * CHUNK, "chunks_stored": 2, "bytes_stored": 70_000,
                             "bytes_deduped": CHUNK, "mode": "full", "result": "ok",
                             "reason": "no previous snapshot", "digest": "ab" * 32, "epoch": 1, "era": 4}],
            }
            with open(img, "rb") as f:
                f.seek(data_size)
                blob = f.read()
        finally:
            dev.close()
    (HERE / "tail-record.bin.gz").write_bytes(gzip.compress(blob, mtime=0))
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {HERE / 'tail-record.bin.gz'} ({len(blob)} bytes before gzip) and expected.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
