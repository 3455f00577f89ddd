"""Watch mode: notice when ownership of a shared disk arrives on this node, and attach it.

One :class:`Watcher` per ``--watch DISK``. Its decision step (:meth:`Watcher.step`) is edge-triggered:

* While this node has the disk attached (a live per-disk daemon), it does nothing: that daemon is the writer.
* Otherwise it probes (:func:`baton.cluster.watch.probe`) every ``probe_interval`` seconds, and at once after
  a mount or udev event that concerns the disk.
* **Arrival** is a successful probe while *armed*. A watcher is armed when the agent starts, after any probe
  that failed (refused, absent, no record), and by a mount/udev event for the disk. It is disarmed when it
  attaches, and when an attachment of the disk on this node ends (detached by the operator or the cluster,
  fenced by a newer owner, killed). So a disk that was detached or taken away is not grabbed back merely
  because the probe still succeeds (it always does on storage without exclusivity): ownership has to *arrive
  again*, seen as a probe that failed and then succeeded, or as a device event.
* On arrival it calls :func:`baton.daemon.attach` (takeover: epoch+1, which fences any previous owner
  still running). A failed attach is logged and retried on later successful probes, backing off up to 60 s.

:class:`EventSource` turns /proc/self/mountinfo changes (poll POLLPRI) and ``udevadm monitor`` block events
(when udevadm exists) into :meth:`Watcher.kick` calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from baton import daemon
from baton.cluster import watch as w
from baton.errors import DeviceBusy
from baton.host.attachments import attachments

log = logging.getLogger("baton.agent")

MIN_EVENT_SPACING = 1.0  # event-triggered probes at most this often (a storm of events costs one probe/s)
OWN_WRITE_ECHO = 2.0  # udev "change" within this long after our own probe closed the device is its echo
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class WatchSpec:
    """One ``--watch DISK`` with its options."""

    disk: str
    node: str
    name: str = ""  # '' -> the disk's default name
    frontend: str = "fuse"
    record: str | None = None
    probe_interval: float = 5.0

    @property
    def attach_name(self) -> str:
        return self.name or daemon.default_name(self.disk)


class Watcher:
    """The ownership monitor of one disk. Functions are injectable so the decisions can be tested without
    devices. Thread-safe: ``kick`` may be called from any thread; ``step``/``run`` from one."""

    def __init__(self, spec: WatchSpec, *,
                 attach_fn: Callable[..., dict[str, Any]] = daemon.attach,
                 attachments_fn: Callable[[], list[dict[str, Any]]] = attachments,
                 find_fn: Callable[[str, str | None],
                                   tuple[w.ProbeTarget | None, w.ProbeResult | None]] = w.safe_find_target,
                 probe_fn: Callable[[w.ProbeTarget], w.ProbeResult] = w.probe,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.name = spec.attach_name
        self.real = os.path.realpath(spec.disk)
        self._attach, self._attachments, self._find, self._probe = attach_fn, attachments_fn, find_fn, probe_fn
        self.clock = clock
        self.target: w.ProbeTarget | None = None
        self.numbers = w.device_numbers(self.real)
        self.armed = True  # the agent's start counts as "ownership may arrive"
        self.attached = False
        self.last: w.ProbeResult | None = None
        self.last_probe_at = -1e9
        self.next_attach_at = 0.0
        self.failures_in_row = 0
        self.disk_uuid = ""
        self.child_pids: set[int] = set()  # daemons this watcher started: children of this process, to reap
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._events: list[str] = []
        self.stats = {"probes": 0, "probes_ok": 0, "events": 0, "events_ignored": 0, "arrivals": 0, "attaches": 0,
                      "attach_failures": 0, "attachments_ended": 0, "device_gone": 0}

    def _fields(self, **extra: Any) -> dict[str, Any]:
        return {"fields": {"name": self.name, "disk": self.spec.disk} | extra}

    # -- events ---------------------------------------------------------------------------------------------

    def kick(self, source: str, detail: str = "") -> None:
        """A mount/udev event for this disk: probe soon, and let a successful probe count as an arrival.
        A udev "change" right after our own probe closed the device (udev's write watch) is ignored."""
        now = self.clock()
        with self._lock:
            if source == "udev" and detail == "change" and now - self.last_probe_at < OWN_WRITE_ECHO:
                self.stats["events_ignored"] += 1
                return
            self.stats["events"] += 1
            self._events.append(f"{source}:{detail}" if detail else source)
        if source == "udev" and detail == "remove" and self.attached:
            # Not probing while attached, so the probe will not report it: say it here.
            self.stats["device_gone"] += 1
            log.warning("watch.device_gone", extra=self._fields(source="udev", attached_here=True))
        self._wake.set()

    # -- one decision ---------------------------------------------------------------------------------------

    def _attached_here(self) -> dict[str, Any] | None:
        for st in self._attachments():
            if st.get("alive") and (st.get("name") == self.name or st.get("disk") == self.real):
                return st
        return None

    def step(self) -> str:
        """Observe, probe if needed, attach on arrival. Returns what it did (for tests and logs):
        'attached-here', 'probed', 'arrival-attached', 'arrival-failed', 'waiting-backoff'."""
        with self._lock:
            events, self._events = self._events, []
        here = self._attached_here()
        if here is not None:
            if not self.attached:
                self.attached, self.armed = True, False
                log.info("watch.attachment_seen", extra=self._fields(pid=here.get("pid"), node=here.get("node"),
                                                                      epoch=here.get("epoch")))
            return "attached-here"
        if self.attached:
            # Our attachment ended: detached, fenced or killed. Ownership must arrive again before we attach.
            self.attached, self.armed = False, False
            self.stats["attachments_ended"] += 1
            log.warning("watch.attachment_ended", extra=self._fields(
                hint="re-attached only after ownership arrives again (a failed then successful probe, or an event)"))
        if events:
            self.armed = True
            self.target = None  # the device may have changed: locate the record again
            log.info("watch.event", extra=self._fields(events=",".join(events)))
        res = self._probe_once()
        if res.outcome != w.OWNER:
            self.armed = True
            return "probed"
        if not self.armed:
            return "probed"
        now = self.clock()
        if now < self.next_attach_at:
            return "waiting-backoff"
        self.stats["arrivals"] += 1
        log.info("watch.arrival", extra=self._fields(node=self.spec.node, via="event" if events else "probe"))
        try:
            res_att = self._attach(self.spec.disk, node=self.spec.node, name=self.name, frontend=self.spec.frontend,
                                   record=self.spec.record)
        except DeviceBusy as e:
            # Attached here meanwhile (by the operator or the resource agent): nothing to do.
            self.armed = False
            log.info("watch.already_attached", extra=self._fields(detail=str(e)))
            return "attached-here"
        except Exception as e:  # BatonError mostly; anything else is logged the same way, with backoff
            self.stats["attach_failures"] += 1
            self.failures_in_row += 1
            delay = min(MAX_BACKOFF, self.spec.probe_interval * 2 ** self.failures_in_row)
            self.next_attach_at = now + delay
            log.error("watch.attach_failed", extra=self._fields(error=type(e).__name__, message=str(e),
                                                                retry_in_s=round(delay, 1)))
            return "arrival-failed"
        self.stats["attaches"] += 1
        if res_att.get("pid"):
            self.child_pids.add(int(res_att["pid"]))
        self.failures_in_row = 0
        self.attached, self.armed = True, False
        log.info("watch.attached", extra=self._fields(node=self.spec.node, epoch=res_att.get("epoch"),
                                                      device=res_att.get("device") or res_att.get("socket"),
                                                      pid=res_att.get("pid")))
        return "arrival-attached"

    def _probe_once(self) -> w.ProbeResult:
        res: w.ProbeResult | None = None
        if self.target is None:
            self.target, res = self._find(self.spec.disk, self.spec.record)
            if self.target is not None:
                self.disk_uuid = self.target.disk_uuid
        if res is None and self.target is not None:
            res = self._probe(self.target)
            self.stats["probes"] += 1
            if res.outcome in (w.UNKNOWN, w.ABSENT):
                self.target = None  # locate the record again when the device is back (it may be another one)
        assert res is not None
        self.last_probe_at = self.clock()
        if res.outcome == w.OWNER:
            self.stats["probes_ok"] += 1
        else:
            # Remember device numbers while the device is there, so a later remove event still matches.
            self.numbers = w.device_numbers(self.real) or self.numbers
        prev = self.last.outcome if self.last else None
        if prev != res.outcome:
            f = self._fields(outcome=res.outcome, previous=prev or "-", errno=res.errno, detail=res.detail)
            if res.outcome == w.ABSENT:
                self.stats["device_gone"] += 1
                log.warning("watch.device_gone", extra=f)
            elif prev == w.ABSENT:
                log.info("watch.device_back", extra=f)
            else:
                log.info("watch.probe_changed", extra=f)
        self.last = res
        self.numbers = self.numbers or w.device_numbers(self.real)
        return res

    # -- loop -----------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set; never raises (an unexpected error is logged and the loop goes on)."""
        while not stop.is_set():
            # Cleared before the step, so an event that arrives during it wakes the next wait at once.
            self._wake.clear()
            try:
                self.step()
            except Exception:
                log.exception("watch.step_failed", extra=self._fields())
            self._wake.wait(self.spec.probe_interval)
            # Event storms: keep probes at least MIN_EVENT_SPACING apart.
            gap = self.last_probe_at + MIN_EVENT_SPACING - self.clock()
            if gap > 0:
                stop.wait(gap)

    def wake(self) -> None:
        self._wake.set()

    def status(self) -> dict[str, Any]:
        last = self.last
        return {"disk": self.spec.disk, "name": self.name, "node": self.spec.node, "frontend": self.spec.frontend,
                "record": self.spec.record, "probe_interval_s": self.spec.probe_interval, "disk_uuid": self.disk_uuid,
                "attached_here": self.attached, "armed": self.armed,
                "probe": {"outcome": last.outcome, "errno": last.errno, "detail": last.detail} if last else None,
                "probe_target": ({"device": self.target.path, "offset": self.target.offset,
                                  "placement": self.target.placement} if self.target else None),
                "statistics": self.statistics()}

    def statistics(self) -> dict[str, int]:
        return dict(self.stats)


class EventSource:
    """Mount and udev events, dispatched to the watchers they concern. ``udevadm monitor`` runs as a child
    (ended by PID in :meth:`stop`); without udevadm only mount events are watched."""

    def __init__(self, watchers: list[Watcher], *, mountinfo: str = "/proc/self/mountinfo") -> None:
        self.watchers = watchers
        self.mountinfo_path = mountinfo
        self.proc: subprocess.Popen[bytes] | None = None
        self._r, self._w = os.pipe()
        self._thread: threading.Thread | None = None
        self._mounts: dict[int, frozenset[str]] = {}
        self.stats = {"mount_changes": 0, "mount_events": 0, "udev_events": 0, "udev_matched": 0}
        self.udev = False

    def start(self) -> None:
        udevadm = shutil.which("udevadm")
        if udevadm:
            with contextlib.suppress(OSError):
                self.proc = subprocess.Popen([udevadm, "monitor", "--kernel", "--udev", "--subsystem-match=block",
                                              "--property"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             stdin=subprocess.DEVNULL)
                self.udev = True
        self._thread = threading.Thread(target=self._loop, name="events", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            self._watch()
        except Exception:
            # Probes go on without events; say so once instead of dying silently.
            log.exception("watch.events_failed", extra={"fields": {"hint": "only the periodic probe is running"}})

    def _watch(self) -> None:
        mi = open(self.mountinfo_path, "rb")  # noqa: SIM115 - lives as long as the loop
        try:
            text = mi.read().decode(errors="replace")
            for i, wt in enumerate(self.watchers):
                self._mounts[i] = w.relevant_mounts(wt.real, text)
            poll = select.poll()
            poll.register(mi.fileno(), select.POLLPRI | select.POLLERR)
            poll.register(self._r, select.POLLIN)
            out: IO[bytes] | None = self.proc.stdout if self.proc else None
            if out is not None:
                poll.register(out.fileno(), select.POLLIN)
            pending = b""
            while True:
                for fd, _ev in poll.poll():
                    if fd == self._r:
                        return
                    if fd == mi.fileno():
                        mi.seek(0)
                        self._on_mounts(mi.read().decode(errors="replace"))
                    elif out is not None and fd == out.fileno():
                        chunk = os.read(fd, 65536)
                        if not chunk:
                            poll.unregister(fd)
                            out = None
                            continue
                        pending += chunk
                        while b"\n\n" in pending:
                            block, pending = pending.split(b"\n\n", 1)
                            self._on_udev(block.decode(errors="replace"))
        finally:
            mi.close()

    def _on_mounts(self, text: str) -> None:
        self.stats["mount_changes"] += 1
        for i, wt in enumerate(self.watchers):
            now = w.relevant_mounts(wt.real, text)
            if now != self._mounts.get(i):
                self._mounts[i] = now
                self.stats["mount_events"] += 1
                wt.kick("mount")

    def _on_udev(self, block: str) -> None:
        ev = w.parse_udev_event(block)
        if not ev:
            return
        self.stats["udev_events"] += 1
        for wt in self.watchers:
            if w.udev_event_concerns(ev, wt.spec.disk, wt.numbers):
                self.stats["udev_matched"] += 1
                wt.kick("udev", ev.get("ACTION", ""))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def statistics(self) -> dict[str, int]:
        return dict(self.stats) | {"udev_monitor": int(self.udev)}
