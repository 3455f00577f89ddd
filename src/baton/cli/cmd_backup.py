"""baton backup: incremental from the record, or full with a stated reason."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from baton.cli import emit
from baton.errors import NotOwner


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True) as p:
        task = p.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            p.update(task, completed=done, total=total)

        yield update


def _human(r: dict[str, Any]) -> str:
    mib = 1 << 20
    why = f" ({r['reason']})" if r["reason"] else ""
    return (f"snapshot {r['snapshot']}  {r['mode']}{why}\n"
            f"read {r['bytes_read'] / mib:.1f} MiB of {r['disk_size'] / mib:.1f} MiB "
            f"({r['chunks_read']} chunks, {r['chunks_changed']} changed), stored {r['bytes_stored'] / mib:.1f} MiB, "
            f"{r['duration_s']:.2f} s on {r['node']}")


@click.command("backup")
@click.argument("target", metavar="NAME|DISK")
@click.option("--repo", required=True, envvar="BATON_REPO", help="Repository URL: a path, or s3://bucket/prefix.")
@click.option("--key-file", envvar="BATON_KEY_FILE", help="Key file of an encrypted repository.")
@click.option("--full", is_flag=True, help="Read the whole disk (the snapshot still stores only new chunks).")
@click.option("--if-owner", is_flag=True,
              help="Exit 0 quietly unless this node owns (has attached) the disk: run the same timer on every node.")
@click.option("--node", envvar="BATON_NODE", default=None, help="Node name for an offline backup (default: hostname).")
@click.option("--record", metavar="SPEC", help="external:RECORD_DISK[#SLOT] for an offline backup of such a disk.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(target: str, repo: str, key_file: str | None, full: bool, if_owner: bool, node: str | None,
            record: str | None, as_json: bool) -> None:
    """Back up a disk into a repository.

    TARGET is an attachment NAME on this node (the backup runs inside its daemon, so writes continue and are
    recorded), or a DISK path: if the disk is attached here, the same; if nobody has it attached (its record
    is clean), an offline backup from its record.

    Incremental when the record continues this disk's last snapshot in the repository; otherwise full, and the
    output says why (no previous snapshot, record reset, lineage mismatch, record corrupt, --full). The snapshot
    is point-in-time: writes during the backup keep their old content for it (copy-before-write). The record
    is cleared batch by batch as data is stored; a crash at any point keeps every unsaved chunk marked.

    JSON keys: snapshot, mode, reason, bytes_read, bytes_stored, chunks_changed, chunks_read, duration_s, node,
    parent, disk_uuid, disk_size, chunk_size.
    """
    import baton.cluster.attach as att

    # Is it attached here?
    name = None
    if os.path.sep not in target and att.read_state(target) is not None:
        name = target
    else:
        real = os.path.realpath(target)
        for st in att.attachments():
            if st.get("disk") == real or st["name"] == target:
                name = st["name"]
    state = att.read_state(name) if name is not None else None
    if name is not None and state is not None and att._pid_alive(int(state["pid"])):
        # The daemon's working directory is not ours: local paths must reach it absolute.
        if "://" not in repo:
            repo = os.path.abspath(repo)
        if key_file:
            key_file = os.path.abspath(key_file)
        with progress_bar(f"backup {name}", not as_json) as bar:
            res = att.request(name, {"op": "backup", "repo": repo, "key_file": key_file, "full": full},
                              timeout=None, on_progress=bar)
        emit(res, as_json, _human(res))
        return
    if if_owner and (name is not None or not os.path.exists(target)):
        return  # not attached here: another node owns it (or nobody); the timer on the owner does the work
    if not os.path.exists(target):
        raise NotOwner(f"{target} is not attached on this node and is not a disk path",
                       hint="run the backup on the node that has it attached, or pass the disk path")
    res = _offline(target, repo, key_file, full, node or socket.gethostname(), record, if_owner, as_json)
    if res is not None:
        emit(res, as_json, _human(res))


def _offline(disk: str, repo_url: str, key_file: str | None, full: bool, node: str, record: str | None,
             if_owner: bool, as_json: bool) -> dict[str, Any] | None:
    from baton.backup import run_backup
    from baton.cluster.attach import default_name, open_tracker
    from baton.record.placement import check_not_in_use, locate
    from baton.repo import Repository

    loc = locate(disk, record, writable=True)
    try:
        h = loc.header
        if not h.clean:
            if if_owner:
                return None
            raise NotOwner(f"{disk} is attached on node {h.owner or '?'} (epoch {h.epoch}), or its owner died "
                           "without detaching", hint="back it up on its owner (`baton backup NAME`), or attach "
                           "it here first (a takeover) and back it up then")
        if if_owner:
            return None  # nobody owns a detached disk; timers on every node must not race for it
        check_not_in_use(disk)
        repo = Repository.open(repo_url, key_file=key_file)
        loc.record.attach(node)
        tracker = open_tracker(loc)
        try:
            with progress_bar(f"backup {disk}", not as_json) as bar:
                res = run_backup(tracker, repo, node=node, name=default_name(disk), full=full, progress=bar)
        finally:
            tracker.close()
            loc.record.detach()
        return res
    finally:
        loc.close()
