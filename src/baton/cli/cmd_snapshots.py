"""`baton snapshots`: list the snapshots in a repository."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.cli.cmd_repo import json_option, key_option, open_repo, repo_option


@click.command("snapshots")
@repo_option
@click.option("--disk", "disk_uuid", metavar="UUID", help="Only snapshots of the disk with this uuid.")
@click.option("--all", "include_partial", is_flag=True,
              help="Include checkpoints of unfinished backups (complete=false; not restorable by default).")
@key_option
@json_option
def command(repo_url: str, disk_uuid: str | None, include_partial: bool, key_file: str | None,
            as_json: bool) -> None:
    """List snapshots, oldest first.

    Each line shows the snapshot id (any unique prefix of 6 or more digits names it elsewhere), start time
    (UTC), disk name and uuid, mode (full or incremental, with the reason for a full), the node that took it,
    and the data read and newly stored. With --json, the full manifests are printed.
    """
    repo = open_repo(repo_url, key_file)
    snaps = repo.snapshots(disk_uuid, include_partial=include_partial)
    rows = []
    for m in snaps:
        j = m.to_json()
        flag = "" if m.complete else " (checkpoint)"
        reason = f" ({m.reason})" if m.reason and m.mode == "full" else ""
        rows.append(f"{m.snapshot_id[:12]}  {j['start']}  {m.disk.name or '-':12} {m.disk.disk_uuid[:12]:12}  "
                    f"{m.mode}{reason}  node={m.node or '-'}  read={m.bytes_read:,}  stored={m.bytes_stored:,}"
                    f"{flag}")
    human = "\n".join(rows) if rows else "no snapshots"
    emit([m.to_json() for m in snaps], as_json, human)
