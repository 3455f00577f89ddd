"""`baton forget`: remove snapshots by id or by retention policy."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.cli.cmd_repo import json_option, key_option, open_repo, repo_option


@click.command("forget")
@click.argument("snapshots", nargs=-1)
@repo_option
@click.option("--keep-last", type=click.IntRange(min=0), default=0, help="Keep the newest N snapshots.")
@click.option("--keep-daily", type=click.IntRange(min=0), default=0,
              help="Keep the newest snapshot of each of the last N days that have one (UTC).")
@click.option("--keep-weekly", type=click.IntRange(min=0), default=0,
              help="Keep the newest snapshot of each of the last N ISO weeks that have one.")
@click.option("--keep-monthly", type=click.IntRange(min=0), default=0,
              help="Keep the newest snapshot of each of the last N months that have one.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@key_option
@json_option
def command(snapshots: tuple[str, ...], repo_url: str, keep_last: int, keep_daily: int, keep_weekly: int,
            keep_monthly: int, dry_run: bool, key_file: str | None, as_json: bool) -> None:
    """Remove SNAPSHOTS (ids or unique prefixes) and/or every snapshot a policy does not keep.

    \b
    A policy applies to each disk (by uuid) separately and keeps the union of what its rules select.
    With a policy, checkpoints of unfinished backups older than the disk's newest complete snapshot are
    removed too. Only manifests are deleted; run `baton prune` to free the data.

    \b
    Example: baton forget --repo /backup/repo --keep-last 3 --keep-daily 7 --keep-weekly 4
    """
    from baton.repo.maintenance import ForgetPolicy, forget

    repo = open_repo(repo_url, key_file)
    policy = ForgetPolicy(keep_last, keep_daily, keep_weekly, keep_monthly)
    res = forget(repo, snapshots, policy, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {r['snapshot'][:12]} {r['start']} {r['name'] or r['disk_uuid'][:12]} ({r['why']})"
             for r in res.removed]
    lines += [f"keep    {k['snapshot'][:12]} {k['start']} {k['name'] or k['disk_uuid'][:12]} ({k['why']})"
              for k in res.kept]
    lines.append(f"{verb} {len(res.removed)} snapshots")
    emit(res.to_json(), as_json, "\n".join(lines))
