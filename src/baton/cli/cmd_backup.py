"""baton backup: incremental from the record, or full with a stated reason. The options are declared here; the
work is :func:`baton.cli.backup_client.run` (also reached without click: see that module)."""

from __future__ import annotations

import os

import click

from baton.cli.backup_client import run


@click.command("backup")
@click.argument("target", metavar="NAME|DISK")
@click.option("--repo", required=True, envvar="BATON_REPO", help="Repository URL: a path, or s3://bucket/prefix.")
@click.option("--key-file", envvar="BATON_KEY_FILE", help="Key file of an encrypted repository.")
@click.option("--full", is_flag=True, help="Read the whole disk (the snapshot still stores only new chunks).")
@click.option("--if-owner", is_flag=True,
              help="Exit 0 quietly unless this node owns (has attached) the disk: run the same timer on every node. "
                   "An attachment here whose daemon died or was fenced still fails (exit 8).")
@click.option("--node", envvar="BATON_NODE", default=None, help="Node name for an offline backup (default: hostname).")
@click.option("--record", metavar="SPEC", help="external:RECORD_DISK[#SLOT] for an offline backup of such a disk.")
@click.option("--freeze", "freeze", metavar="MOUNTPOINT", type=click.Path(file_okay=False),
              help="fsfreeze the file system mounted at MOUNTPOINT around the freeze point only (milliseconds), "
                   "thawed on every path (error, signal, --freeze-timeout).")
@click.option("--pre", "pre", metavar="CMD", help="Run CMD (sh -c) just before the freeze point; a non-zero exit "
              "stops the backup (e.g. put a database into backup mode).")
@click.option("--post", "post", metavar="CMD", help="Run CMD (sh -c) just after the freeze point (and whenever "
              "--pre ran, even if the backup failed); a non-zero exit fails the command (exit 1) after the snapshot "
              "was committed.")
@click.option("--hook-timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Seconds each of --pre and --post may run (then it is killed and counts as failed).")
@click.option("--freeze-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds after which a watchdog thaws the --freeze file system whatever happens.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(target: str, repo: str, key_file: str | None, full: bool, if_owner: bool, node: str | None,
            record: str | None, freeze: str | None, pre: str | None, post: str | None, hook_timeout: float,
            freeze_timeout: float, as_json: bool) -> None:
    """Back up a disk into a repository.

    TARGET is an attachment NAME on this node (the backup runs inside its daemon, so writes continue and are
    recorded), or a DISK path: if the disk is attached here, the same; if nobody has it attached (its record
    is clean), an offline backup from its record.

    Incremental when the record continues this disk's last snapshot in the repository; otherwise full, and the
    output says why (no previous snapshot, record reset, lineage mismatch, record corrupt, --full). The snapshot
    is point-in-time: writes during the backup keep their old content for it (copy-before-write). The record
    is cleared batch by batch as data is stored; a crash at any point keeps every unsaved chunk marked.

    With --if-owner, a node that does not own the disk skips it and exits 0 (under --json it prints
    {"skipped": true, "reason", "name", "node"}). A node whose attachment of the disk is dead (its daemon
    was killed, crashed or fenced) is not skipped: the backup fails with exit 8 and says what happened and
    what to do, as `status` does.

    Consistent backups: --pre CMD, then fsfreeze -f MOUNTPOINT (--freeze), the freeze point, fsfreeze -u,
    then --post CMD. The file system is frozen only around the freeze point, never during the copy (the
    snapshot stays point-in-time by copy-before-write). Each hook's exit status, output tail and time, and
    the freeze window (window_s), are in --json under "consistency" and in the snapshot's info; the record's
    history entry has no room for them. A failing --pre or freeze takes no backup.

    JSON keys: snapshot, mode, reason, bytes_read, bytes_stored, chunks_changed, chunks_read, duration_s, node,
    parent, disk_uuid, disk_size, chunk_size.
    """
    consistency = {"freeze": os.path.abspath(freeze) if freeze else None, "pre": pre, "post": post,
                   "hook_timeout": hook_timeout, "freeze_timeout": freeze_timeout} \
        if (freeze or pre or post) else None
    run(target, repo, key_file=key_file, full=full, if_owner=if_owner, node=node, record=record,
        consistency=consistency, as_json=as_json)
