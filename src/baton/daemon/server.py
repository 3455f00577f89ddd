"""The per-disk daemon (``baton serve``): the one writer of a disk's record on this node.

It takes the disk over (the record's takeover: epoch+1), builds the tracker over it, serves it through one
:class:`baton.frontends.Frontend` chosen by kind from the registry, publishes RUN_DIR/NAME/daemon.json, and
answers its control socket (:mod:`baton.daemon.protocol`) at RUN_DIR/NAME/control.sock::

    {"op": "status"}                      -> the record's status plus the tracker's and frontend's counters
    {"op": "detach"}                      -> {"name", "detached", "was_running"}, then the daemon exits
                                             (DeviceBusy while the device is in use or a backup runs)
    {"op": "backup", "repo": URL, ...}    -> progress lines, then the backup's result (runs in the daemon)

It ends when it is detached (control socket or SIGTERM), when its frontend stops by itself (the frontend's
typed failure says why), or when it is fenced (a newer owner epoch on disk, seen by a write's group commit
or by the heartbeat that re-reads the header every second). :func:`serve` then raises the error it ended
with (:class:`Fenced` for a fence), and ``baton serve`` maps that to the exit status as every command does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from baton import frontends
from baton.daemon.offline import open_tracker
from baton.daemon.protocol import AfterReply, ControlServer, Progress, error_reply
from baton.daemon.runtime import control_path, dev_dir, remove_run_dir, run_dir
from baton.errors import BatonError, DeviceBusy, Fenced, RepoLocked, UsageError
from baton.frontends import Frontend, FrontendConfig
from baton.host.attachments import read_state, state_path, write_state
from baton.record.placement import Located, describe, locate
from baton.tracker.core import Tracker

log = logging.getLogger("baton.daemon")
FENCE_HEARTBEAT = 1.0  # seconds between re-reads of the record header
# A takeover from a dm owner on another node that did not detach waits this long before loading its era
# metadata: if that owner is still alive, its heartbeat (above) fences it first (top and metadata devices to
# error), so two era targets never write one metadata. STONITH or SCSI reservations stay the primary fence.
ERA_FENCE_WAIT = float(os.environ.get("BATON_ERA_FENCE_WAIT", 5 * FENCE_HEARTBEAT))  # env: slow test guests
# 5 heartbeats: in TCG test guests at host load 11 the stale owner fenced itself only 0.5 s inside 2.5 s.


def _tcp_address(spec: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` (HOST defaults to 127.0.0.1) -> (host, port); None for None."""
    if not spec:
        return None
    host, _, port = spec.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"--tcp {spec!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


