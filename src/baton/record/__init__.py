"""The change record on shared storage: placements, slots and OR-merge, epoch fencing, group commit, history."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from baton.errors import RecordError
from baton.format.record import FLAG_CLEAN, FLAG_RESET, FLAG_UNTRACKED


def after_restore(target: str, manifest: Any) -> dict[str, Any] | None:
    """Called by restore after it wrote snapshot ``manifest`` onto ``target``. If ``target`` has a Baton record
    (tail or file placement), rewrite it so it continues from the restored snapshot: no dirty chunks (the disk
    now equals the snapshot), ``last_backup`` = the snapshot, lineage = the snapshot's, epoch raised (fencing
    any stale owner). The next backup is then incremental from the restored snapshot. If the snapshot is of
    another disk (or another size/chunk size) the record is reset instead: the next backup is full with reason
    "record reset". Returns what was done, or None when the target has no record Baton can find (an external
    record: run ``baton init --reset --record external:...`` there). A restore of a file placement also brings
    back the old record file's bytes; this rewrite replaces them."""
    from baton.record.core import format_record
    from baton.record.placement import locate

    try:
        loc = locate(target, None, writable=True)
    except RecordError:
        return None
    try:
        h = loc.header
        disk = manifest.disk
        same = disk.disk_uuid == h.disk_uuid and disk.size == h.data_size and disk.chunk_size == h.chunk_size
        new = replace(
            h, lineage=manifest.lineage if same else str(uuid.uuid4()),
            last_backup=manifest.snapshot_id if same else "", epoch=h.epoch + 1, owner="",
            flags=(h.flags | FLAG_CLEAN) & ~(FLAG_RESET | FLAG_UNTRACKED) | (0 if same else FLAG_RESET),
            **loc.record.marker_fields(),  # the restore wrote the disk: its file system's markers as left now
        )
        format_record(loc.record.area, new, keep_history=True)
        return {"record": str(loc.spec), "continues_from": manifest.snapshot_id if same else None,
                "reset": not same, "epoch": new.epoch}
    finally:
        loc.close()
