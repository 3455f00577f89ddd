"""baton status: a disk's record (offline) and, when attached on this machine, its live tracker."""

from __future__ import annotations

import os
from typing import Any

import click

from baton.cli import emit


def _human(st: dict[str, Any]) -> str:
    lines = []
    if "name" in st:
        lines.append(f"{st['name']}: {st.get('state', '?')}"
                     + (f" (pid {st['pid']}, {st['frontend']}, {st.get('device') or st.get('socket')})"
                        if st.get("state") == "running" else "")
                     + (f" ({st['failure']})" if st.get("failure") else ""))
        if st.get("frontend_reason"):
            lines.append(f"frontend {st.get('frontend')}: {st['frontend_reason']}")
        if st.get("failure"):
            lines.append(f"problem: {st['problem']}")
            lines.append(f"  hint: {st['hint']}")
    if "placement" in st:
        lines.append(f"disk {st.get('disk', '?')}  record {st.get('record', st['placement'])}  "
                     f"chunk {st['chunk_size'] // 1024} KiB  tracked {st['data_size']} bytes")
        lines.append(f"owner {st['owner'] or '-'}  epoch {st['epoch']}  "
                     f"{'clean' if st['clean'] else 'attached or not detached cleanly'}")
        lines.append(f"dirty {st['dirty_chunks']} chunks ({st['dirty_bytes']} bytes)  lineage {st['lineage']}")
        lb = st.get("last_backup")
        if lb:
            lines.append(f"last backup {lb.get('snapshot') or '-'} {lb.get('mode', '')} {lb.get('result', '')} "
                         f"by {lb.get('node', '?')}")
        else:
            lines.append("last backup: none")
        if st.get("backup_in_progress"):
            lines.append(f"backup in progress (frozen set held for {st['backup_in_progress']})")
        for r in st.get("repos") or []:
            if r.get("repo_id"):
                pending = f"  next backup full ({', '.join(r['full_pending'])})" if r.get("full_pending") else ""
                lines.append(f"repository {r['repo_id'][:12]}  last backup {r.get('last_backup') or '-'}  "
                             f"owed {r.get('owed_chunks', 0)} chunks{pending}")
        bc = st.get("bypass_check")
        if st.get("written_while_not_attached"):
            lines.append("written while not attached: the next backup is full")
        elif bc:
            lines.append(f"writes that bypass Baton: noticed ({bc['fs']} markers)" if bc.get("checkable")
                         else bc.get("why") or "writes that bypass Baton cannot be noticed")
        for p in st.get("problems", []):  # the record's problems (the daemon's, if any, is printed above)
            lines.append(f"problem: {p}")
    if "writes" in st:
        lines.append(f"writes {st['writes']}  first-touch marks {st.get('first_touch', 0)}  "
                     f"metadata syncs {st['metadata_syncs']}")
    return "\n".join(lines)


@click.command("status")
@click.argument("target", metavar="NAME|DISK")
@click.option("--record", metavar="SPEC", help="Where DISK's record is, if on a record disk (external:RDISK).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def command(target: str, record: str | None, as_json: bool) -> None:
    """Show the record of DISK, or the attachment NAME on this machine.

    A bare NAME attached on this machine means the attachment, even when a file or directory of that name is
    in the working directory (as for `baton backup`); write ./NAME for such a path.

    For a DISK path this reads the record without writing anything, so it works on a disk nobody has attached
    (and on one attached elsewhere). Keys: placement, chunk_size (bytes), owner, epoch, clean, dirty_chunks,
    dirty_bytes, lineage, last_backup, backup_in_progress, slots, problems, format_version, repos (per tracked
    repository: repo_id, last_backup, owed_chunks, full_pending), written_while_not_attached, and bypass_check
    (checkable, fs, changed, why: whether writes to the raw disk, bypassing /dev/baton/NAME, can be noticed).

    For an attached NAME it adds the live daemon: state (running | failed), pid, node, frontend (fuse, nbd or
    dm: the one `attach --frontend auto` chose), frontend_reason (why that one: "auto: fuse, because this
    kernel has no device-mapper: ..."), device (fuse, dm) or socket (nbd), writes, first_touch, metadata_syncs,
    bytes_in, bytes_out (fuse, nbd: the dm frontend's writes bypass the daemon; its frontend_stats has the
    device's reads, writes, bytes_read, bytes_written, folds, chunks_folded, backups_frozen and freeze_ms). A failed attachment adds
    failure ("died": killed or crashed; "fenced": another node took the disk over, with fenced_by,
    epoch_mine, epoch_on_disk and fenced_at), problem and hint; a DISK attached here whose daemon failed shows
    its record plus the same keys.

    The exit status is 0 whenever the question could be answered (a failed attachment included); a NAME that
    is not attached on this node exits 6.
    """
    from baton.daemon import disk_status, is_attachment_name, name_status

    if not is_attachment_name(target) and (os.path.sep in target or os.path.exists(target)):
        st = disk_status(target, record)
    else:
        st = name_status(target)
    emit(st, as_json, _human(st))