class Daemon:
    """The per-disk daemon: :meth:`start`, then :meth:`run_until_stopped`, which returns the error it ended
    with (None after a detach)."""

    def __init__(self, disk: str, *, node: str, name: str, frontend: str, record: str | None, tracking: bool,
                 tcp: str | None, cow_size: str | None = None) -> None:
        self.disk = os.path.realpath(disk)
        self.node, self.name, self.requested = node, name, frontend
        if frontend not in frontends.choices():
            frontends.get(frontend)  # UsageError naming the choices
        self.kind = frontend  # the kind chosen at start (``auto`` resolved: frontends.choose)
        self.frontend_reason = ""
        self.era_settled: str | None = None  # what a userspace attach did about a dm owner's unfolded writes
        self.cow_size = cow_size  # --cow-size as given (a size or a percentage of the disk)
        self.record_spec, self.tracking, self.tcp = record, tracking, _tcp_address(tcp)
        self.loc: Located | None = None
        self.tracker: Tracker | None = None
        self.frontend: Frontend | None = None
        self.control: ControlServer | None = None
        self.stop_event = threading.Event()
        self.ended_with: BatonError | None = None  # why the daemon ends, when it is not a detach
        self.backup_lock = threading.Lock()
        self.last_backup: dict[str, Any] | None = None
        self.started = time.time()
        self.detaching = False  # a detach stops the frontend on purpose: not a failure
        self.fence_recorded = False

    # -- start-up --------------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Take over, serve, publish the state file and open the control socket; the state published."""
        loc = locate(self.disk, self.record_spec, writable=True)
        self.loc = loc
        self.kind, self.frontend_reason = frontends.choose(self.requested, disk=self.disk, record=loc.record)
        frontend_cls = frontends.get(self.kind)
        prev = loc.header
        fence_wait = ERA_FENCE_WAIT if (not prev.clean and prev.owner and prev.owner != self.node
                                        and prev.frontend == "dm") else 0.0
        loc.record.attach(self.node, frontend=self.kind)
        if not self.tracking:
            loc.record.distrust()  # unrecorded writes follow: the next backup must be full, and says so
        if not frontend_cls.folds_era:  # a dm owner's unfolded writes: fold them (dm-era here) or distrust
            from baton.frontends.dm import settle_era

            self.era_settled = settle_era(loc.record, self.disk, name=self.name, size=loc.data_size,
                                          fence_wait=fence_wait)
            if self.era_settled:
                log.warning("%s: %s", self.name, self.era_settled)
        self.tracker = open_tracker(loc, tracking=self.tracking)
        cow_size = None
        if self.cow_size:  # else the frontend's default
            from baton.frontends.dm import cow_size_bytes

            cow_size = cow_size_bytes(self.cow_size, loc.data_size, loc.header.chunk_size)
        config = FrontendConfig(name=self.name, run_dir=run_dir(), dev_dir=dev_dir(), tcp=self.tcp,
                                disk=self.disk, cow_size=cow_size, fence_wait=fence_wait)
        self.frontend = frontend_cls.create(self.tracker, config)
        endpoint = self.frontend.start()
        st = {"name": self.name, "pid": os.getpid(), "node": self.node, "disk": self.disk,
              "record": str(loc.spec), "frontend": self.kind, "frontend_reason": self.frontend_reason,
              "device": endpoint.device, "socket": endpoint.socket, "tcp": endpoint.tcp, "epoch": loc.header.epoch,
              "tracking": self.tracking, "started": self.started}
        if self.era_settled:
            st["era_settled"] = self.era_settled
        write_state(self.name, st)
        self.control = ControlServer(control_path(self.name), self._on_request, name="control")
        self.control.start()
        return st

    def watch_fence(self, interval: float = FENCE_HEARTBEAT) -> None:
        """Re-read the record header every ``interval`` s: a superseded owner stops even if it only writes
        chunks that are already marked. On Fenced the frontend is stopped and the daemon ends with it."""

        def run() -> None:
            assert self.loc is not None
            while not self.stop_event.wait(interval):
                try:
                    self.loc.record.heartbeat()
                except Fenced as e:
                    log.error("fenced: %s", e)
                    self.end(e)  # first: stopping the frontend may take a while, or hang
                    if self.frontend is not None:
                        with contextlib.suppress(Exception):
                            self.frontend.stop(force=True)
                    self.stop_event.set()
                    return
                except Exception as e:  # an unreadable header is not a fence; the next commit decides
                    log.warning("fence heartbeat: %s", e)

        threading.Thread(target=run, name="fence-heartbeat", daemon=True).start()

    def end(self, err: BatonError) -> None:
        """Remember why the daemon ends (the first reason wins); a fence is also recorded in daemon.json."""
        if self.ended_with is None:
            self.ended_with = err
        if isinstance(err, Fenced):
            self.record_fence(err)

    def record_fence(self, err: Fenced) -> None:
        """Record in daemon.json, before the daemon exits, that it was fenced: by which node, at which epochs
        (ours, and the one on disk), when. `status`, `backup` and `detach` read it (see
        :func:`baton.daemon.client.daemon_gone`); a killed daemon leaves no such record, so its absence means
        killed or crashed. Never raises."""
        if self.fence_recorded:
            return
        self.fence_recorded = True
        by, on_disk = "", err.on_disk
        try:
            assert self.loc is not None
            rec = self.loc.record
            cur = rec.read_header(rec.area, record_offset=rec.header.record_offset)
            by, on_disk = cur.owner, cur.epoch
        except Exception as e:  # the header may be unreadable now; the error still names the epochs
            log.warning("fenced: cannot re-read the record header to name the new owner: %s", e)
        try:
            st = read_state(self.name) or {"name": self.name, "pid": os.getpid(), "node": self.node,
                                           "disk": self.disk, "frontend": self.kind}
            st |= {"state": "fenced", "fenced_by": by or "?", "epoch_mine": err.mine, "epoch_on_disk": on_disk,
                   "fenced_at": time.time(), "fence_message": str(err)}
            write_state(self.name, st)
        except OSError as e:
            log.error("fenced: cannot record it in %s: %s", state_path(self.name), e)

    # -- control requests ------------------------------------------------------------------------------

    def _on_request(self, req: dict[str, Any], progress: Progress) -> Any:
        op = req.get("op")
        if op == "status":
            return self.status()
        if op == "detach":
            self.detach()
            return AfterReply({"name": self.name, "detached": True, "was_running": True}, self.stop_event.set)
        if op == "backup":
            return self.backup(req, progress)
        raise UsageError(f"unknown op {op!r}")

    def status(self) -> dict[str, Any]:
        assert self.loc is not None and self.tracker is not None and self.frontend is not None
        rec = self.loc.record
        st = describe(self.loc)
        ts = self.tracker.statistics()
        failure = self.frontend.failure
        endpoint = self.frontend.endpoint
        return st | {
            "name": self.name, "state": "running" if failure is None else "failed", "pid": os.getpid(),
            "node": self.node, "frontend": self.kind, "frontend_reason": self.frontend_reason,
            "device": endpoint.device if endpoint else None,
            "socket": endpoint.socket if endpoint else None, "tcp": endpoint.tcp if endpoint else None,
            "tracking": self.tracking, "writes": ts["writes"], "reads": ts["reads"],
            "first_touch": ts["first_touch"], "metadata_syncs": ts["metadata_syncs"],
            "metadata_commits": ts["metadata_commits"], "bytes_in": ts["bytes_in"], "bytes_out": ts["bytes_out"],
            "flushes": ts["flushes"], "discards": ts["discards"], "cbw_copies": ts["cbw_copies"],
            "record_stats": rec.statistics(), "frontend_stats": self.frontend.statistics(),
            "uptime_s": round(time.time() - self.started, 1), "last_backup_here": self.last_backup,
            "problem": str(failure) if failure is not None else None,
        }

    def backup(self, req: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from baton.backup import run_backup
        from baton.repo.cache import repo_cache

        assert self.tracker is not None
        if not self.backup_lock.acquire(blocking=False):
            raise RepoLocked(f"a backup of {self.name} is already running on this node")
        try:
            repo = repo_cache().get(req["repo"], req.get("key_file"))  # kept open between backups
            from baton.freeze import with_consistency  # --freeze/--pre/--post around the freeze point

            tracker = self.tracker
            res: dict[str, Any] = with_consistency(req.get("consistency"), lambda around: run_backup(
                tracker, repo, node=self.node, name=self.name, full=bool(req.get("full")), progress=progress,
                around_freeze=around))
            self.last_backup = {"snapshot": res["snapshot"], "mode": res["mode"], "end": time.time(),
                                "result": "ok"}
            return res
        except BaseException as e:
            self.last_backup = {"result": "failed", "error": str(e), "end": time.time()}
            raise
        finally:
            self.backup_lock.release()

    # -- shutdown --------------------------------------------------------------------------------------

    def detach(self) -> None:
        """Stop serving (refused with DeviceBusy while the device is mounted/open), flush, mark clean."""
        assert self.loc is not None and self.tracker is not None
        if self.backup_lock.locked():
            raise DeviceBusy(f"a backup of {self.name} is running; detach after it ends")
        self.detaching = True
        try:
            if self.frontend is not None:
                self.frontend.stop()
        except BaseException:
            self.detaching = False
            raise
        self.tracker.flush()
        self.tracker.close()
        self.loc.record.detach()
        self.loc.close()
        for p in (control_path(self.name), state_path(self.name)):
            with contextlib.suppress(OSError):
                p.unlink()

    def run_until_stopped(self) -> BatonError | None:
        """Serve until detached, fenced, or the frontend stops by itself; the error the daemon ends with
        (None after a detach). Leaves the record as it is unless detached: a fenced daemon never writes it."""
        assert self.frontend is not None
        while not self.stop_event.is_set():
            if self.frontend.wait(timeout=0.5) and not self.detaching:
                break  # stopped by itself (a detach stops it too, then sets stop_event)
        if not self.stop_event.is_set():
            failure = self.frontend.failure
            log.error("frontend stopped: %s", failure if failure is not None else "without saying why")
            if failure is not None:
                self.end(failure.error())
            else:
                self.end(BatonError(f"the {self.kind} frontend of {self.name} stopped without a failure"))
            self.stop_event.set()
        if self.control is not None:
            self.control.stop()
        broken = self.loc.record.broken() if self.loc is not None else None
        if isinstance(broken, Fenced):  # whatever the frontend said: the record knows it was fenced
            if not isinstance(self.ended_with, Fenced):
                self.ended_with = broken
            self.record_fence(broken)
        if self.ended_with is None and self.detaching:
            remove_run_dir(self.name)  # detached cleanly: the record is clean, nothing is left to inspect
        if self.ended_with is not None:
            log.error("stopping: %s", self.ended_with)
            with contextlib.suppress(Exception):
                self.frontend.stop(force=True)
        return self.ended_with


@contextlib.contextmanager
def _ready_pipe(fd: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """``say(msg)``: write the one line `baton attach` waits for (the state, or the error), then close."""
    sent = [False]

    def say(msg: dict[str, Any]) -> None:
        if fd >= 0 and not sent[0]:
            sent[0] = True
            with contextlib.suppress(OSError):
                os.write(fd, (json.dumps(msg) + "\n").encode())
                os.close(fd)

    yield say


def serve(disk: str, *, node: str, name: str, frontend: str, record: str | None, tracking: bool,
          tcp: str | None, ready_fd: int, cow_size: str | None = None) -> None:
    """Daemon main: take over, serve, answer the control socket, until detached, fenced or killed.

    Returns after a detach; raises the error it ended with otherwise (``Fenced`` when fenced; the error that
    stopped the attach; a BatonError naming the frontend's failure), for ``baton serve`` to map to its exit
    status. ``ready_fd`` (-1: none) receives one JSON line: ``{"ok": true, "result": STATE}`` or the error.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s baton[{name}] %(levelname)s %(message)s")
    d: Daemon | None = None
    with _ready_pipe(ready_fd) as say:
        try:
            d = Daemon(disk, node=node, name=name, frontend=frontend, record=record, tracking=tracking, tcp=tcp,
                       cow_size=cow_size)
            st = d.start()
            d.watch_fence()
        except BaseException as e:
            log.error("attach failed: %s", e)
            say(error_reply(e))
            with contextlib.suppress(Exception):
                if d is not None and d.control is not None:
                    d.control.stop()
                if d is not None and d.frontend is not None:
                    d.frontend.stop(force=True)
            # `baton attach` prints the error just sent, which is all this daemon's log holds, so its
            # directory goes (unless the frontend left something to clean up, or another daemon owns it).
            remove_run_dir(name)
            raise
        log.info("attached %s as %s (node %s, epoch %s, %s %s; %s)", disk, name, node, st["epoch"], st["frontend"],
                 st["device"] or st["socket"] or st["tcp"], st["frontend_reason"])
        say({"ok": True, "result": st})

    def preload() -> None:
        # Import the backup engine and start its threads now, off the I/O path: the first backup after a
        # takeover (a new daemon) would otherwise spend ~0.15 s importing the repository stack (zstd, BLAKE3,
        # cryptography) and tens of ms starting ~40 threads, one by one, against its own busy encoders.
        with contextlib.suppress(Exception):
            import baton.backup  # brings baton.repo
            import baton.repo.indexcache  # the first backup's index load; the CLI imports it lazily

            baton.backup.start_pools()

    threading.Thread(target=preload, name="preload", daemon=True).start()

    daemon = d

    def on_term(signum: int, frame: Any) -> None:
        def go() -> None:
            try:
                daemon.detach()
                daemon.stop_event.set()
            except BaseException as e:
                log.error("SIGTERM: cannot detach: %s", e)

        threading.Thread(target=go, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    err = daemon.run_until_stopped()
    if err is not None:
        raise err
