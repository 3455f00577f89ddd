"""baton backup: incremental from the record, or full with a stated reason."""

from __future__ import annotations

import os
import socket
from typing import Any

import click

from baton.cli import emit, progress_bar
from baton.errors import DaemonError, NotAttached, NotOwner


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
              help="Exit 0 quietly unless this node owns (has attached) the disk: run the same timer on every node. "
                   "An attachment here whose daemon died or was fenced still fails (exit 8).")
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

    With --if-owner, a node that does not own the disk skips it and exits 0 (under --json it prints
    {"skipped": true, "reason", "name", "node"}). A node whose attachment of the disk is dead (its daemon
    was killed, crashed or fenced) is not skipped: the backup fails with exit 8 and says what happened and
    what to do, as `status` does.

    JSON keys: snapshot, mode, reason, bytes_read, bytes_stored, chunks_changed, chunks_read, duration_s, node,
    parent, disk_uuid, disk_size, chunk_size.
    """
    import baton.cluster.attach as att
    from baton.storage import check_url

    check_url(repo)
    this_node = node or socket.gethostname()

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
    if name is not None and state is not None:  # attached here (alive or not)
        gone = att.daemon_gone(name, state)
        # This node was the owner and its tracker is gone: never a quiet skip. Only a DISK path whose record
        # shows it moved on since (taken over elsewhere) falls through to the record's own verdict below.
        if gone is not None and (if_owner or gone["owner_now"] or not os.path.exists(target)):
            raise DaemonError(f"{gone['problem']}; no backup taken", hint=gone["hint"])
        if gone is None:
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
    if not os.path.exists(target):
        if if_owner:  # not attached here: another node owns it (or nobody); the timer on the owner does the work
            _skip(target, this_node, f"{target} is not attached on this node", as_json)
            return
        raise NotAttached(f"{target} is not attached on this node and is not a disk path",
                          hint="run the backup on the node that has it attached, or pass the disk path")
    res = _offline(target, repo, key_file, full, this_node, record, if_owner, as_json)
    if res.get("skipped"):
        emit(res, as_json)
    else:
        emit(res, as_json, _human(res))


def _skip(target: str, node: str, reason: str, as_json: bool) -> dict[str, Any]:
    """The record of an --if-owner skip: printed under --json (exit 0, nothing without it)."""
    out = {"skipped": True, "reason": reason, "name": target, "node": node}
    emit(out, as_json)
    return out


def _offline(disk: str, repo_url: str, key_file: str | None, full: bool, node: str, record: str | None,
             if_owner: bool, as_json: bool) -> dict[str, Any]:
    from baton.backup import run_backup
    from baton.cluster.attach import default_name, open_tracker
    from baton.record.placement import check_not_in_use, locate
    from baton.repo import Repository

    loc = locate(disk, record, writable=True)
    try:
        h = loc.header
        if not h.clean:
            if h.owner == node:  # the record says this node owns it, and no daemon here serves it
                raise DaemonError(f"{disk} is attached on this node ({node}, epoch {h.epoch}) according to its "
                                  "record, but no Baton daemon serves it here (it died, or this node restarted); "
                                  "nothing tracks its writes now; no backup taken",
                                  hint=f"re-attach it (let Pacemaker restart the resource, or `baton attach {disk} "
                                       f"--node {node}`), then back it up")
            if if_owner:
                return {"skipped": True, "reason": f"{disk} is attached on node {h.owner or '?'} (epoch "
                        f"{h.epoch}), not on this node", "name": disk, "node": node}
            raise NotOwner(f"{disk} is attached on node {h.owner or '?'} (epoch {h.epoch}), or its owner died "
                           "without detaching", hint="back it up on its owner (`baton backup NAME`), or attach "
                           "it here first (a takeover) and back it up then")
        if if_owner:  # nobody owns a detached disk; timers on every node must not race for it
            return {"skipped": True, "reason": f"{disk} is not attached on any node (its record is clean)",
                    "name": disk, "node": node}
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
