"""Attach, detach and status: the per-disk daemon (``baton serve``) and the CLI side that drives it.

One daemon per attached disk is the single writer of that disk's record on this node. It takes the disk over
(the record's takeover: epoch+1), serves it through a frontend (FUSE file + loop device -> /dev/baton/NAME, or
an NBD unix socket), and answers a control socket at RUN_DIR/NAME/control.sock with newline-delimited JSON:

    {"op": "status"}                      -> {"ok": true, "result": {...}}
    {"op": "detach"}                      -> {"ok": true} then the daemon exits (refused while the device is busy)
    {"op": "backup", "repo": URL, ...}    -> {"progress": [done, total]}* then {"ok": true, "result": {...}}

Errors come back as {"ok": false, "error": "<errors class>", "message": ..., "hint": ...} and are re-raised on
the CLI side as the same class, so exit codes stay right. State: RUN_DIR/NAME/daemon.json (pid, node, disk...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from baton import errors
from baton.device import DirectDev, SubDev
from baton.errors import BatonError, DaemonError, DeviceBusy, DeviceError, Fenced, NotAttached, UsageError
from baton.format.record import PLACEMENT_TAIL
from baton.host import OPEN, check_not_in_use
from baton.host.attachments import attachments as attachments  # the one state-file reader, re-exported
from baton.host.attachments import dev_dir as dev_dir
from baton.host.attachments import read_state as read_state
from baton.host.attachments import run_dir as run_dir
from baton.host.attachments import state_path as state_path
from baton.record.placement import Located, describe, locate
from baton.tracker.core import Tracker, spill_dir_default
from baton.util import pid_alive

log = logging.getLogger("baton.daemon")
READY_TIMEOUT = 60.0


def control_path(name: str) -> Path:
    return run_dir() / name / "control.sock"


def default_name(disk: str) -> str:
    base = os.path.basename(os.path.realpath(disk))
    for suffix in (".img", ".raw"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base) or "disk"


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or len(name) > 64:
        raise UsageError(f"invalid NAME {name!r}: use letters, digits, '-', '_' and '.' (at most 64)")


_pid_alive = pid_alive


# ------------------------------------------------------------------------------------------------ control client


def request(name: str, op: dict[str, Any], *, timeout: float | None = 30.0,
            on_progress: Callable[[int, int], None] | None = None) -> Any:
    """Send one request to NAME's daemon and return its result; errors re-raised as their Baton class."""
    path = control_path(name)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as e:
        s.close()
        raise DaemonError(f"cannot reach the daemon of {name} at {path}: {e.strerror or e}",
                          hint=f"is {name} attached on this node? see `baton status {name}`") from None
    try:
        s.sendall((json.dumps(op) + "\n").encode())
        f = s.makefile("r")
        for line in f:
            msg = json.loads(line)
            if "progress" in msg:
                if on_progress:
                    on_progress(*msg["progress"])
                continue
            if msg.get("ok"):
                return msg.get("result")
            cls = getattr(errors, msg.get("error", ""), None)
            if not (isinstance(cls, type) and issubclass(cls, BatonError)):
                cls = DaemonError
            raise cls(msg.get("message", "daemon error"), hint=msg.get("hint", ""))
        raise DaemonError(f"the daemon of {name} closed the connection without an answer (did it die?)")
    except TimeoutError:
        raise DaemonError(f"the daemon of {name} did not answer within {timeout} s") from None
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ CLI side


_RUN_FILES = ("daemon.json", "daemon.tmp", "control.sock", "daemon.log")


