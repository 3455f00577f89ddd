"""`baton prune`: delete unreferenced data and repack, with a grace period."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.cli.cmd_repo import json_option, key_option, open_repo, repo_option


@click.command("prune")
@repo_option
@click.option("--grace", default="1h", show_default=True, metavar="DURATION",
              help="Never delete or repack packs and pages younger than this (e.g. 30m, 1h, 2d).")
@click.option("--max-unused", default="20%", show_default=True, metavar="PERCENT",
              help="Repack a pack when more than this share of its bytes is unreferenced.")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted and repacked; change nothing.")
@key_option
@json_option
def command(repo_url: str, grace: str, max_unused: str, dry_run: bool, key_file: str | None,
            as_json: bool) -> None:
    """Delete data that no snapshot references, and repack mostly-unused packs.

    Takes the repository's exclusive lock: it fails (exit 7, "locked") while a backup, restore, verify or
    forget runs, and they fail the same way while prune runs; retry later. Packs and pages younger than --grace
    are always kept, so data written by a backup whose lock went stale survives. A referenced chunk missing
    from the index stops prune before it deletes anything (run `baton verify`). Live chunks are checked before
    they are copied into new packs. With --dry-run nothing changes and every message says "would".
    """
    from baton.repo.maintenance import parse_duration, parse_percent, prune

    repo = open_repo(repo_url, key_file)
    res = prune(repo, grace=parse_duration(grace), max_unused=parse_percent(max_unused), dry_run=dry_run,
                progress=None if as_json else (lambda msg: click.echo(f"prune: {msg}", err=True)))
    if dry_run:
        done = (f"dry run, nothing changed: would delete {res.packs_deleted} packs and {res.pages_deleted} pages, "
                f"would repack {res.packs_repacked} packs into {res.packs_written}; would free "
                f"{res.bytes_deleted:,} bytes and write {res.bytes_written:,}")
    else:
        done = (f"deleted {res.packs_deleted} packs and {res.pages_deleted} pages, repacked {res.packs_repacked} "
                f"packs into {res.packs_written}; {res.bytes_deleted:,} bytes freed, {res.bytes_written:,} written")
    emit(res.to_json(), as_json,
         f"{res.snapshots} snapshots reference {res.chunks_used} chunks ({res.chunks_unused} unused)\n"
         f"{done}; {res.packs_kept_young} packs within the grace period")
