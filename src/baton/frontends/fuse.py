"""The FUSE frontend: one tracked disk as ``/dev/baton/NAME``, a loop device over a single-file FUSE export.

How a write travels::

    application -> /dev/loopN (losetup --direct-io=on) -> FUSE file RUN_DIR/NAME/fuse/disk (direct_io)
                -> libfuse3 worker thread -> FuseFrontend._write -> tracker.write (mark, then forward) -> ack

Contracts (measured facts behind them: docs/frontends-fuse.md):

* **Record before ack.** A write to the loop device completes only after ``tracker.write`` returned, because the
  FUSE file is opened ``direct_io`` and the FUSE writeback cache is switched off (it is cleared from the
  connection's wanted capabilities at init; the writeback cache would acknowledge writes before we see them).
* **Durability.** The loop device turns a flush (and an emulated FUA, which the block layer sends as write +
  flush) into a FUSE FSYNC, which calls ``tracker.flush()``. The FUSE ``flush`` operation is ``close()``, not a
  barrier, and does nothing.
* **Discard and write-zeroes.** The loop device sends both as ``fallocate``: PUNCH_HOLE (discard, and
  write-zeroes that may unmap) and ZERO_RANGE (write-zeroes that must not unmap). After either, reads must
  return zeroes (fallocate(2)), so both go to ``tracker.write_zeroes`` (``may_trim=True`` for PUNCH_HOLE), which
  marks the chunks first. Nothing that changes content bypasses the tracker.
* **Errors.** Any exception from the tracker fails that request with EIO. ``errors.Fenced`` fails it with EIO
  *and* shuts the frontend down: the FUSE connection is aborted (all further I/O fails at once), the loop device
  is detached lazily, the FUSE mount is lazily unmounted, and :meth:`FuseFrontend.wait` returns.
* **Killed daemon.** When the process dies the kernel aborts the FUSE connection: in-flight and new I/O on the
  loop device fails with EIO (measured: ~60 ms). :func:`cleanup_stale` then removes the dead device.
* **Hung daemon.** A request stuck in the tracker for longer than ``request_timeout`` makes the built-in
  watchdog abort the connection (``/sys/fs/fuse/connections/N/abort``), so writers get EIO instead of hanging
  in D state forever. A process that is hung as a whole (its watchdog thread too) needs an outside watchdog
  to write that file: ``fuse_conn`` in state.json names N.
* **Access.** The FUSE mount is made by root without ``allow_other``, so the kernel lets only root processes
  (uid 0 and gid 0) open the file; ``open`` checks the uid again.

libfuse3 is forced: mfusepy picks libfuse2 when both are installed, and libfuse2 caps writes at 128 KiB.
:func:`load_mfusepy` sets ``FUSE_LIBRARY_PATH`` for the import and checks the version mfusepy actually loaded.

libfuse's ``fuse_main_real`` installs SIGTERM/SIGHUP/SIGINT handlers that end the FUSE loop (which would
abort the device under a mounted file system). The frontend puts the process's previous dispositions back as
soon as the session is initialised, so signals stay the caller's business.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import json
import logging
import mmap
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from baton.errors import BatonError, DeviceBusy, DeviceError, Fenced
from baton.frontends import loopdev
from baton.frontends.base import (
    Endpoint,
    FailureKind,
    Frontend,
    FrontendConfig,
    FrontendFailure,
    ServeLock,
)
from baton.host.attachments import check_name
from baton.util import proc_stat

log = logging.getLogger(__name__)

FILE_NAME = "disk"  # the single file in the FUSE export
_FUSECTL = Path("/sys/fs/fuse/connections")
_FUSE_CAP_WRITEBACK_CACHE = 1 << 16  # fuse_common.h
_PR_SET_IO_FLUSHER = 57  # linux/prctl.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_READY_TIMEOUT = 30.0  # seconds for the FUSE session to come up
_STOP_JOIN_TIMEOUT = 10.0  # seconds for the FUSE loop to end after unmount, before we abort the connection
_DETACH_WAIT = 5.0  # seconds for losetup -d to take effect
_DYING_GRACE = 2.0  # seconds a killed daemon gets to finish exiting before we abort its FUSE connection


from baton.tracker import TrackerLike  # noqa: E402 - the protocol lives with the tracker

# ---- libfuse3 via mfusepy ------------------------------------------------------------------------------


def load_mfusepy() -> ModuleType:
    """Import mfusepy bound to libfuse3 and return the module.

    Raises DeviceError when mfusepy is missing, or when it is (or was already) bound to another libfuse major
    version, e.g. because FUSE_LIBRARY_PATH points at libfuse2 or mfusepy was imported earlier without it.
    """
    mod: ModuleType | None = sys.modules.get("mfusepy")
    if mod is None:
        saved = os.environ.get("FUSE_LIBRARY_PATH")
        if not saved:
            os.environ["FUSE_LIBRARY_PATH"] = ctypes.util.find_library("fuse3") or "libfuse3.so.3"
        try:
            import mfusepy

            mod = mfusepy
        except (ImportError, OSError) as exc:
            raise DeviceError(f"cannot load mfusepy on libfuse3: {exc}",
                              hint="install the fuse3 package (libfuse3) and mfusepy") from exc
        finally:
            # Only mfusepy's import needs it; do not leak it into child processes.
            if saved is None:
                os.environ.pop("FUSE_LIBRARY_PATH", None)
    assert mod is not None
    major = getattr(mod, "fuse_version_major", None)
    if major != 3:
        raise DeviceError(f"mfusepy is bound to libfuse {major}.x ({getattr(mod, '_libfuse_path', '?')}), "
                          "Baton needs libfuse3", hint="unset FUSE_LIBRARY_PATH / FUSE_LIBRARY_NAME")
    return mod


_libc = ctypes.CDLL(None, use_errno=True)
_SIGNALS = (1, 2, 15)  # SIGHUP, SIGINT, SIGTERM: the ones fuse_set_signal_handlers takes over


def _save_sigactions() -> dict[int, ctypes.Array[ctypes.c_char]]:
    # struct sigaction is 152 bytes on x86-64/arm64 glibc; an oversized opaque buffer avoids its layout.
    saved: dict[int, ctypes.Array[ctypes.c_char]] = {}
    for sig in _SIGNALS:
        buf = ctypes.create_string_buffer(512)
        if _libc.sigaction(sig, None, buf) == 0:
            saved[sig] = buf
    return saved


def _restore_sigactions(saved: dict[int, ctypes.Array[ctypes.c_char]]) -> None:
    for sig, buf in saved.items():
        _libc.sigaction(sig, buf, None)


def fuse_conn_id(st_dev: int) -> int:
    """The fusectl directory number of a FUSE mount: the kernel-internal dev_t (major << 20 | minor)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def ensure_fusectl() -> None:
    """Mount the fusectl file system on /sys/fs/fuse/connections if it is not mounted (in our namespace)."""
    for e in loopdev.parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        if e.fstype == "fusectl":
            return
    if _libc.mount(b"fusectl", os.fsencode(str(_FUSECTL)), b"fusectl", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount fusectl on {_FUSECTL}: {os.strerror(err)}")


def abort_connection(conn: int) -> bool:
    """Abort FUSE connection ``conn``: every pending and future request fails (the loop device sees EIO).
    Returns False when the connection no longer exists or fusectl is unavailable."""
    try:
        ensure_fusectl()
    except OSError as exc:
        log.warning("cannot mount fusectl to abort FUSE connection %d: %s", conn, exc)
        return False
    try:
        (_FUSECTL / str(conn) / "abort").write_text("1")
        return True
    except OSError:
        return False


# ---- state file ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """run_dir/NAME/state.json: what a live frontend owns, so a later process can clean up after it."""

    name: str
    frontend: str  # "fuse"
    pid: int  # the serving process
    pid_start: int  # its start time in clock ticks (/proc/PID/stat field 22): guards against pid reuse
    pid_ns: str  # its pid namespace ("pid:[4026531836]"): pid and pid_start mean something only in it
    loop: str  # "/dev/loopN"
    loop_diskseq: int  # /sys/block/loopN/diskseq at attach: tells our attachment from a later reuse of loopN
    link: str  # dev_dir/NAME
    mountpoint: str  # run_dir/NAME/fuse
    fuse_dev: tuple[int, int]  # (major, minor) of the FUSE mount: identifies it for a lazy unmount
    fuse_ino: int  # inode of the FUSE file
    fuse_conn: int  # /sys/fs/fuse/connections/N
    size: int  # bytes exposed
    started_at: float  # unix time

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["fuse_dev"] = list(self.fuse_dev)
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> State:
        d: dict[str, Any] = json.loads(text)
        d["fuse_dev"] = tuple(d["fuse_dev"])
        d.setdefault("pid_ns", "")  # written before pid_ns was recorded
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def load_state(path: Path) -> State | None:
    """The FUSE frontend's state file at ``path`` (RUN_DIR/NAME/state.json), None if there is none. A file that
    does not parse raises DeviceError. (The attachment's own state file, daemon.json, is another file with
    another writer: ``baton.host.attachments``.)"""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return State.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise DeviceError(f"{path} is not a valid Baton state file: {exc}",
                          hint="inspect it; remove it by hand if nothing it names is in use") from exc


def _write_state(path: Path, st: State) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(st.to_json())
    os.replace(tmp, path)


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, None if there is no such process."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _exiting(pid: int) -> bool:
    """The process was killed and is inside exit() (PF_EXITING), or is a zombie."""
    fields = proc_stat(pid)
    if fields is None or len(fields) < 7:
        return False
    return fields[0] == "Z" or bool(int(fields[6]) & 0x4)  # state; flags & PF_EXITING


def _alive(st: State) -> bool:
    """The recorded process still runs. Only decidable from the same pid namespace; elsewhere the lock file
    (see :class:`ServeLock`) is the only evidence, and this returns False."""
    return (st.pid_ns in ("", _pid_ns()) and process_start_time(st.pid) == st.pid_start
            and not _exiting(st.pid))


def _busy_message(name: str, st: State | None) -> str:
    if st is None:
        return f"{name} is being attached or served by another live process"
    return f"{name} is attached and served by live pid {st.pid} ({st.loop})"


# ---- stale clean-up -----------------------------------------------------------------------------------


def cleanup_stale(name: str, run_dir: Path = Path("/run/baton"), dev_dir: Path = Path("/dev/baton")) -> list[str]:
    """Remove what a dead frontend for ``name`` left behind; return a list of the actions taken.

    Touches only what run_dir/NAME/state.json names, and only after checking it is still that object: the loop
    device is detached only if it is still the recorded attachment (same disk sequence number), the FUSE
    mount is lazily unmounted only if it is still the recorded one ("Transport endpoint is not connected"),
    and the symlink is removed only if it still points at the recorded loop device.

    Raises DeviceBusy if the serving process is still alive (it holds run_dir/NAME/lock), or if a file system
    is still mounted on (or a holder sits on) the dead loop device: unmount it first; the state file is kept
    then. Returns [] when there is no state file.
    """
    check_name(name)
    state_dir = Path(run_dir).absolute() / name
    if not (state_dir / "state.json").exists():
        return []
    lock = ServeLock(state_dir)
    try:
        if not lock.try_acquire() and not _unwedge_dying_daemon(load_state(state_dir / "state.json"), lock):
            raise DeviceBusy(_busy_message(name, load_state(state_dir / "state.json")),
                             hint=f"detach it with `baton detach {name}`, or stop that process")
        return _cleanup_locked(name, state_dir)
    finally:
        lock.release()


def _unwedge_dying_daemon(st: State | None, lock: ServeLock) -> bool:
    """A killed daemon that cannot finish dying: abort its FUSE connection; True once we hold the lock.

    The case: the daemon was the last process of a mount namespace in which a file system on its own device
    is mounted. Its exit tears the namespace down, unmounting that file system, which waits for writeback
    through the device, which only the dying daemon could serve: the kernel releases /dev/fuse (and our lock)
    only after that. Aborting the connection fails the writeback with EIO and lets the exit finish.
    """
    if st is None or st.pid_ns not in ("", _pid_ns()) or process_start_time(st.pid) != st.pid_start:
        return False
    deadline = time.monotonic() + _DYING_GRACE
    while _exiting(st.pid):
        if lock.try_acquire():
            return True
        if time.monotonic() > deadline:
            log.warning("%s: daemon pid %d is stuck exiting; aborting its FUSE connection %d", st.name, st.pid,
                        st.fuse_conn)
            abort_connection(st.fuse_conn)
            end = time.monotonic() + _DYING_GRACE
            while time.monotonic() < end:
                if lock.try_acquire():
                    return True
                time.sleep(0.05)
            return False
        time.sleep(0.05)
    return lock.try_acquire()


def _cleanup_locked(name: str, state_dir: Path) -> list[str]:
    """cleanup_stale's work; the caller holds NAME's lock, so no live process serves NAME."""
    state_path = state_dir / "state.json"
    st = load_state(state_path)
    if st is None:
        return []
    if _alive(st):  # unlocked but running: someone removed the lock file; do not trust the lock then
        raise DeviceBusy(_busy_message(name, st) + f" (but {state_dir}/lock was not held)",
                         hint=f"stop pid {st.pid}")
    actions: list[str] = []
    li = loopdev.info(st.loop)
    if li is not None and li.diskseq == st.loop_diskseq:
        u = loopdev.users(st.loop)
        if u.mounts or u.holders or u.exclusive_busy:
            raise DeviceBusy(f"stale {st.loop} of {name} (its daemon pid {st.pid} died) is still in use: "
                             f"{u.describe()}", hint="unmount it first; its I/O fails with EIO")
        loopdev.detach(st.loop)  # lazy if a process still has it open: that process only gets EIO anyway
        actions.append(f"detached {st.loop}" + (f" (lazily: open by pids {u.openers})" if u.openers else ""))
    mp = Path(st.mountpoint)
    m = loopdev.mounted_at(mp)
    if m is not None and m.dev == st.fuse_dev:
        loopdev.umount(mp, lazy=True)
        actions.append(f"unmounted dead FUSE mount {mp}")
    link = Path(st.link)
    if link.is_symlink() and os.readlink(link) == st.loop:
        link.unlink()
        actions.append(f"removed {link}")
    state_path.unlink(missing_ok=True)
    actions.append(f"removed {state_path}")
    with contextlib.suppress(OSError):
        mp.rmdir()
    return actions


# ---- the frontend -------------------------------------------------------------------------------------


class FuseFrontend(Frontend):
    """Serve ``tracker`` as the block device dev_dir/NAME (a symlink to a loop device over a FUSE file).

    Lifecycle (:class:`baton.frontends.base.Frontend`): :meth:`start` (returns when the device is usable),
    :meth:`wait` (returns when stopped, fenced or aborted), :meth:`stop`. One instance serves one start/stop
    cycle. Thread-safe. Failures: ``FENCED`` (the tracker raised Fenced), ``HUNG`` (the watchdog fired),
    ``DIED`` (the FUSE session was unmounted or aborted from outside).

    ``request_timeout``: seconds a single tracker call may take before the watchdog aborts the whole FUSE
    connection (every pending and later I/O on the device fails with EIO). None switches the watchdog off.

    ``max_threads``: requests served at once (libfuse worker threads, and the kernel's FUSE background queue,
    which the loop device's async direct I/O goes through). Both default to 10/12 in libfuse 3.14 and the
    kernel; more concurrency lets the tracker's group commit batch more first-touch marks.
    """

    kind = "fuse"

    def __init__(self, tracker: TrackerLike, name: str, run_dir: Path = Path("/run/baton"),
                 dev_dir: Path = Path("/dev/baton"), *, request_timeout: float | None = 120.0,
                 max_threads: int = 32) -> None:
        check_name(name)
        if tracker.size <= 0 or tracker.size % 512:
            raise DeviceError(f"tracker size {tracker.size} is not a positive multiple of 512 bytes")
        self.tracker = tracker
        self.name = name
        # Absolute: libfuse's fuse_main changes the working directory to "/".
        self.run_dir = Path(run_dir).absolute()
        self.dev_dir = Path(dev_dir).absolute()
        self.state_dir = self.run_dir / name
        self.state_path = self.state_dir / "state.json"
        self.mountpoint = self.state_dir / "fuse"
        self.fuse_file = self.mountpoint / FILE_NAME
        self.link = self.dev_dir / name
        self.request_timeout = request_timeout
        if not 1 <= max_threads <= 1024:
            raise DeviceError(f"max_threads {max_threads} outside 1..1024")
        self.max_threads = max_threads
        self.loop_device: str | None = None
        self._failure: FrontendFailure | None = None  # why it stopped by itself (fenced, hung, session lost)

        self._lock = threading.Lock()  # counters, in-flight table, lifecycle flags
        self._phase = "new"  # new -> starting -> running -> stopping -> stopped
        self._stopped = threading.Event()
        self._session_up = threading.Event()
        self._loop_exited = threading.Event()
        self._serve_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._saved_signals: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self._state: State | None = None
        self._conn: int | None = None
        self._fuse_stat: os.stat_result | None = None
        self._diskseq: int | None = None  # of our loop attachment
        self._lock_file: ServeLock | None = None  # held from start() until the device is gone
        self._dead = False  # fenced/aborted: reject every request without calling the tracker
        self._inflight: dict[int, float] = {}
        self._tokens = itertools.count()
        self._stats: dict[str, int] = dict.fromkeys(
            ("reads", "writes", "bytes_read", "bytes_written", "fsyncs", "punch_holes", "zero_ranges",
             "errors", "fenced", "watchdog_aborts", "max_in_flight", "max_write", "io_flusher"), 0)

    @classmethod
    def create(cls, tracker: TrackerLike, config: FrontendConfig) -> FuseFrontend:
        return cls(tracker, config.name, config.run_dir, config.dev_dir)

    @classmethod
    def cleanup_stale(cls, config: FrontendConfig) -> list[str]:
        """See :func:`cleanup_stale` (the module function)."""
        return cleanup_stale(config.name, config.run_dir, config.dev_dir)

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> Endpoint:
        """Mount the FUSE export, attach the loop device, publish dev_dir/NAME; return it as the endpoint.

        Returns only when the device reads and has the tracker's size. If a previous daemon for NAME died,
        its leftovers are cleaned first (:func:`cleanup_stale`). Raises DeviceBusy if NAME is attached by a
        live process, or if dev_dir/NAME exists and is not ours; DeviceError if FUSE or the loop device cannot
        be set up. On failure everything set up so far is torn down again.
        """
        with self._lock:
            if self._phase != "new":
                raise DeviceError(f"{self.name}: this frontend was already started (one start per instance)")
            self._phase = "starting"
        try:
            self._prepare_dirs()
            self._start_session()
            self._attach_loop()
        except BaseException:
            self._teardown_after_failed_start()
            raise
        if self.request_timeout is not None:
            self._watchdog = threading.Thread(target=self._watch, name=f"baton-fuse-watchdog-{self.name}",
                                              daemon=True)
            self._watchdog.start()
        with self._lock:
            if self._phase == "starting":
                self._phase = "running"
        log.info("%s: serving %s -> %s (FUSE conn %s)", self.name, self.link, self.loop_device, self._conn)
        return Endpoint(device=str(self.link))

    @property
    def endpoint(self) -> Endpoint | None:
        return Endpoint(device=str(self.link)) if self._state is not None else None

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._phase == "running" and not self._dead

    @property
    def failure(self) -> FrontendFailure | None:
        return self._failure

    def _prepare_dirs(self) -> None:
        self._lock_file = ServeLock(self.state_dir)
        if not self._lock_file.try_acquire() and not _unwedge_dying_daemon(load_state(self.state_path),
                                                                          self._lock_file):
            self._lock_file.release()
            self._lock_file = None
            raise DeviceBusy(_busy_message(self.name, load_state(self.state_path)),
                             hint=f"detach it with `baton detach {self.name}` first")
        cleaned = _cleanup_locked(self.name, self.state_dir)
        for a in cleaned:
            log.warning("%s: stale leftovers of a dead daemon: %s", self.name, a)
        if self.link.is_symlink() or self.link.exists():
            target = os.readlink(self.link) if self.link.is_symlink() else None
            if target is None or Path(target).exists():
                raise DeviceBusy(f"{self.link} already exists and is not recorded in {self.state_path}",
                                 hint="remove it if nothing uses it")
            self.link.unlink()  # dangling link to a vanished device: nothing to protect
        self.dev_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.mountpoint.mkdir(exist_ok=True, mode=0o700)
        if loopdev.mounted_at(self.mountpoint) is not None:
            raise DeviceBusy(f"{self.mountpoint} is already a mount point, without a state file naming it",
                             hint=f"unmount it (umount -l {self.mountpoint}) if it is a dead Baton mount")

    def _start_session(self) -> None:
        mf = load_mfusepy()
        ops = _make_operations(mf, self)
        self._saved_signals = _save_sigactions()
        self._thread = threading.Thread(target=self._serve, args=(mf, ops), name=f"baton-fuse-{self.name}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self._session_up.wait(0.05):
            if self._loop_exited.is_set():
                raise DeviceError(f"{self.name}: FUSE mount on {self.mountpoint} failed: {self._serve_error!r}")
            if time.monotonic() > deadline:
                raise DeviceError(f"{self.name}: FUSE session did not come up within {_READY_TIMEOUT:.0f} s")
        st = os.stat(self.fuse_file)
        if st.st_size != self.tracker.size:
            raise DeviceError(f"{self.fuse_file}: size {st.st_size}, expected {self.tracker.size}")
        self._fuse_stat = st
        self._conn = fuse_conn_id(st.st_dev)

    def _attach_loop(self) -> None:
        self.loop_device = dev = loopdev.attach(self.fuse_file, direct_io=True)
        li = loopdev.info(dev)
        if li is None or not li.back_file.endswith(f"/{FILE_NAME}"):
            raise DeviceError(f"{dev} is not attached to {self.fuse_file} after losetup ({li})")
        self._diskseq = li.diskseq
        size = loopdev.size_of(dev)
        if size != self.tracker.size:
            raise DeviceError(f"{dev}: size {size}, expected {self.tracker.size}")
        _probe_read(dev, min(4096, self.tracker.size))
        assert self._fuse_stat is not None and self._conn is not None
        self._state = State(
            name=self.name, frontend="fuse", pid=os.getpid(), pid_start=process_start_time(os.getpid()) or 0,
            pid_ns=_pid_ns(),
            loop=dev, loop_diskseq=li.diskseq, link=str(self.link), mountpoint=str(self.mountpoint),
            fuse_dev=(os.major(self._fuse_stat.st_dev), os.minor(self._fuse_stat.st_dev)),
            fuse_ino=self._fuse_stat.st_ino, fuse_conn=self._conn, size=self.tracker.size,
            started_at=time.time())
        # State first, then the public name: a crash in between leaves a state file that cleanup_stale uses.
        _write_state(self.state_path, self._state)
        tmp = self.dev_dir / f".{self.name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(dev)
        os.replace(tmp, self.link)

    def _serve(self, mf: ModuleType, ops: Any) -> None:
        # Writeback under memory pressure may wait on this very device; PR_SET_IO_FLUSHER keeps our own
        # allocations from recursing into I/O. It is per thread and inherited by the libfuse workers this
        # thread spawns. It needs CAP_SYS_RESOURCE: without it we carry on, and statistics() says so.
        if _libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
            self._stats["io_flusher"] = 1
        try:
            # Options: foreground (never fork), multithreaded (default), direct_io (FOPEN_DIRECT_IO for every
            # open). No allow_other: only root may open the file. No writeback cache (cleared at init too).
            mf.FUSE(ops, str(self.mountpoint), foreground=True, direct_io=True, fsname=f"baton:{self.name}",
                    subtype="baton", max_threads=self.max_threads, max_idle_threads=self.max_threads)
        except BaseException as exc:
            self._serve_error = exc
        finally:
            self._loop_exited.set()
            with self._lock:
                unexpected = self._phase == "running" and not self._dead
            if unexpected:
                # Someone unmounted or aborted our FUSE connection: the device only gives EIO from now on.
                self._emergency_stop(FrontendFailure(
                    FailureKind.DIED, f"the FUSE session ended unexpectedly ({self._serve_error!r})",
                    self._serve_error))

    def _on_init(self, conn: Any, cfg: Any) -> None:
        _restore_sigactions(self._saved_signals)
        if conn is not None:
            conn.want &= ~_FUSE_CAP_WRITEBACK_CACHE
            # The loop device's direct I/O reaches FUSE as async (background) requests: let as many be in
            # flight as we have workers. Root may raise it above the unprivileged max_user_bgreq.
            conn.max_background = self.max_threads
            conn.congestion_threshold = max(1, self.max_threads * 3 // 4)
            self._stats["max_write"] = int(conn.max_write)
        if cfg is not None:
            cfg.direct_io = 1
            cfg.kernel_cache = 0
            cfg.auto_cache = 0
        self._session_up.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the frontend stopped (stop(), fenced, watchdog abort, lost session). True if it did."""
        return self._stopped.wait(timeout)

    def stop(self, force: bool = False) -> None:
        """Flush, detach the loop device, unmount FUSE, remove dev_dir/NAME and the state file. Idempotent.

        Without ``force`` it refuses with DeviceBusy (naming the mount point, holder or pid) while the loop
        device is mounted anywhere, held, or open by a process; nothing is changed then. With ``force`` the
        device is detached lazily and the FUSE connection aborted, so remaining users get EIO.
        A failing final ``tracker.flush()`` is raised after the teardown (Fenced as is, others as DeviceError).
        """
        with self._lock:
            phase = self._phase
            if phase not in ("new", "stopped", "stopping"):
                self._phase = "stopping"
        if phase in ("new", "stopped"):
            return
        if phase == "stopping":  # another stop(), or a fenced/aborted shutdown, is under way
            self._stopped.wait(_STOP_JOIN_TIMEOUT * 3)
            return
        try:
            flush_error = self._detach_and_flush(force)
        except BaseException:
            with self._lock:
                if self._phase == "stopping":
                    self._phase = "running"
            raise
        self._end_session(lazy=force)
        self._remove_names()
        with self._lock:
            self._phase = "stopped"
        self._stopped.set()
        if flush_error is not None:
            if isinstance(flush_error, BatonError):
                raise flush_error
            raise DeviceError(f"{self.name}: final flush failed: {flush_error}") from flush_error

    def _detach_and_flush(self, force: bool) -> BaseException | None:
        dev = self.loop_device
        if dev is not None and self._loop_is_ours(dev):
            if not force:
                loopdev.refuse_if_busy(dev, f"detaching {self.link}")
            loopdev.detach(dev)  # the loop's last close sends a FUSE fsync: data flushed by the tracker
            deadline = time.monotonic() + _DETACH_WAIT
            while self._loop_is_ours(dev):
                if time.monotonic() > deadline:
                    if force:
                        if self._conn is not None:
                            abort_connection(self._conn)
                        break
                    raise DeviceBusy(f"{dev} was opened while it was being detached; the kernel detaches it at "
                                     "its last close", hint=f"close it and run detach for {self.name} again")
                time.sleep(0.02)
        if self._dead:
            return None
        try:
            self.tracker.flush()
        except BaseException as exc:
            return exc
        return None

    def _loop_is_ours(self, dev: str) -> bool:
        li = loopdev.info(dev)
        return li is not None and self._diskseq is not None and li.diskseq == self._diskseq

    def _end_session(self, lazy: bool, join_timeout: float = _STOP_JOIN_TIMEOUT) -> None:
        """Unmount FUSE and let the libfuse loop end; abort the connection if it does not end in time.

        A worker stuck inside a tracker call keeps libfuse's loop (which joins its workers) from returning,
        so after an abort we stop waiting: the stuck thread is abandoned, the device is already failing I/O.
        """
        if self._thread is None:
            return
        if not self._loop_exited.is_set():
            try:
                loopdev.umount(self.mountpoint, lazy=lazy)
            except OSError as exc:
                log.warning("%s: umount %s: %s; unmounting lazily", self.name, self.mountpoint, exc)
                with contextlib.suppress(OSError):
                    loopdev.umount(self.mountpoint, lazy=True)
            if not self._loop_exited.wait(join_timeout) and self._conn is not None:
                # Another mount namespace may hold a copy of our mount and keep the session alive, or a
                # worker is stuck in the tracker.
                log.warning("%s: FUSE loop still running; aborting connection %d", self.name, self._conn)
                abort_connection(self._conn)
                self._loop_exited.wait(join_timeout)
        m = loopdev.mounted_at(self.mountpoint)
        if m is not None and m.fstype.startswith("fuse"):
            with contextlib.suppress(OSError):
                loopdev.umount(self.mountpoint, lazy=True)
        self._thread.join(join_timeout)

    def _remove_names(self) -> None:
        dev = self.loop_device
        if dev is not None and self.link.is_symlink() and os.readlink(self.link) == dev:
            self.link.unlink()
        if self._state is not None:
            self.state_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()
        if self._lock_file is not None:  # last: the name is free for the next attach from here on
            self._lock_file.release()
            self._lock_file = None

    def _teardown_after_failed_start(self) -> None:
        with self._lock:
            self._phase = "stopping"
        dev = self.loop_device
        if dev is not None and self._loop_is_ours(dev):
            with contextlib.suppress(BatonError):
                loopdev.detach(dev)
        self._end_session(lazy=True)
        if self._thread is not None:
            # Only once our own session existed: before that, the names may belong to a live daemon.
            self._remove_names()
        elif self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None
        with self._lock:
            self._phase = "stopped"
        self._stopped.set()

    def _emergency_stop(self, failure: FrontendFailure) -> None:
        """Fenced, hung or lost session: fail everything from now on and take the device down lazily.
        Runs once, on its own thread (never inside a FUSE handler, which must return promptly)."""
        with self._lock:
            if self._dead:
                return
            self._dead = True
            self._failure = failure
            idle = self._phase in ("new", "stopped")
            if not idle:
                self._phase = "stopping"
        if idle:  # nothing is set up: nothing to take down
            self._stopped.set()
            return

        def run() -> None:
            log.error("%s: shutting the device down: %s", self.name, failure)
            try:
                if self._conn is not None and not self._loop_exited.is_set():
                    abort_connection(self._conn)
                dev = self.loop_device
                if dev is not None and self._loop_is_ours(dev):
                    with contextlib.suppress(BatonError):
                        loopdev.detach(dev)  # lazily, at the last close of a mounted file system
                self._end_session(lazy=True, join_timeout=1.0)  # the connection is aborted already
                self._remove_names()
            except Exception:
                log.exception("%s: error during emergency shutdown", self.name)
            finally:
                with self._lock:
                    self._phase = "stopped"
                self._stopped.set()

        threading.Thread(target=run, name=f"baton-fuse-shutdown-{self.name}", daemon=True).start()

    def _watch(self) -> None:
        assert self.request_timeout is not None
        period = min(1.0, self.request_timeout / 4)
        while not self._stopped.wait(period):
            with self._lock:
                oldest = min(self._inflight.values(), default=None)
            if oldest is not None and time.monotonic() - oldest > self.request_timeout:
                with self._lock:
                    self._stats["watchdog_aborts"] += 1
                self._emergency_stop(FrontendFailure(FailureKind.HUNG, f"a request was stuck in the tracker "
                                                     f"for more than {self.request_timeout:g} s (watchdog)"))
                return

    # -- request handlers (called concurrently from libfuse worker threads) -----------------------------

    def _call(self, kind: str, nbytes: int, fn: Any) -> Any:
        if self._dead:
            raise OSError(errno.EIO, "device shut down")
        token = next(self._tokens)
        with self._lock:
            self._inflight[token] = time.monotonic()
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], len(self._inflight))
        ok = False
        try:
            result = fn()
            ok = True
            return result
        except Fenced as exc:
            with self._lock:
                self._stats["fenced"] += 1
            self._emergency_stop(FrontendFailure(FailureKind.FENCED,
                                                 f"fenced: a newer owner took the disk over ({exc})", exc))
            raise OSError(errno.EIO, "fenced") from exc
        except Exception as exc:
            log.error("%s: %s failed, replying EIO: %r", self.name, kind, exc)
            raise OSError(errno.EIO, str(exc)) from exc
        finally:
            with self._lock:
                del self._inflight[token]
                if ok:
                    self._stats[kind] += 1
                    if kind == "reads":
                        self._stats["bytes_read"] += nbytes
                    elif kind == "writes":
                        self._stats["bytes_written"] += nbytes
                else:
                    self._stats["errors"] += 1

    def _read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.tracker.size - offset))
        if size == 0:
            return b""
        data: bytes = self._call("reads", size, lambda: self.tracker.read(offset, size))
        return data

    def _write(self, offset: int, data: bytes) -> int:
        if offset + len(data) > self.tracker.size:
            raise OSError(errno.ENOSPC, "write beyond the end of the device")
        self._call("writes", len(data), lambda: self.tracker.write(offset, data))
        return len(data)

    def _fsync(self) -> int:
        self._call("fsyncs", 0, self.tracker.flush)
        return 0

    def _fallocate(self, mode: int, offset: int, length: int) -> int:
        if offset < 0 or length <= 0 or offset + length > self.tracker.size:
            raise OSError(errno.EINVAL, "range outside the device")
        if mode & _FALLOC_FL_PUNCH_HOLE:
            # Discard, or write-zeroes that may unmap: reads must return zeroes afterwards (fallocate(2)).
            self._call("punch_holes", 0, lambda: self.tracker.write_zeroes(offset, length, may_trim=True))
        elif mode & _FALLOC_FL_ZERO_RANGE:
            self._call("zero_ranges", 0, lambda: self.tracker.write_zeroes(offset, length, may_trim=False))
        elif mode & ~_FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported")
        # Plain preallocation changes no content: nothing to track.
        return 0

    # -- introspection ----------------------------------------------------------------------------------

    @property
    def state(self) -> State | None:
        return self._state

    def statistics(self) -> dict[str, int]:
        """Request counters: reads/writes/fsyncs/punch_holes/zero_ranges served, bytes, errors (EIO replies),
        fenced, watchdog_aborts, in_flight now and max, running (0/1), max_write negotiated with the kernel,
        io_flusher (1 if the serving threads are marked PR_SET_IO_FLUSHER)."""
        with self._lock:
            out = dict(self._stats)
            out["in_flight"] = len(self._inflight)
            out["running"] = int(self._phase == "running")
        return out


def _probe_read(dev: str, length: int) -> None:
    """Read the first block of ``dev`` with O_DIRECT, proving the whole path answers."""
    length = max(512, length - length % 512)
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT needs
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        n = os.preadv(fd, [buf], 0)
    except OSError as exc:
        raise DeviceError(f"{dev}: the first read failed: {exc.strerror}") from exc
    finally:
        os.close(fd)
        buf.close()
    if n != length:
        raise DeviceError(f"{dev}: short first read ({n} of {length} bytes)")


def _make_operations(mf: ModuleType, fe: FuseFrontend) -> Any:
    """The mfusepy Operations object: a one-file tree, with I/O delegated to ``fe``."""
    path_file = "/" + FILE_NAME
    root_attrs = {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2, "st_uid": 0, "st_gid": 0}

    class Ops(mf.Operations):  # type: ignore[name-defined,misc]
        use_ns = True

        def init_with_config(self, conn: Any, cfg: Any) -> None:
            fe._on_init(conn, cfg)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            if path == "/":
                return root_attrs
            if path == path_file:
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_uid": 0, "st_gid": 0,
                        "st_size": fe.tracker.size, "st_blksize": 4096}
            raise OSError(errno.ENOENT, path)

        def readdir(self, path: str, fh: int) -> list[str]:
            if path != "/":
                raise OSError(errno.ENOTDIR, path)
            return [".", "..", FILE_NAME]

        def open(self, path: str, flags: int) -> int:
            if path != path_file:
                raise OSError(errno.ENOENT, path)
            if flags & os.O_TRUNC:
                # The kernel hands O_TRUNC to us (atomic_o_trunc); the device's size and content stay.
                raise OSError(errno.EPERM, "a Baton device cannot be truncated")
            if mf.fuse_get_context()[0] != 0:
                raise OSError(errno.EACCES, "only root may open a Baton device")
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return fe._read(offset, size)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return fe._write(offset, data)

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            return fe._fsync()

        def flush(self, path: str, fh: int) -> int:
            return 0  # close(), not a barrier: durability comes with fsync

        def release(self, path: str, fh: int) -> int:
            return 0

        def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
            return fe._fallocate(mode, offset, size)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            if length != fe.tracker.size:
                raise OSError(errno.EPERM, "a Baton device cannot be resized")
            return 0

    return Ops()


FRONTEND = FuseFrontend
