"""`baton rollback`: bring a disk back to a snapshot by writing only the chunks that differ."""

from __future__ import annotations

import socket

import click

from baton.cli import emit, progress_bar
from baton.cli.cmd_diff import human_size
from baton.cli.cmd_repo import json_option, key_option, open_repo, repo_option


@click.command("rollback")
@click.argument("target", metavar="NAME|DISK")
@click.argument("snapshot")
@repo_option
@key_option
@click.option("--node", envvar="BATON_NODE", default=None,
              help="Node name for an offline rollback, which takes the record over (default: hostname).")
@click.option("--record", metavar="SPEC", help="external:RECORD_DISK[#SLOT] for an offline rollback of such a disk.")
@click.option("--allow-partial", is_flag=True,
              help="Also roll back to a checkpoint of an unfinished backup (NOT a point-in-time image).")
@json_option
def command(target: str, snapshot: str, repo_url: str, key_file: str | None, node: str | None,
            record: str | None, allow_partial: bool, as_json: bool) -> None:
    """Bring a disk back to SNAPSHOT, writing only the chunks that differ.

    \b
    TARGET is an attachment NAME on this node or a DISK path. SNAPSHOT is an id, a unique prefix of 6+
    hex digits, or "latest"; it must be a snapshot of this disk (same disk uuid, size and chunk size).

    \b
    Which chunks are written: those the change record marks since the disk's last backup into this
    repository, plus those that differ between that last backup and SNAPSHOT (compared by chunk id in
    the two index trees, see `baton diff`). The disk is not read. When the record cannot vouch for that
    (no backup into this repository, the repository lacks it, another lineage, a reset, damaged or
    bypassed record), rollback reads the whole disk and compares it chunk by chunk instead, and says
    why ("method": "compare", "fallback_reason").

    \b
    Attached here (NAME, or the DISK of an attachment on this node, FUSE frontend): the chunks are
    written through /dev/baton/NAME, so the daemon records every write. Refused (exit 3) while that
    device is mounted or open: unmount the file system first, mount it again afterwards. Refused (exit
    8) when the attachment's daemon is dead or fenced.
    Detached (its record is clean): the record is taken over on this node for the rollback, the writes
    are recorded through the same write path as an attached disk's, and the disk is detached again.
    A disk attached on another node is refused (exit 6); a disk in use here (mounted, a loop device,
    held open) is refused (exit 3).

    \b
    The record's last backup is kept: the next backup is incremental and reads the rolled-back chunks.
    With the record stored as a file inside the disk's file system, the record's own blocks are never
    overwritten. The result reports the bytes written against the disk's size.

    \b
    JSON keys: snapshot, target, mode (attached|offline), device, disk_size, chunk_size, method,
    fallback_reason, last_backup, chunks_considered, chunks_written, bytes_written, bytes_read_disk,
    zero_chunks_written, record_bytes_skipped, written_fraction, seconds, notes.

    \b
    Example (after a bad upgrade):
      umount /srv/app
      baton rollback app 3f2a9c1d --repo /backup/repo
      mount /dev/baton/app /srv/app
    """
    from baton.rollback import rollback

    repo = open_repo(repo_url, key_file)
    with progress_bar(f"rollback {target}", not as_json) as prog:
        res = rollback(target, snapshot, repo, node=node or socket.gethostname(), record=record,
                       allow_partial=allow_partial, progress=prog)
    how = ("record + diff from the last backup " + (res.last_backup or "")[:12] if res.method == "record+diff"
           else f"compared chunk by chunk, because {res.fallback_reason}")
    emit(res.to_json(), as_json,
         f"rolled {res.target} ({res.mode}, {res.device}) back to snapshot {res.snapshot[:12]}\n"
         f"wrote {res.bytes_written:,} bytes ({human_size(res.bytes_written)}) of {res.disk_size:,} "
         f"({100 * res.written_fraction:.2f} % of the disk): {res.chunks_written} of {res.chunks_considered} "
         f"chunks considered, {how}; {res.seconds}s")
