"""``baton agent``: the per-node daemon. It supervises the per-disk daemons; it is not one of them.

Each attached disk has its own ``baton serve`` process (started by ``baton attach``, by the resource agent, or
by this agent's watch mode), the single writer of that disk's record on this node. The agent adds, per node:

* a control socket, RUN_DIR/agent.sock ({"op": "status"}: every attachment here plus the agent's own state);
* an opt-in Prometheus endpoint (``--metrics``), loopback-only unless explicitly allowed;
* structured logs of what happens to the attachments (appear, end, fail) and to watched disks;
* optional watch mode (:mod:`baton.agent.watcher`): attach a disk when its ownership arrives on this node.

Stopping the agent (SIGTERM) detaches nothing: the disks stay served by their daemons, because taking a disk
away is the cluster's decision (``baton detach``, the resource agent's stop), not a side effect of restarting
a monitor. One agent per RUN_DIR (an flock on RUN_DIR/agent.lock).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from baton import __version__, daemon, frontends
from baton.agent.control import socket_path
from baton.agent.metrics import DiskSample, StatusCollector, registry_for
from baton.agent.watcher import EventSource, Watcher, WatchSpec
from baton.daemon.protocol import ControlServer, Progress
from baton.daemon.runtime import run_dir
from baton.errors import EXIT_CODES, BatonError, Fenced, UsageError
from baton.host.attachments import attachments

log = logging.getLogger("baton.agent")
DEFAULT_METRICS_PORT = 9470
STATUS_TIMEOUT = 5.0  # per daemon, per scrape or status request
HOUSEKEEPING_INTERVAL = 2.0


def parse_metrics_addr(text: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port); host defaults to 127.0.0.1.
    Raises UsageError for a bad address, or a non-loopback one without ``allow_remote``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"--metrics {text!r}: expected [ADDRESS]:PORT")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif text.isdigit():
        host, port = "", text
    else:
        raise UsageError(f"--metrics {text!r}: expected HOST:PORT (e.g. 127.0.0.1:{DEFAULT_METRICS_PORT})")
    host = host or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--metrics {text!r}: bad port {port!r}")
    if not allow_remote and not _is_loopback(host):
        raise UsageError(f"--metrics {text!r}: {host} is not a loopback address",
                         hint="metrics are served unauthenticated; pass --metrics-allow-remote to bind elsewhere")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def group_watches(items: Iterable[tuple[str, Any]], *, default_node: str = "") -> list[WatchSpec]:
    """Build WatchSpecs from the watch options in command-line order: each ``watch`` starts a group and the
    options after it (node, name, frontend, record, probe_interval) belong to it. A ``node`` before the first
    ``watch`` is the default for every group. Raises UsageError for an option outside a group, one given twice
    in a group, or a group without a node."""
    groups: list[dict[str, Any]] = []
    default = default_node
    for key, value in items:
        if key == "watch":
            groups.append({"disk": value})
            continue
        if not groups:
            if key == "node":
                default = value
                continue
            raise UsageError(f"--{key.replace('_', '-')} must follow the --watch DISK it applies to")
        g = groups[-1]
        if key in g:
            raise UsageError(f"--{key.replace('_', '-')} given twice for --watch {g['disk']}")
        g[key] = value
    specs = []
    names: set[str] = set()
    for g in groups:
        node = g.get("node") or default
        if not node:
            raise UsageError(f"--watch {g['disk']} needs --node NODE (this machine's cluster node name)")
        interval = float(g.get("probe_interval", 5.0))
        if not 0.1 <= interval <= 3600:
            raise UsageError(f"--probe-interval {interval}: expected 0.1 to 3600 seconds")
        spec = WatchSpec(disk=g["disk"], node=node, name=g.get("name") or "", frontend=g.get("frontend") or "fuse",
                         record=g.get("record"), probe_interval=interval)
        if spec.frontend not in frontends.choices():
            frontends.get(spec.frontend)  # UsageError naming the kinds
        if spec.attach_name in names:
            raise UsageError(f"two --watch options would both attach as {spec.attach_name}; give --name")
        names.add(spec.attach_name)
        specs.append(spec)
    return specs


class Agent:
    """The node agent. ``run()`` blocks until :meth:`stop` (signal handlers call it) and returns 0."""

    def __init__(self, *, watches: list[WatchSpec] | None = None, metrics: tuple[str, int] | None = None) -> None:
        self.specs = list(watches or [])
        self.metrics_addr = metrics
        self.watchers = [Watcher(s) for s in self.specs]
        self.events: EventSource | None = None
        self.control = ControlServer(socket_path(), self._on_request, name="agent-control")
        self.collector = StatusCollector(self.gather)
        self.http: Any = None
        self.metrics_bound: tuple[str, int] | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_fd = -1
        self._seen: dict[str, str] = {}  # attachment name -> last state logged
        self.status_errors = 0  # daemons that did not answer a status request during a scrape

    # -- lifecycle ----------------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        d = run_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise BatonError(f"another baton agent is running for {d} (pid {other or '?'})",
                             hint="stop it first, or use another BATON_RUN_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def start(self) -> None:
        """Take the agent lock, open the control socket and the metrics endpoint, start the watchers.
        Raises BatonError (another agent), UsageError/OSError-derived BatonError (metrics bind) before any
        watcher runs; what was started is stopped again."""
        self._take_lock()
        try:
            self.control.start()
            if self.metrics_addr is not None:
                self._start_metrics(*self.metrics_addr)
            log.info("agent.start", extra={"fields": {
                "pid": os.getpid(), "version": __version__, "run_dir": str(run_dir()),
                "control": str(self.control.path),
                "metrics": f"{self.metrics_bound[0]}:{self.metrics_bound[1]}" if self.metrics_bound else "off",
                "watches": len(self.watchers)}})
            if self.watchers:
                for wt in self.watchers:
                    log.info("watch.start", extra={"fields": {
                        "disk": wt.spec.disk, "name": wt.name, "node": wt.spec.node, "frontend": wt.spec.frontend,
                        "probe_interval_s": wt.spec.probe_interval}})
                self.events = EventSource(self.watchers)
                self.events.start()
                for wt in self.watchers:
                    t = threading.Thread(target=wt.run, args=(self._stop,), name=f"watch-{wt.name}", daemon=True)
                    t.start()
                    self._threads.append(t)
        except BaseException:
            self.shutdown()
            raise

    def _start_metrics(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(port, addr=host, registry=registry_for(self.collector))
        except OSError as e:
            raise BatonError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}",
                             hint="is the port in use? pick another with --metrics HOST:PORT") from None
        self.http = server
        addr = server.server_address
        self.metrics_bound = (str(addr[0]), int(addr[1]))

    def run(self) -> int:
        self.start()
        try:
            while not self._stop.is_set():
                try:
                    self._housekeeping()
                except Exception:
                    log.exception("agent.housekeeping_failed")
                self._stop.wait(HOUSEKEEPING_INTERVAL)
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        """Ask ``run`` to return (safe from a signal handler)."""
        self._stop.set()
        for wt in self.watchers:
            wt.wake()

    def shutdown(self) -> None:
        """Stop everything this agent started (threads, udevadm, sockets). Detaches nothing."""
        self._stop.set()
        for wt in self.watchers:
            wt.wake()
        for t in self._threads:
            # A watcher in the middle of an attach finishes it (bounded by attach's own ready timeout).
            t.join(timeout=daemon.READY_TIMEOUT + 5)
        if self.events is not None:
            self.events.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        self.control.stop()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
            log.info("agent.stop", extra={"fields": {"pid": os.getpid(), "attachments_left_running": sum(
                1 for a in attachments() if a.get("alive"))}})

    # -- what it reports ----------------------------------------------------------------------------------

    def _reap(self) -> None:
        # Daemons started by watch mode are our children: reap the ones that exited, so they do not linger as
        # zombies (attach waits for a dead daemon's process to vanish before cleaning up after it). Only our
        # own daemons' PIDs: a waitpid(-1) would steal the exit status of other subprocesses.
        for wt in self.watchers:
            for pid in list(wt.child_pids):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    wt.child_pids.discard(pid)
                    continue
                if done:
                    wt.child_pids.discard(pid)
                    code = os.waitstatus_to_exitcode(status)
                    (log.info if code == 0 else log.warning)("attachment.daemon_exited", extra={"fields": {
                        "name": wt.name, "pid": pid, "exit_status": code,
                        "meaning": {0: "detached", EXIT_CODES[Fenced]: "fenced by a newer owner"}.get(
                            code, "failed or killed")}})

    def _housekeeping(self) -> None:
        """Log attachments appearing, ending and failing on this node (whoever attached them)."""
        self._reap()
        now: dict[str, str] = {}
        for a in attachments():
            name = str(a.get("name"))
            now[name] = "running" if a.get("alive") else "failed"
            if self._seen.get(name) != now[name]:
                f = {"name": name, "disk": a.get("disk"), "node": a.get("node"), "pid": a.get("pid"),
                     "epoch": a.get("epoch"), "frontend": a.get("frontend")}
                if now[name] == "running":
                    log.info("attachment.up", extra={"fields": f})
                else:
                    log.error("attachment.failed", extra={"fields": f | {
                        "problem": "the daemon is dead; `baton attach` or `baton detach` cleans up"}})
        for name in set(self._seen) - set(now):
            log.info("attachment.gone", extra={"fields": {"name": name}})
        self._seen = now

    def _uuid_of(self, name: str) -> str:
        for wt in self.watchers:
            if wt.name == name:
                return wt.disk_uuid
        return ""

    def gather(self) -> list[DiskSample]:
        """One sample per attachment on this node (live status when its daemon answers) and per watched disk
        not attached here."""
        out: list[DiskSample] = []
        seen = set()
        for a in attachments():
            name = str(a.get("name"))
            seen.add(name)
            st: dict[str, Any] | None = None
            failure: str | None = None  # baton_daemon_failed's label
            if a.get("alive"):
                try:
                    st = daemon.request(name, {"op": "status"}, timeout=STATUS_TIMEOUT)
                except BatonError as e:
                    self.status_errors += 1
                    failure = "unreachable"
                    log.warning("metrics.status_failed", extra={"fields": {"name": name, "error": str(e)}})
            else:
                gone = daemon.daemon_gone(name, a)  # died or fenced
                failure = str(gone["failure"]) if gone else None
            out.append(DiskSample(name, str((st or {}).get("disk_uuid") or self._uuid_of(name)), st, failure))
        for wt in self.watchers:
            if wt.name not in seen:
                out.append(DiskSample(wt.name, wt.disk_uuid, None))
        return out

    def _attachment_status(self) -> list[dict[str, Any]]:
        out = []
        for a in attachments():
            name = str(a.get("name"))
            try:
                out.append(daemon.name_status(name))
            except BatonError as e:
                out.append({"name": name, "state": "unreachable", "pid": a.get("pid"), "problem": str(e)})
        return out

    def status(self) -> dict[str, Any]:
        return {
            "agent": {"pid": os.getpid(), "version": __version__, "started": self.started,
                      "uptime_s": round(time.time() - self.started, 1), "run_dir": str(run_dir()),
                      "control": str(self.control.path),
                      "metrics": (f"{self.metrics_bound[0]}:{self.metrics_bound[1]}" if self.metrics_bound
                                  else None),
                      "watches": [wt.status() for wt in self.watchers],
                      "statistics": self.statistics()},
            "attachments": self._attachment_status(),
        }

    def _on_request(self, req: dict[str, Any], progress: Progress) -> Any:
        op = req.get("op")
        if op == "status":
            return self.status()
        raise UsageError(f"unknown op {op!r} (the agent answers only 'status')")

    def statistics(self) -> dict[str, Any]:
        return {"control": self.control.statistics(),
                "metrics": self.collector.statistics() | {"status_errors": self.status_errors},
                "events": self.events.statistics() if self.events else None,
                "watches": {wt.name: wt.statistics() for wt in self.watchers}}
