"""Write the format-v2 golden files: the record area (with its tail anchors) of a small tail-placed image.

    python tests/data/format-v2/make_golden.py     # run from the project root; needs no root privileges

What it does, with the real record code (so the files are what Baton v2 writes):

1. a 4 MiB image, ``tail`` placement, 64 KiB chunks, 2 node slots, fixed disk UUID and lineage;
2. node-a attaches, marks chunks 1, 2, 3, a backup freezes them and commits a history entry with fixed values;
3. node-a marks 0, 5, 17, 40 and "crashes" (no detach);
4. node-b takes over (its slot receives node-a's bits), marks 60, and detaches cleanly.

Outputs, next to this script: ``tail-record.bin`` (the image from the start of the record area to its end,
anchors included) and ``expected.json`` (the values tests/unit/test_record_golden.py checks). Generations and
wall-clock fields come out different on every run; expected.json records them. Regenerate only when the
format changes on purpose (that is a new version, with a new directory).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from baton.device import DirectDev, SubDev
from baton.format.record import (
    ANCHOR_BLOCKS,
    BLOCK,
    PLACEMENT_TAIL,
    Anchor,
    HistoryEntry,
    RecordHeader,
    geometry_for,
)
from baton.record.core import Record, format_record

HERE = Path(__file__).resolve().parent
DISK_SIZE = 4 << 20
CHUNK = 64 << 10
NSLOTS = 2
DISK_UUID = "0b7a70e5-1d2c-4e5f-8a9b-0c1d2e3f4a5b"
LINEAGE = "11111111-2222-4333-8444-555555555555"
SNAPSHOT = "5e" * 16
REPO = "7e" * 16
T0 = 1_795_000_000_000_000_000  # fixed "wall clock" for the history entry


def main() -> int:
    geo = geometry_for(DISK_SIZE, CHUNK, NSLOTS, 2)
    data_size = (DISK_SIZE - ANCHOR_BLOCKS * BLOCK - geo.size) // CHUNK * CHUNK
    rec_size = DISK_SIZE - ANCHOR_BLOCKS * BLOCK - data_size
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "golden.img")
        with open(img, "wb") as f:
            f.truncate(DISK_SIZE)
        dev = DirectDev(img, writable=True, direct=False)
        try:
            area = SubDev(dev, data_size, rec_size)
            hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=NSLOTS, chunk_size=CHUNK, disk_uuid=DISK_UUID,
                               lineage=LINEAGE, disk_size=DISK_SIZE, data_size=data_size, record_offset=data_size,
                               record_size=rec_size, pages_per_slot=geo.pages_per_slot, created_ns=T0, version=2, nrepos=2)
            format_record(area, hdr)
            for copy in range(ANCHOR_BLOCKS):
                a = Anchor(disk_uuid=DISK_UUID, disk_size=DISK_SIZE, record_offset=data_size,
                           record_size=rec_size, copy=copy)
                dev.pwrite(DISK_SIZE - (ANCHOR_BLOCKS - copy) * BLOCK, a.pack())
            rec = Record.load(area, record_offset=data_size)
            rec.attach("node-a")
            rec.mark([1, 2, 3])
            rec.use_repo(REPO)
            rec.freeze(SNAPSHOT)
            rec.commit_backup(HistoryEntry(
                seq=0, snapshot_id=SNAPSHOT, lineage=LINEAGE, node="node-a", start_ns=T0, end_ns=T0 + 2_500_000_000,
                chunks_read=3, bytes_read=3 * CHUNK, chunks_stored=2, bytes_stored=70_000, bytes_deduped=CHUNK,
                mode="full", result="ok", reason="no previous snapshot", digest="ab" * 32, epoch=0))
            rec.mark([0, 5, 17, 40])  # then node-a "crashes": no detach
            rec_b = Record.load(area, record_offset=data_size)
            rec_b.attach("node-b")
            rec_b.mark([60])
            rec_b.detach()
            dev.sync()
            final = Record.load(area, record_offset=data_size)
            h = final.header
            expected = {
                "disk_size": DISK_SIZE, "data_size": data_size, "record_offset": data_size, "record_size": rec_size,
                "chunk_size": CHUNK, "nslots": NSLOTS, "pages_per_slot": geo.pages_per_slot,
                "disk_uuid": DISK_UUID, "lineage": LINEAGE, "placement": "tail", "owner": "node-b", "epoch": 2,
                "clean": True, "seq": h.seq, "copy": h.copy, "last_backup": SNAPSHOT, "backup_seq": 1,
                "created_ns": T0, "updated_ns": h.updated_ns, "flags": h.flags,
                "dirty_chunks": [0, 5, 17, 40, 60],
                "nrepos": 2, "repo_id": REPO, "repo_last_backup": final.find_repo(REPO).hdr.last_backup if final.find_repo(REPO) else "",
                "slots": [{"region": r.index, "node": r.hdr.node, "generation": r.hdr.generation,
                           "epoch": r.hdr.epoch, "seq": r.hdr.seq, "page_map": r.hdr.page_map.hex()}
                          for r in final.regions],
                "history": [{"seq": 1, "slot": 0, "snapshot_id": SNAPSHOT, "lineage": LINEAGE, "node": "node-a",
                             "start_ns": T0, "end_ns": T0 + 2_500_000_000, "chunks_read": 3,
                             "bytes_read": 3 * CHUNK, "chunks_stored": 2, "bytes_stored": 70_000,
                             "bytes_deduped": CHUNK, "mode": "full", "result": "ok",
                             "reason": "no previous snapshot", "digest": "ab" * 32, "epoch": 1}],
            }
            with open(img, "rb") as f:
                f.seek(data_size)
                blob = f.read()
        finally:
            dev.close()
    (HERE / "tail-record.bin").write_bytes(blob)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {HERE / 'tail-record.bin'} ({len(blob)} bytes) and expected.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