def log_tail(name: str, lines: int = 10) -> list[str]:
    """The last ``lines`` lines of RUN_DIR/NAME/daemon.log ([] when there is none)."""
    try:
        with open(run_dir() / name / "daemon.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def _remove_run_dir(name: str) -> list[str]:
    """Remove RUN_DIR/NAME once nothing serves NAME any more (after a detach, a clean-up, a failed attach).

    Conservative, never recursive: it unlinks only the daemon's own files (daemon.json, control.sock,
    daemon.log) and rmdirs the empty FUSE mount point, and leaves everything in place while the frontend's
    state.json still names something to clean up (a loop device, a mount), while a live daemon's state file
    names another pid, or while another process holds the frontend's lock. The lock file is unlinked only while
    this process holds its flock, so no one can hold it at that moment. Returns what it removed.
    """
    import fcntl

    d = run_dir() / name
    if not d.is_dir() or (d / "state.json").exists():
        return []
    st = read_state(name)
    pid = int((st or {}).get("pid", 0))
    if pid and pid != os.getpid() and _pid_alive(pid):
        return []
    lock, fd = d / "lock", -1
    try:
        if lock.exists():
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
        for n in _RUN_FILES:
            (d / n).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (d / "fuse").rmdir()  # EBUSY while something is still mounted there: then d stays, and says why
        if fd >= 0:
            lock.unlink(missing_ok=True)
        d.rmdir()
    except OSError as e:
        log.warning("%s: cannot remove %s: %s", name, d, e.strerror or e)
        return []
    finally:
        if fd >= 0:
            os.close(fd)
    return [f"removed {d}"]


def _cleanup_stale(name: str, st: dict[str, Any]) -> list[str]:
    """Remove what NAME's dead daemon left behind (FUSE mount, loop device, link, socket, RUN_DIR/NAME).

    The last lines of the dead daemon's log are kept in the returned list ("log: ..."), since its directory
    goes; raises DeviceBusy (keeping everything) while a file system on its device is still mounted.
    """
    done: list[str] = []
    # A killed daemon can linger for a moment as a dying/zombie process; give init time to reap it.
    pid = int(st.get("pid", 0))
    deadline = time.monotonic() + 10
    while pid and Path(f"/proc/{pid}").exists() and not _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if st.get("frontend") == "fuse":
        from baton.frontends.fuse import cleanup_stale

        done += cleanup_stale(name, run_dir(), dev_dir())
    tail = log_tail(name)
    for p in (control_path(name), state_path(name), Path(str(st.get("socket") or ""))):
        if str(p) and p.exists() and not p.is_dir():
            with contextlib.suppress(OSError):
                p.unlink()
                done.append(f"removed {p}")
    removed = _remove_run_dir(name)
    done += removed
    if removed:
        done += [f"log: {ln}" for ln in tail]
    return done


def attach(disk: str, *, node: str, name: str | None = None, frontend: str = "fuse", record: str | None = None,
           tracking: bool = True, nbd_tcp: str | None = None, foreground: bool = False) -> dict[str, Any]:
    """Take ``disk`` over on this node and serve it; returns once the device (or socket) is ready."""
    if not node:
        raise UsageError("--node is required (the cluster node name of this machine)")
    if frontend not in ("fuse", "nbd"):
        raise UsageError(f"--frontend {frontend!r}: expected fuse or nbd")
    if not os.path.exists(disk):
        raise DeviceError(f"{disk}: no such file or device")
    name = name or default_name(disk)
    _check_name(name)
    for st in attachments():
        if st["alive"] and st["name"] == name:
            raise DeviceBusy(f"{name} is already attached here: {st.get('disk')} (pid {st['pid']}, node "
                             f"{st.get('node')})", hint=f"detach it first: baton detach {name}, or pick another "
                             "--name")
    # The same disk by any path (a hard link, another device node, a loop device over it), mounted, held or
    # open: refused. A Baton daemon outside this node's RUN_DIR (another "node" simulated on this host) may
    # hold it: this attach is a takeover, and its epoch fences that daemon.
    check_not_in_use(disk, "attach", allow=lambda u: u.kind == OPEN and u.baton_daemon)
    stale = read_state(name)
    cleaned = _cleanup_stale(name, stale) if stale is not None else []
    args = [sys.executable, "-m", "baton", "serve", disk, "--node", node, "--name", name, "--frontend", frontend]
    if record:
        args += ["--record", record]
    if not tracking:
        args += ["--no-tracking"]
    if nbd_tcp:
        args += ["--tcp", nbd_tcp]
    if foreground:
        os.execv(sys.executable, [*args, "--ready-fd", "-1"])
    (run_dir() / name).mkdir(parents=True, exist_ok=True)
    logf = open(run_dir() / name / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([*args, "--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True, close_fds=True)
    finally:
        os.close(w)
        logf.close()
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    with os.fdopen(r, "rb") as rf:
        import select

        while time.monotonic() < deadline:
            ready, _, _ = select.select([rf], [], [], 0.5)
            if ready:
                chunk = rf.read1(65536)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    break
            elif proc.poll() is not None:
                break
    line = buf.split(b"\n", 1)[0]
    if not line:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        raise DaemonError(f"the daemon for {name} did not become ready (exit status {proc.poll()}); see "
                          f"{run_dir() / name / 'daemon.log'}")
    msg = json.loads(line)
    if not msg.get("ok"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        cls = getattr(errors, msg.get("error", ""), DaemonError)
        raise cls(msg.get("message", "attach failed"), hint=msg.get("hint", ""))
    res: dict[str, Any] = msg["result"]
    res["cleaned_up"] = cleaned
    return res


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def detach(name: str) -> dict[str, Any]:
    """Detach NAME (see `baton detach`); a dead or fenced daemon's leftovers are cleaned up instead, and the
    result then has ``was_running: False``, ``cleaned_up`` and ``log_tail`` (how the daemon's log ended)."""
    st = read_state(name)
    if st is None:
        raise DaemonError(f"{name} is not attached on this node")
    pid = int(st["pid"])
    if st.get("state") == "fenced":
        _wait_exit(pid, 30)  # a fenced daemon is on its way out: let it finish rather than ask it to detach
    if not _pid_alive(pid):
        tail = log_tail(name)
        done = [d for d in _cleanup_stale(name, st) if not d.startswith("log: ")]
        out = {"name": name, "detached": True, "was_running": False, "cleaned_up": done, "log_tail": tail}
        gone = daemon_gone(name, st)
        if gone is not None:
            out["failure"] = gone["failure"]
        return out
    res: dict[str, Any] = request(name, {"op": "detach"}, timeout=120)
    _wait_exit(pid, 30)
    if not _pid_alive(pid):
        _remove_run_dir(name)  # the daemon removes it itself; this covers a daemon that could not
    return res


def daemon_gone(name: str, st: dict[str, Any]) -> dict[str, Any] | None:
    """Why NAME's daemon no longer serves although its state file says this node attached the disk; None while
    it serves. The one place that explains a dead attachment: `status`, `backup` and `detach` all use it.

    Returns ``state`` ("failed"), ``failure`` ("fenced" | "died"), ``owner_now`` (whether the record on the
    disk still names this attachment's node and epoch, i.e. this node still owns the disk and nothing tracks
    it), ``problem`` (the sentence to show) and ``hint`` (what to do); a fenced daemon adds ``fenced_by``,
    ``epoch_mine``, ``epoch_on_disk`` and ``fenced_at``, which it recorded in its state file before it exited.
    A daemon that died without such a record was killed or crashed; if the disk moved on since (a takeover
    elsewhere, then maybe a clean detach), ``owner_now`` is False and the problem says where it went.
    """
    pid = int(st.get("pid", 0))
    disk = st.get("disk", "?")
    cleanup = f"`baton detach {name}` cleans up what it left behind"
    if st.get("state") == "fenced":
        by = st.get("fenced_by") or "?"
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(st.get("fenced_at", 0))))
        return {
            "state": "failed", "failure": "fenced", "owner_now": False, "fenced_by": by,
            "epoch_mine": st.get("epoch_mine"),
            "epoch_on_disk": st.get("epoch_on_disk"), "fenced_at": st.get("fenced_at"),
            "problem": f"the daemon of {name} was fenced at {at}: node {by} took {disk} over (epoch "
                       f"{st.get('epoch_on_disk')}; this node held epoch {st.get('epoch_mine')}), so this node no "
                       f"longer owns it and stopped serving it",
            "hint": f"back it up on {by}, its owner now; {cleanup}",
        }
    if pid and _pid_alive(pid):
        return None
    log_file = run_dir() / name / "daemon.log"
    try:  # has the disk moved on since? (a takeover elsewhere advances the epoch)
        loc = locate(str(disk), st.get("record"), writable=False)
        try:
            h = loc.header
        finally:
            loc.close()
        moved = h.epoch != st.get("epoch") or h.owner != st.get("node")
    except (BatonError, OSError):
        moved = False  # cannot tell: assume the worst, this node still owns it
    if moved:
        where = (f"node {h.owner or '?'} took it over (epoch {h.epoch})" + (" and detached it" if h.clean else ""))
        return {
            "state": "failed", "failure": "died", "owner_now": False,
            "problem": f"the daemon of {name} (pid {pid}) died without detaching, and {disk} moved on since: "
                       f"{where}; this node no longer owns it",
            "hint": ("back it up by its disk path (nobody owns it now)" if h.clean else
                     f"back it up on {h.owner or 'its owner'}") + f"; {cleanup}",
        }
    return {
        "state": "failed", "failure": "died", "owner_now": True,
        "problem": f"the daemon of {name} (pid {pid}) died without detaching (killed, or crashed: see "
                   f"{log_file}); this node still owns {disk} but nothing tracks its writes now",
        "hint": f"re-attach it (let Pacemaker restart the resource, or `baton attach {disk} --node "
                f"{st.get('node', 'NODE')} --name {name}`); {cleanup}",
    }


def name_status(name: str) -> dict[str, Any]:
    """The live status of NAME's daemon, or its state file plus :func:`daemon_gone` when it is dead or fenced.
    Raises NotAttached when this node has no attachment of that name."""
    st = read_state(name)
    if st is None:
        raise NotAttached(f"{name} is not attached on this node",
                          hint="`baton status DISK` reads a disk's record from any node")
    gone = daemon_gone(name, st)
    if gone is not None:
        return st | gone
    live: dict[str, Any] = request(name, {"op": "status"}, timeout=30)
    return live


def disk_status(disk: str, record: str | None = None) -> dict[str, Any]:
    """Offline record status of DISK, plus the live daemon's if it is attached here."""
    real = os.path.realpath(disk)
    extra: dict[str, Any] = {}
    for st in attachments():
        if st.get("disk") == real:
            gone = daemon_gone(st["name"], st)
            if gone is None:
                with contextlib.suppress(BatonError):
                    return name_status(st["name"])
            else:  # attached here, but its daemon died or was fenced: the record plus why nothing tracks it
                extra = {k: v for k, v in st.items() if k not in ("alive", "state", "epoch")} | gone
    loc = locate(disk, record, writable=False)
    try:
        return describe(loc) | extra
    finally:
        loc.close()


# ------------------------------------------------------------------------------------------------ the daemon


def open_tracker(loc: Located, *, tracking: bool = True) -> Tracker:
    """A tracker over the data area of a located disk (opened O_DIRECT)."""
    dev = DirectDev(loc.disk, writable=True)
    loc.devs.append(dev)
    data = SubDev(dev, 0, loc.data_size) if loc.header.placement == PLACEMENT_TAIL else dev
    if loc.header.placement != PLACEMENT_TAIL and loc.data_size != dev.size:
        raise DeviceError(f"{loc.disk} changed size since init ({loc.data_size} -> {dev.size} bytes)")
    return Tracker(loc.record, data, size=loc.data_size, tracking=tracking, spill_dir=spill_dir_default())


def _err_msg(e: BaseException) -> dict[str, Any]:
    if isinstance(e, BatonError):
        return {"ok": False, "error": type(e).__name__, "message": str(e), "hint": e.hint}
    return {"ok": False, "error": "BatonError", "message": f"{type(e).__name__}: {e}"}


class Daemon:
    """The per-disk daemon. ``run`` returns the process exit status."""

    def __init__(self, disk: str, *, node: str, name: str, frontend: str, record: str | None, tracking: bool,
                 tcp: str | None) -> None:
        self.disk = os.path.realpath(disk)
        self.node, self.name, self.frontend_kind = node, name, frontend
        self.record_spec, self.tracking, self.tcp = record, tracking, tcp
        self.loc: Located | None = None
        self.tracker: Tracker | None = None
        self.frontend: Any = None
        self.stop_event = threading.Event()
        self.exit_status = 0
        self.backup_lock = threading.Lock()
        self.last_backup: dict[str, Any] | None = None
        self.started = time.time()
        self.device: str | None = None
        self.socket: str | None = None
        self.detaching = False  # a detach stops the frontend on purpose: not a failure
        self.fence_recorded = False

    # -- start-up --------------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        loc = locate(self.disk, self.record_spec, writable=True)
        self.loc = loc
        loc.record.attach(self.node)
        if not self.tracking:
            loc.record.distrust()  # unrecorded writes follow: the next backup must be full, and says so
        self.tracker = open_tracker(loc, tracking=self.tracking)
        if self.frontend_kind == "fuse":
            from baton.frontends.fuse import FuseFrontend

            self.frontend = FuseFrontend(self.tracker, self.name, run_dir(), dev_dir())
            self.device = self.frontend.start()
        else:
            from baton.frontends.nbd import NBDServer

            sock = str(run_dir() / f"{self.name}.sock")
            tcp = None
            if self.tcp:
                host, _, port = self.tcp.rpartition(":")
                tcp = (host or "127.0.0.1", int(port))
            self.frontend = NBDServer(self.tracker, export_name=self.name, unix_path=None if tcp else sock,
                                      tcp=tcp)
            self.frontend.start()
            self.socket = sock if not tcp else None
            self.device = None
            threading.Thread(target=self._nbd_serve, name="nbd-serve", daemon=True).start()
        st = {"name": self.name, "pid": os.getpid(), "node": self.node, "disk": self.disk,
              "record": str(loc.spec), "frontend": self.frontend_kind, "device": self.device,
              "socket": self.socket, "tcp": self.tcp, "epoch": loc.header.epoch, "tracking": self.tracking,
              "started": self.started}
        path = state_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        os.replace(tmp, path)
        return st

    def watch_fence(self, interval: float = 1.0) -> None:
        """Re-read the record header every ``interval`` s: a superseded owner stops even if it only writes
        chunks that are already marked. On Fenced the frontend is stopped and the daemon exits with 5."""

        def run() -> None:
            assert self.loc is not None
            while not self.stop_event.wait(interval):
                try:
                    self.loc.record.heartbeat()
                except Fenced as e:
                    log.error("fenced: %s", e)
                    self.record_fence(e)  # first: stopping the frontend may take a while, or hang
                    self.exit_status = 5
                    with contextlib.suppress(Exception):
                        self.frontend.stop(force=True)
                    self.stop_event.set()
                    return
                except Exception as e:  # an unreadable header is not a fence; the next commit decides
                    log.warning("fence heartbeat: %s", e)

        threading.Thread(target=run, name="fence-heartbeat", daemon=True).start()

    def record_fence(self, err: Fenced) -> None:
        """Record in daemon.json, before the daemon exits, that it was fenced: by which node, at which epochs
        (ours, and the one on disk), when. `status`, `backup` and `detach` read it (see :func:`daemon_gone`);
        a killed daemon leaves no such record, so its absence means killed or crashed. Never raises."""
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
            path = state_path(self.name)
            st = read_state(self.name) or {"name": self.name, "pid": os.getpid(), "node": self.node,
                                           "disk": self.disk, "frontend": self.frontend_kind}
            st |= {"state": "fenced", "fenced_by": by or "?", "epoch_mine": err.mine, "epoch_on_disk": on_disk,
                   "fenced_at": time.time(), "fence_message": str(err)}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(st))
            os.replace(tmp, path)
        except OSError as e:
            log.error("fenced: cannot record it in %s: %s", state_path(self.name), e)

    def _nbd_serve(self) -> None:
        try:
            self.frontend.serve_forever()
        except Fenced:
            self.exit_status = 5
        except Exception:
            log.exception("NBD server failed")
            self.exit_status = 1
        if not self.detaching:  # a detach stops the server itself and ends the daemon after the record is clean
            self.stop_event.set()

    # -- control socket --------------------------------------------------------------------------------

    def serve_control(self) -> socket.socket:
        path = control_path(self.name)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        os.chmod(path, 0o600)
        srv.listen(16)
        threading.Thread(target=self._accept, args=(srv,), name="control", daemon=True).start()
        return srv

    def _accept(self, srv: socket.socket) -> None:
        while not self.stop_event.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rw")
            try:
                req = json.loads(f.readline() or "{}")
                op = req.get("op")

                def send(msg: dict[str, Any]) -> None:
                    f.write(json.dumps(msg) + "\n")
                    f.flush()

                if op == "status":
                    send({"ok": True, "result": self.status()})
                elif op == "detach":
                    self.detach()
                    send({"ok": True, "result": {"name": self.name, "detached": True, "was_running": True}})
                    self.stop_event.set()
                elif op == "backup":
                    send({"ok": True, "result": self.backup(req, send)})
                else:
                    send({"ok": False, "error": "UsageError", "message": f"unknown op {op!r}"})
            except BaseException as e:  # every failure is answered, never swallowed
                if not isinstance(e, BatonError):
                    log.exception("control request failed")
                with contextlib.suppress(OSError):
                    f.write(json.dumps(_err_msg(e)) + "\n")
                    f.flush()

    def status(self) -> dict[str, Any]:
        assert self.loc is not None and self.tracker is not None
        rec = self.loc.record
        st = describe(self.loc)
        ts = self.tracker.statistics()
        fe = self.frontend.statistics() if self.frontend is not None else {}
        failure = getattr(self.frontend, "failure", None)
        return st | {
            "name": self.name, "state": "running" if not failure else "failed", "pid": os.getpid(),
            "node": self.node, "frontend": self.frontend_kind, "device": self.device, "socket": self.socket,
            "tcp": self.tcp, "tracking": self.tracking, "writes": ts["writes"], "reads": ts["reads"],
            "first_touch": ts["first_touch"], "metadata_syncs": ts["metadata_syncs"],
            "metadata_commits": ts["metadata_commits"], "bytes_in": ts["bytes_in"], "bytes_out": ts["bytes_out"],
            "flushes": ts["flushes"], "discards": ts["discards"], "cbw_copies": ts["cbw_copies"],
            "record_stats": rec.statistics(), "frontend_stats": fe, "uptime_s": round(time.time() - self.started, 1),
            "last_backup_here": self.last_backup, "problem": failure,
        }

    def backup(self, req: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        from baton.backup import run_backup
        from baton.repo import Repository

        assert self.tracker is not None
        if not self.backup_lock.acquire(blocking=False):
            raise errors.RepoLocked(f"a backup of {self.name} is already running on this node")
        try:
            repo = Repository.open(req["repo"], key_file=req.get("key_file"))
            last = [0.0]

            def progress(done: int, total: int) -> None:
                now = time.monotonic()
                if now - last[0] > 0.5 or done == total:
                    last[0] = now
                    send({"progress": [done, total]})

            res = run_backup(self.tracker, repo, node=self.node, name=self.name, full=bool(req.get("full")),
                             progress=progress)
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

    def wait_frontend(self) -> None:
        if self.frontend_kind == "fuse":
            while not self.stop_event.is_set():
                if self.frontend.wait(timeout=0.5) and not self.detaching:
                    break
            if self.stop_event.is_set():
                return
            failure = getattr(self.frontend, "failure", None) or ""
            log.error("frontend stopped: %s", failure)
            if not self.exit_status:
                broken = self.loc.record.broken() if self.loc is not None else None
                self.exit_status = 5 if isinstance(broken, Fenced) or "fenc" in failure.lower() else 1
            self.stop_event.set()
        else:
            self.stop_event.wait()


@contextlib.contextmanager
def _ready_pipe(fd: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    sent = [False]

    def say(msg: dict[str, Any]) -> None:
        if fd >= 0 and not sent[0]:
            sent[0] = True
            with contextlib.suppress(OSError):
                os.write(fd, (json.dumps(msg) + "\n").encode())
                os.close(fd)

    yield say


def serve(disk: str, *, node: str, name: str, frontend: str, record: str | None, tracking: bool,
          tcp: str | None, ready_fd: int) -> int:
    """Daemon main: take over, serve, answer the control socket, until detached, fenced or killed."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s baton[{name}] %(levelname)s %(message)s")
    d = Daemon(disk, node=node, name=name, frontend=frontend, record=record, tracking=tracking, tcp=tcp)
    with _ready_pipe(ready_fd) as say:
        try:
            st = d.start()
            srv = d.serve_control()
            d.watch_fence()
        except BaseException as e:
            log.error("attach failed: %s", e)
            say(_err_msg(e))
            with contextlib.suppress(Exception):
                if d.frontend is not None:
                    d.frontend.stop(force=True)
            # `baton attach` prints the error just sent, which is all this daemon's log holds, so its
            # directory goes (unless the frontend left something to clean up, or another daemon owns it).
            _remove_run_dir(name)
            return 1
        log.info("attached %s as %s (node %s, epoch %s, %s %s)", disk, name, node, st["epoch"], frontend,
                 st["device"] or st["socket"])
        say({"ok": True, "result": st})

    def preload() -> None:
        # Import the backup engine now, off the I/O path: the first backup after a takeover (a new daemon)
        # would otherwise spend ~0.15 s importing the repository stack (zstd, BLAKE3, cryptography).
        with contextlib.suppress(Exception):
            import baton.backup
            import baton.repo  # noqa: F401

    threading.Thread(target=preload, name="preload", daemon=True).start()

    def on_term(signum: int, frame: Any) -> None:
        def go() -> None:
            try:
                d.detach()
                d.stop_event.set()
            except BaseException as e:
                log.error("SIGTERM: cannot detach: %s", e)

        threading.Thread(target=go, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    d.wait_frontend()
    srv.close()
    broken = d.loc.record.broken() if d.loc is not None else None
    if isinstance(broken, Fenced):
        d.exit_status = 5
        d.record_fence(broken)
    if d.exit_status == 0 and d.detaching:
        _remove_run_dir(name)  # detached cleanly: the record is clean, nothing is left to inspect
    if d.exit_status:
        log.error("exiting with status %s (%s)", d.exit_status, "fenced" if d.exit_status == 5 else "failure")
        with contextlib.suppress(Exception):
            d.frontend.stop(force=True)
    return d.exit_status
