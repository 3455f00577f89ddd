"""The tracker over a located disk, and the backup of a disk nobody has attached (no daemon, no frontend).

:func:`open_tracker` is how the per-disk daemon (and the offline backup, and tests) build the write path over
a disk whose record was located. :func:`offline_backup` takes a detached disk's record over in this process,
runs the same backup engine a daemon runs, and detaches again, so the record ends clean as it began.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from baton.device import DirectDev, SubDev
from baton.errors import DaemonError, DeviceError, NotOwner
from baton.format.record import PLACEMENT_TAIL
from baton.host import check_not_in_use
from baton.record.placement import Located, locate
from baton.tracker.core import Tracker, spill_dir_default


def open_tracker(loc: Located, *, tracking: bool = True) -> Tracker:
    """A tracker over the data area of a located disk (opened O_DIRECT; closed with ``loc``)."""
    dev = DirectDev(loc.disk, writable=True)
    loc.devs.append(dev)
    data = SubDev(dev, 0, loc.data_size) if loc.header.placement == PLACEMENT_TAIL else dev
    if loc.header.placement != PLACEMENT_TAIL and loc.data_size != dev.size:
        raise DeviceError(f"{loc.disk} changed size since init ({loc.data_size} -> {dev.size} bytes)")
    return Tracker(loc.record, data, size=loc.data_size, tracking=tracking, spill_dir=spill_dir_default())


def offline_backup(disk: str, repo_url: str, *, node: str, name: str, key_file: str | None = None,
                   full: bool = False, record: str | None = None, if_owner: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   consistency: dict[str, Any] | None = None) -> dict[str, Any]:
    """Back up ``disk``, attached nowhere (its record is clean), from this process; the backup result.

    The record must be clean: a record that names this node as its owner means this node's daemon died
    (DaemonError: re-attach it, nothing tracks its writes); another owner means the disk is attached elsewhere
    (NotOwner). With ``if_owner`` both that other owner and a clean record (nobody owns it: the timers on every
    node must not race for it) return ``{"skipped": True, "reason", "name", "node"}`` instead. The disk must not
    be in use on this node (DeviceBusy). The record is taken over for the backup (epoch+1) and detached after
    it, whatever the outcome. A record a dm owner left with unfolded era metadata (FLAG_ERA_PENDING) is folded
    first (:func:`baton.frontends.dm.settle_era`).
    """
    from baton.backup import run_backup
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
        check_not_in_use(disk, "backup")
        repo = Repository.open(repo_url, key_file=key_file)
        loc.record.attach(node)
        try:
            # A dm owner's writes not folded yet (FLAG_ERA_PENDING): fold them through a temporarily loaded era
            # target, or distrust the record where this node has no dm-era. Never read the metadata offline.
            from baton.frontends.dm import settle_era

            settle_era(loc.record, loc.disk, name=name, size=loc.data_size)
        except BaseException:
            with contextlib.suppress(Exception):  # fenced: the record is another node's now
                loc.record.detach()
            raise
        tracker = open_tracker(loc)
        try:
            from baton.freeze import with_consistency  # --freeze/--pre/--post around the freeze point

            res: dict[str, Any] = with_consistency(consistency, lambda around: run_backup(
                tracker, repo, node=node, name=name, full=full, progress=progress, around_freeze=around))
        finally:
            tracker.close()
            loc.record.detach()
        return res
    finally:
        loc.close()
