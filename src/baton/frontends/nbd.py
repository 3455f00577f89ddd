"""Baton's NBD frontend: one export, served over a unix socket (or TCP when asked), backed by a tracker.

The server speaks the fixed newstyle handshake (NBD_OPT_GO/INFO/EXPORT_NAME/LIST/ABORT/STRUCTURED_REPLY and
LIST/SET_META_CONTEXT) and, in transmission, READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
FAST_ZERO), CACHE (a no-op), DISC and BLOCK_STATUS with two metadata contexts:

* ``base:allocation``: everything is reported as allocated data (status 0); the tracker does not say more.
* ``baton:dirty``: status bit 0 set = the chunk is marked in the change record (like QEMU's
  ``qemu:dirty-bitmap:NAME``). A range the tracker leaves out of its answer is reported dirty: a pull-mode
  backup may copy too much, never too little.

Contract with the tracker (``TrackerLike``, below): every call may block and is made from a worker thread,
concurrently, so the client's queue depth reaches the tracker. A reply is sent only after the tracker call
returned: a WRITE is acknowledged after the tracker marked its chunks and forwarded the data; FUA goes to
``write(fua=True)``; TRIM/WRITE_ZEROES with FUA are followed by ``flush()``; FLUSH calls ``flush()``.

Failure behaviour:

* Any exception from a tracker call fails that one request with EIO (the connection lives on).
* :class:`baton.errors.Fenced` fails the request with EIO *and* shuts the whole server down: no further
  request reaches the tracker (each is failed with EIO), every connection is closed, and
  :meth:`NBDServer.serve_forever` raises the Fenced so the daemon exits. The server never retries.
* A client that breaks the protocol in transmission (bad magic, a WRITE payload over the maximum) is
  disconnected (hard disconnect, as the spec allows); a malformed option gets ``NBD_REP_ERR_INVALID``.

Multi-connection: the server keeps no cache of its own, and ``tracker.flush()`` makes every completed write
durable whichever connection sent it, so NBD_FLAG_CAN_MULTI_CONN is advertised.

Concurrency matrix: one reader thread per connection parses requests and hands them to that connection's
worker threads; replies may leave out of order (the protocol allows it) and are serialised by a per-connection
send lock. One accept thread owns the listening sockets and performs shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from pathlib import Path
from typing import cast

from baton.errors import DeviceBusy, DeviceError, Fenced
from baton.format import nbd_proto as P
from baton.frontends.base import Endpoint, FailureKind, Frontend, FrontendConfig, FrontendFailure

log = logging.getLogger(__name__)

BASE_ALLOCATION = "base:allocation"
BATON_DIRTY = "baton:dirty"
_CONTEXT_IDS = {BASE_ALLOCATION: 1, BATON_DIRTY: 2}  # fixed per server; the spec only needs them unique
CONTEXTS = tuple(_CONTEXT_IDS)  # the metadata context names this frontend offers

RUN_DIR = Path("/run/baton")  # per-disk runtime state; the NBD socket of disk NAME is RUN_DIR/NAME.sock
MAX_PAYLOAD = 32 << 20  # 2^25: the spec says no payload up to this size may be treated as an attack
_MAX_OPTION_DATA = 64 << 10  # option data beyond this is not a real client: disconnect
_MAX_DESCRIPTORS = 1 << 20  # the spec's SHOULD-NOT-exceed per block-status chunk

# Hot-path integers: comparing plain ints is cheaper than IntEnum members in the per-request loop.
_READ, _WRITE, _DISC, _FLUSH = int(P.Cmd.READ), int(P.Cmd.WRITE), int(P.Cmd.DISC), int(P.Cmd.FLUSH)
_TRIM, _CACHE, _ZEROES, _BSTATUS = (
    int(P.Cmd.TRIM),
    int(P.Cmd.CACHE),
    int(P.Cmd.WRITE_ZEROES),
    int(P.Cmd.BLOCK_STATUS),
)
_FUA, _NO_HOLE, _DF = int(P.CmdFlag.FUA), int(P.CmdFlag.NO_HOLE), int(P.CmdFlag.DF)
_REQ_ONE, _FAST_ZERO = int(P.CmdFlag.REQ_ONE), int(P.CmdFlag.FAST_ZERO)
_EIO, _EINVAL, _ENOSPC, _EPERM = (
    int(P.Errno.EIO),
    int(P.Errno.EINVAL),
    int(P.Errno.ENOSPC),
    int(P.Errno.EPERM),
)
_ENOTSUP, _EOVERFLOW, _ESHUTDOWN = int(P.Errno.ENOTSUP), int(P.Errno.EOVERFLOW), int(P.Errno.ESHUTDOWN)
_DONE = int(P.ReplyFlag.DONE)

# Flags each command accepts. FUA is valid on every command once SEND_FUA is advertised (the spec says the
# server MUST accept it, even by ignoring it); DF only when structured replies are negotiated (checked apart).
_ALLOWED_FLAGS = {
    _READ: _FUA | _DF,
    _WRITE: _FUA,
    _DISC: _FUA,
    _FLUSH: _FUA,
    _TRIM: _FUA,
    _CACHE: _FUA,
    _ZEROES: _FUA | _NO_HOLE | _FAST_ZERO,
    _BSTATUS: _FUA | _REQ_ONE,
}
_CMD_NAMES = {int(c): c.name.lower() for c in P.Cmd}
_REQ_KEYS = {c: f"requests_{n}" for c, n in _CMD_NAMES.items()}
_ERR_KEYS = {int(e): f"errors_{e.name.lower()}" for e in P.Errno}
_IOV_BATCH = 512  # parts per sendmsg, below the kernel's IOV_MAX of 1024
_CONN_COUNTERS = (
    "handshakes_failed", "protocol_errors", "bytes_in", "bytes_out", "errors", "requests_unknown",
    *_REQ_KEYS.values(), *_ERR_KEYS.values(),
)  # fmt: skip


def default_socket_path(name: str, run_dir: Path = RUN_DIR) -> Path:
    """Where the NBD socket of the attached disk ``name`` lives unless the caller says otherwise."""
    return Path(run_dir) / f"{name}.sock"


from baton.tracker import TrackerLike  # noqa: E402 - the protocol lives with the tracker

__all__ = ["FRONTEND", "NBDServer", "TrackerLike", "default_socket_path"]


def _listening(path: Path) -> bool:
    """Whether a server accepts connections on the unix socket ``path`` (a dead server's socket refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class _Disconnect(Exception):
    """Internal: end this connection now (EOF, protocol violation, NBD_OPT_ABORT, server stopping)."""


def dirty_descriptors(
    runs: list[tuple[int, int, bool]], offset: int, length: int, *, req_one: bool = False
) -> list[tuple[int, int]]:
    """(length, flags) descriptors for ``baton:dirty`` over [offset, offset+length) from tracker runs.

    Runs are clipped to the range; adjacent descriptors with the same state are merged. Conservative by
    construction (never under-report): a byte is reported clean only if some run covers it and no run covering
    it says dirty; bytes no run covers are dirty. At most 2^20 descriptors (the spec's limit), one with
    ``req_one``. ``length`` must be > 0.
    """
    end = offset + length
    # Sweep line over clipped run boundaries: +1/-1 on the number of covering clean and dirty runs.
    events: dict[int, list[int]] = {offset: [0, 0], end: [0, 0]}
    for start, n, dirty in runs:
        s, e = max(start, offset), min(start + n, end)
        if e > s:
            events.setdefault(s, [0, 0])[dirty] += 1
            events.setdefault(e, [0, 0])[dirty] -= 1
    out: list[tuple[int, int]] = []
    clean_cover = dirty_cover = 0
    points = sorted(events)
    for a, b in itertools.pairwise(points):
        clean_cover += events[a][0]
        dirty_cover += events[a][1]
        flags = 0 if clean_cover and not dirty_cover else P.STATE_DIRTY
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + b - a, flags)
        else:
            if req_one and out:
                break
            out.append((b - a, flags))
    return out[:_MAX_DESCRIPTORS]


class NBDServer(Frontend):
    """An NBD server for one export backed by ``tracker``: the ``nbd`` frontend.

    ``export_name`` is the canonical name; the empty name (the "default export") also selects it. Exactly the
    transports given are opened: ``unix_path`` (socket created mode 0600; a stale socket left by a dead server
    is replaced, a live one raises :class:`DeviceBusy`) and/or ``tcp=(host, port)`` (bound to that address
    only; port 0 picks one, see :attr:`tcp_address`). ``workers`` threads per connection call the tracker, so
    up to that many requests of one connection are in flight at once; ``workers=0`` runs each request inline
    in the reader thread (less CPU, but queue depth 1: only for a tracker that never blocks).

    Lifecycle (:class:`baton.frontends.base.Frontend`): :meth:`start` returns once listening; :meth:`wait`
    returns once stopped; :meth:`serve_forever` blocks until :meth:`stop` (returns) or a fence (raises
    :class:`Fenced`); :meth:`stop` drains in-flight requests (bounded by ``drain_timeout`` seconds), closes
    every connection and removes the socket file. Usable as a context manager. Failures: ``FENCED`` (a tracker
    call raised Fenced), ``DIED`` (the accept loop failed, a bug: logged).
    """

    kind = "nbd"

    @classmethod
    def create(cls, tracker: TrackerLike, config: FrontendConfig) -> NBDServer:
        """The export ``config.name`` on RUN_DIR/NAME.sock, or on ``config.tcp`` only when that is given."""
        unix_path = None if config.tcp else default_socket_path(config.name, config.run_dir)
        return cls(tracker, export_name=config.name, unix_path=unix_path, tcp=config.tcp)

    @classmethod
    def cleanup_stale(cls, config: FrontendConfig) -> list[str]:
        """Remove RUN_DIR/NAME.sock when no server listens on it any more; DeviceBusy while one does."""
        path = default_socket_path(config.name, config.run_dir)
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                return []
        except FileNotFoundError:
            return []
        if _listening(path):
            raise DeviceBusy(f"an NBD server still listens on {path}",
                             hint=f"detach it with `baton detach {config.name}`, or stop that process")
        path.unlink(missing_ok=True)
        return [f"removed {path}"]

    def __init__(
        self,
        tracker: TrackerLike,
        export_name: str = "",
        *,
        unix_path: str | os.PathLike[str] | None = None,
        tcp: tuple[str, int] | None = None,
        description: str = "",
        read_only: bool = False,
        workers: int = 16,
        max_connections: int = 64,
        min_block_size: int = 1,
        preferred_block_size: int = 4096,
        max_payload: int = MAX_PAYLOAD,
        handshake_timeout: float = 30.0,
        drain_timeout: float = 10.0,
    ) -> None:
        if unix_path is None and tcp is None:
            raise ValueError("NBDServer needs a unix_path or an explicit tcp address")
        if workers < 0:
            raise ValueError("workers must be >= 0")
        for name, v in (("min_block_size", min_block_size), ("preferred_block_size", preferred_block_size)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if not min_block_size <= 65536 or preferred_block_size < max(min_block_size, 512):
            raise ValueError("block sizes: min <= 64 KiB and preferred >= max(min, 512) are required")
        if not preferred_block_size <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in [preferred_block_size, {MAX_PAYLOAD}]")
        P.encode_string(export_name)  # ValueError now rather than at the first client
        P.encode_string(description)
        self.tracker = tracker
        self.export_name = export_name
        self.description = description
        self.read_only = read_only
        self.workers = workers
        self.max_connections = max_connections
        self.min_block_size = min_block_size
        self.preferred_block_size = preferred_block_size
        self.max_payload = max_payload
        self.handshake_timeout = handshake_timeout
        self.drain_timeout = drain_timeout
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self._tcp_request = tcp
        self.tcp_address: tuple[str, int] | None = None

        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self._unix_ino: tuple[int, int] | None = None
        self._conns: set[_Connection] = set()
        self._conn_seq = 0
        self._accept_thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._started = False
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_requested = False  # stop() was called: the server did not stop by itself
        self._endpoint: Endpoint | None = None
        self._fenced: Fenced | None = None
        self._stats: dict[str, int] = dict.fromkeys(
            ("connections_total", "connections_refused", "fenced", *_CONN_COUNTERS), 0
        )

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Endpoint:
        """Open the listening sockets and start accepting; returns the endpoint once clients can connect.

        Raises DeviceBusy if another live server owns ``unix_path``, DeviceError if the path is not a socket,
        OSError if a TCP address cannot be bound. On failure nothing is left open.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("NBDServer.start() called twice")
            self._started = True
        try:
            if self.unix_path is not None:
                self._listeners.append(self._bind_unix(self.unix_path))
            if self._tcp_request is not None:
                self._listeners.append(self._bind_tcp(self._tcp_request))
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            self._close_listeners()
            raise
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accept_thread.start()
        log.info("NBD export %r listening on %s", self.export_name, self.describe_address())
        tcp = None
        if self.tcp_address is not None:
            host, port = self.tcp_address
            tcp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._endpoint = Endpoint(socket=str(self.unix_path) if self.unix_path is not None else None, tcp=tcp)
        return self._endpoint

    @property
    def endpoint(self) -> Endpoint | None:
        return self._endpoint

    @property
    def ready(self) -> bool:
        return self._started and not self._stopping.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stopped (by :meth:`stop`, a fence, or a failed accept loop); True if it did."""
        return self._stopped.wait(timeout)

    @property
    def failure(self) -> FrontendFailure | None:
        if self._fenced is not None:
            return FrontendFailure(FailureKind.FENCED, f"fenced: {self._fenced}", self._fenced)
        if self._stopped.is_set() and not self._stop_requested:
            return FrontendFailure(FailureKind.DIED, f"the NBD server of {self.export_name!r} stopped by itself "
                                   "(its accept loop failed; see the log)")
        return None

    def serve_forever(self) -> None:
        """Block until the server stops. Returns after :meth:`stop`; raises :class:`Fenced` after a fence."""
        if not self._started:
            self.start()
        self._stopped.wait()
        if self._fenced is not None:
            raise self._fenced

    def stop(self, force: bool = False, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish, close all connections, remove the socket file.

        Requests that arrive meanwhile are failed with ESHUTDOWN. Waits up to ``timeout`` seconds (default:
        ``drain_timeout`` + 5) for the teardown. Safe to call more than once and from any thread. Connected
        clients never make it refuse, so ``force`` changes nothing here.
        """
        self._stop_requested = True
        self._begin_stop()
        if threading.current_thread() is self._accept_thread:
            return
        if self._accept_thread is not None:
            self._stopped.wait(self.drain_timeout + 5 if timeout is None else timeout)
        else:
            self._stopped.set()

    def __enter__(self) -> NBDServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def fenced(self) -> Fenced | None:
        """The Fenced that shut this server down, if any."""
        return self._fenced

    def describe_address(self) -> str:
        """Human-readable listening addresses (also an NBD URI for each)."""
        parts = []
        if self.unix_path is not None:
            parts.append(f"nbd+unix:///{self.export_name}?socket={self.unix_path}")
        if self.tcp_address is not None:
            host, port = self.tcp_address
            host = f"[{host}]" if ":" in host else host  # IPv6 literals are bracketed in URIs
            parts.append(f"nbd://{host}:{port}/{self.export_name}")
        return ", ".join(parts)

    def statistics(self) -> dict[str, int]:
        """Counters over the server's life: connections_total/open/refused, handshakes_failed,
        protocol_errors, requests_<cmd>, bytes_in (write payload), bytes_out (read payload), errors and
        errors_<errno> (error replies sent), fenced (0/1)."""
        with self._lock:  # _forget folds a closing connection in under this lock: no double counting
            out = dict(self._stats)
            for c in self._conns:
                for k, v in c.stats.copy().items():  # dict.copy is atomic under the GIL
                    out[k] += v
            out["connections_open"] = len(self._conns)
        out["fenced"] = int(self._fenced is not None)
        return out

    # ------------------------------------------------------------------------------------------ internals
    def _bind_unix(self, path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise DeviceError(
                    f"{path} exists and is not a socket", hint="remove it or choose another path"
                )
            if _listening(path):
                raise DeviceBusy(
                    f"another NBD server is already listening on {path}",
                    hint="detach that export first, or choose another socket path",
                )
            path.unlink(missing_ok=True)  # nobody listens: a stale socket of a dead server
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode (minus umask): set it before bind so
            # no other user can connect even for an instant; the chmod after bind is belt and braces.
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(str(path))
            os.chmod(path, 0o600)
            st = path.lstat()
            self._unix_ino = (st.st_dev, st.st_ino)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind_tcp(self, addr: tuple[str, int]) -> socket.socket:
        host, port = addr
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        family, _, _, _, sockaddr = info[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
            bound = sock.getsockname()
            self.tcp_address = (str(bound[0]), int(bound[1]))
        except BaseException:
            sock.close()
            raise
        return sock

    def _close_listeners(self) -> None:
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        if self.unix_path is not None and self._unix_ino is not None:
            with contextlib.suppress(OSError):
                st = self.unix_path.lstat()
                if (st.st_dev, st.st_ino) == self._unix_ino:  # only our own socket, never a successor's
                    self.unix_path.unlink()
            self._unix_ino = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _begin_stop(self) -> None:
        self._stopping.set()
        with self._lock:
            wake = self._wake_w
            if wake >= 0:
                with contextlib.suppress(OSError):
                    os.write(wake, b"x")

    def _on_fenced(self, exc: Fenced) -> None:
        """A tracker call found a newer owner: stop everything (the accept thread does the teardown)."""
        with self._lock:
            first = self._fenced is None
            if first:
                self._fenced = exc
        if first:
            log.error("NBD export %r fenced (%s): shutting the frontend down", self.export_name, exc)
        self._begin_stop()

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for s in self._listeners:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r or self._stopping.is_set():
                        continue
                    lsock = key.fileobj
                    assert isinstance(lsock, socket.socket)
                    try:
                        conn, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    self._admit(conn)
        except Exception:  # a bug here must not leave clients hanging: tear down and report
            log.exception("NBD accept loop failed")
        finally:
            sel.close()
            self._teardown()

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if len(self._conns) >= self.max_connections:
                self._stats["connections_refused"] += 1
                sock.close()
                return
            self._conn_seq += 1
            self._stats["connections_total"] += 1
            conn = _Connection(self, sock, self._conn_seq)
            self._conns.add(conn)
        conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        """Fold a closed connection's counters into the server's."""
        with self._lock:
            if conn in self._conns:
                self._conns.discard(conn)
                for k, v in conn.stats.items():
                    self._stats[k] += v

    def _teardown(self) -> None:
        with self._lock:
            conns = list(self._conns)
        # Stop reading new requests; each reader then drains its workers (their replies still go out) and
        # closes. A fenced server fails what is queued with EIO instead of calling the tracker.
        for c in conns:
            c.shutdown_read()
        deadline = time.monotonic() + self.drain_timeout  # one budget for all, not one per connection
        for c in conns:
            c.thread.join(max(0.0, deadline - time.monotonic()))
            if c.thread.is_alive():
                log.warning("NBD connection %d did not drain in %.0fs: closing it", c.seq, self.drain_timeout)
                c.kill()
        with self._lock:
            self._close_listeners()
        self._stopped.set()
        log.info("NBD export %r stopped", self.export_name)

    # Shared by connections ---------------------------------------------------------------------------
    def transmission_flags(self, structured: bool) -> int:
        """Transmission flags advertised for this export (DF only with structured replies)."""
        f = P.TransmissionFlag
        flags = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA | f.CAN_MULTI_CONN
        if self.read_only:
            flags |= f.READ_ONLY
        else:
            flags |= f.SEND_TRIM | f.SEND_WRITE_ZEROES | f.SEND_FAST_ZERO
        if structured:
            flags |= f.SEND_DF
        return int(flags)

    def is_our_export(self, name: str) -> bool:
        return name in ("", self.export_name)


class _Connection:
    """One client: handshake, then a reader loop feeding ``server.workers`` worker threads."""

    def __init__(self, server: NBDServer, sock: socket.socket, seq: int) -> None:
        self.server = server
        self.tracker = server.tracker
        self.sock = sock
        self.seq = seq
        # A buffered reader: request headers come out of one recv() per batch, not one syscall each.
        self.rfile = cast(io.BufferedReader, sock.makefile("rb", buffering=256 * 1024))
        self.send_lock = threading.Lock()
        self.dead = False  # a send failed: no further replies
        self.pending: list[bytes | memoryview] = []  # replies queued for the current sender (send_lock)
        self.sending = False  # a thread is writing self.pending to the socket (send_lock)
        self.structured = False
        self.no_zeroes = False
        self.contexts: list[tuple[int, str]] = []  # (id, name) selected by SET_META_CONTEXT
        self.queue: queue.SimpleQueue[tuple[int, int, int, int, int, bytes | None] | None] = (
            queue.SimpleQueue()
        )
        self.workers: list[threading.Thread] = []
        # Every key exists from the start, so statistics() can copy the dict while threads update it.
        self.stats: dict[str, int] = dict.fromkeys(_CONN_COUNTERS, 0)
        self.thread = threading.Thread(target=self.run, name=f"nbd-conn-{seq}", daemon=True)

    def count(self, key: str, n: int = 1) -> None:
        # Each key has one writer at a time: request/bytes_in keys only the reader thread, the others only
        # under send_lock. So no extra lock on the per-request path.
        self.stats[key] += n

    # --------------------------------------------------------------------------------------------- control
    def shutdown_read(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            try:
                self.sock.settimeout(self.server.handshake_timeout)
                if not self.handshake():
                    return
                self.sock.settimeout(None)
            except (_Disconnect, OSError, ValueError) as e:
                with self.send_lock:
                    self.count("handshakes_failed")
                log.debug("NBD connection %d: handshake ended: %s", self.seq, e)
                return
            self.transmission()
        except Exception:
            log.exception("NBD connection %d failed", self.seq)
        finally:
            self.close()

    def close(self) -> None:
        for _ in self.workers:
            self.queue.put(None)
        deadline = time.monotonic() + self.server.drain_timeout
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))
        with self.send_lock:
            self.dead = True
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.server._forget(self)

    # -------------------------------------------------------------------------------------------- handshake
    def read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if data is None or len(data) != n:
            raise _Disconnect("client closed the connection")
        return data

    def send_option_reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OptionReply(option, rtype, data).pack())

    def handshake(self) -> bool:
        """Fixed newstyle negotiation. True when transmission begins; False after NBD_OPT_ABORT."""
        srv = self.server
        self.sock.sendall(
            P.HANDSHAKE.pack(
                P.NBDMAGIC, P.IHAVEOPT, P.HandshakeFlag.FIXED_NEWSTYLE | P.HandshakeFlag.NO_ZEROES
            )
        )
        (cflags,) = P.CLIENT_FLAGS.unpack(self.read_exact(4))
        # int() first: ~ on an IntFlag complements only the defined bits, which would hide unknown ones.
        if cflags & ~int(P.ClientFlag.C_FIXED_NEWSTYLE | P.ClientFlag.C_NO_ZEROES):
            raise _Disconnect(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.ClientFlag.C_NO_ZEROES)
        while True:
            hdr = P.OptionHeader.unpack(self.read_exact(P.OPTION_HEADER.size))
            if hdr.length > _MAX_OPTION_DATA:
                raise _Disconnect(f"option {hdr.option} with {hdr.length} bytes of data")
            data = self.read_exact(hdr.length) if hdr.length else b""
            opt = hdr.option
            if opt == P.Opt.EXPORT_NAME:
                name = P.decode_string(data, "export name")
                if not srv.is_our_export(name) or srv._stopping.is_set():
                    raise _Disconnect(f"EXPORT_NAME {name!r} refused")  # this option cannot carry an error
                size = srv.tracker.size
                self.sock.sendall(
                    P.pack_export_name_reply(size, srv.transmission_flags(self.structured), self.no_zeroes)
                )
                return True
            if opt == P.Opt.ABORT:
                with contextlib.suppress(OSError):
                    self.send_option_reply(opt, P.Rep.ACK)
                return False
            if srv._stopping.is_set():
                self.send_option_reply(opt, P.Rep.ERR_SHUTDOWN, b"server is shutting down")
                continue
            try:
                if self.option(opt, data):
                    return True
            except ValueError as e:
                self.send_option_reply(opt, P.Rep.ERR_INVALID, str(e).encode()[:1024])

    def option(self, opt: int, data: bytes) -> bool:
        """Answer one option (other than EXPORT_NAME/ABORT). True if transmission begins (a successful GO)."""
        srv = self.server
        if opt == P.Opt.LIST:
            if data:
                raise ValueError("NBD_OPT_LIST carries no data")
            self.send_option_reply(opt, P.Rep.SERVER, P.pack_server_reply(srv.export_name, srv.description))
            self.send_option_reply(opt, P.Rep.ACK)
        elif opt in (P.Opt.INFO, P.Opt.GO):
            req = P.InfoRequest.unpack(data)
            if not srv.is_our_export(req.name):
                self.send_option_reply(opt, P.Rep.ERR_UNKNOWN, f"no export named {req.name!r}".encode())
                return False
            flags = srv.transmission_flags(self.structured)
            self.send_option_reply(opt, P.Rep.INFO, P.pack_info_export(srv.tracker.size, flags))
            asked = set(req.requests)
            if P.Info.NAME in asked:
                self.send_option_reply(opt, P.Rep.INFO, P.pack_info_string(P.Info.NAME, srv.export_name))
            if P.Info.DESCRIPTION in asked and srv.description:
                self.send_option_reply(
                    opt, P.Rep.INFO, P.pack_info_string(P.Info.DESCRIPTION, srv.description)
                )
            if P.Info.BLOCK_SIZE in asked:
                self.send_option_reply(
                    opt,
                    P.Rep.INFO,
                    P.pack_info_block_size(srv.min_block_size, srv.preferred_block_size, srv.max_payload),
                )
            self.send_option_reply(opt, P.Rep.ACK)
            return opt == P.Opt.GO
        elif opt == P.Opt.STRUCTURED_REPLY:
            if data:
                raise ValueError("NBD_OPT_STRUCTURED_REPLY carries no data")
            self.structured = True
            self.send_option_reply(opt, P.Rep.ACK)
        elif opt in (P.Opt.LIST_META_CONTEXT, P.Opt.SET_META_CONTEXT):
            self.meta_context(opt, data)
        else:  # STARTTLS (no TLS: NOTLS mode), EXTENDED_HEADERS and anything unknown
            self.send_option_reply(opt, P.Rep.ERR_UNSUP, f"option {opt} is not supported".encode())
        return False

    def meta_context(self, opt: int, data: bytes) -> None:
        listing = opt == P.Opt.LIST_META_CONTEXT
        if not listing:
            self.contexts = []  # SET replaces the selection even when it fails
        if not self.structured:
            raise ValueError("negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts")
        req = P.MetaContextRequest.unpack(data)
        if not self.server.is_our_export(req.export_name):
            self.send_option_reply(opt, P.Rep.ERR_UNKNOWN, f"no export named {req.export_name!r}".encode())
            return
        chosen: list[str] = []
        if listing and not req.queries:
            chosen = list(_CONTEXT_IDS)
        for q in req.queries:
            ns, colon, leaf = q.partition(":")
            if not colon or not ns:
                raise ValueError(f"query {q!r} has no namespace")
            for name in _CONTEXT_IDS:
                exact = q == name
                wildcard = listing and leaf == "" and name.startswith(ns + ":")  # "base:" lists base:*
                if (exact or wildcard) and name not in chosen:
                    chosen.append(name)
        for name in chosen:
            cid = 0 if listing else _CONTEXT_IDS[name]  # ids in a LIST reply are reserved: zero
            self.send_option_reply(opt, P.Rep.META_CONTEXT, P.pack_meta_context_reply(cid, name))
        if not listing:
            self.contexts = [(_CONTEXT_IDS[n], n) for n in chosen]
        self.send_option_reply(opt, P.Rep.ACK)

    # ----------------------------------------------------------------------------------------- transmission
    def transmission(self) -> None:
        srv = self.server
        for i in range(srv.workers):
            t = threading.Thread(target=self.worker, name=f"nbd-conn-{self.seq}-w{i}", daemon=True)
            t.start()
            self.workers.append(t)
        size = srv.tracker.size
        rfile, put, unpack, hsize = self.rfile, self.queue.put, P.REQUEST.unpack, P.REQUEST.size
        max_payload, min_block = srv.max_payload, srv.min_block_size
        structured, read_only = self.structured, srv.read_only
        inline = srv.workers == 0
        while True:
            try:
                hdr = rfile.read(hsize)
            except OSError:
                return
            if not hdr or len(hdr) != hsize:
                return  # EOF (a hard disconnect by the client, or our own shutdown_read)
            magic, flags, cmd, cookie, offset, length = unpack(hdr)
            if magic != P.REQUEST_MAGIC:
                self.protocol_error(f"bad request magic {magic:#x}")
                return
            self.count(_REQ_KEYS.get(cmd, "requests_unknown"))
            data: bytes | None = None
            if cmd == _WRITE:
                if length > max_payload:
                    self.protocol_error(f"WRITE payload of {length} bytes exceeds {max_payload}")
                    return
                data = rfile.read(length)
                if data is None or len(data) != length:
                    return
                self.count("bytes_in", length)
            elif cmd == _DISC:
                return  # close() lets the workers finish what is queued, then closes
            # Validate here, cheaply, so workers only see well-formed requests.
            err = 0
            allowed = _ALLOWED_FLAGS.get(cmd)
            if allowed is None:
                err, why = _EINVAL, f"unknown command {cmd}"
            elif flags & ~allowed or (flags & _DF and not structured):
                err, why = _EINVAL, f"flags {flags:#x} not valid for {_CMD_NAMES[cmd]}"
            elif read_only and cmd in (_WRITE, _TRIM, _ZEROES):
                err, why = _EPERM, "the export is read-only"
            elif cmd == _FLUSH:
                if offset or length:
                    err, why = _EINVAL, "FLUSH must have offset and length 0"
            elif offset + length > size:
                err = _ENOSPC if cmd in (_WRITE, _ZEROES) else _EINVAL
                why = f"range {offset}+{length} beyond the {size}-byte export"
            elif min_block > 1 and (offset | length) & (min_block - 1) and cmd != _BSTATUS:
                err, why = _EINVAL, f"range {offset}+{length} not aligned to {min_block}"
            elif cmd == _READ and length > max_payload:
                err = _EOVERFLOW if structured else _EINVAL
                why = f"READ of {length} bytes exceeds {max_payload}"
            elif cmd == _BSTATUS and (not self.contexts or length == 0):
                err, why = _EINVAL, "BLOCK_STATUS needs a selected metadata context and a length"
            elif cmd == _ZEROES and flags & _FAST_ZERO:
                # The tracker contract cannot tell whether zeroing is cheaper than writing, and the spec says
                # to fail fast with ENOTSUP then, leaving the export untouched (nothing is marked dirty).
                err, why = _ENOTSUP, "fast zeroing is not offered"
            if err:
                self.reply_error(cookie, cmd, err, why)
                continue
            if srv._stopping.is_set():
                if srv.fenced is not None:
                    self.reply_error(cookie, cmd, _EIO, "fenced: a newer owner holds this disk")
                else:
                    self.reply_error(cookie, cmd, _ESHUTDOWN, "server is shutting down")
                continue
            if inline:
                self.execute(flags, cmd, cookie, offset, length, data)
            else:
                put((flags, cmd, cookie, offset, length, data))

    def protocol_error(self, why: str) -> None:
        log.warning("NBD connection %d: %s: disconnecting", self.seq, why)
        with self.send_lock:
            self.count("protocol_errors")

    def worker(self) -> None:
        get, execute = self.queue.get, self.execute
        while True:
            item = get()
            if item is None:
                return
            try:
                execute(*item)
            except Exception:  # a bug in reply building: answer EIO without a message, keep the worker
                log.exception("NBD connection %d: request failed unexpectedly", self.seq)
                self.reply_error(item[2], item[1], _EIO, "")

    def execute(
        self, flags: int, cmd: int, cookie: int, offset: int, length: int, data: bytes | None
    ) -> None:
        """Run one validated request against the tracker and send its reply. Never raises for tracker errors:
        they become EIO replies, and a Fenced also shuts the server down."""
        tracker, srv = self.tracker, self.server
        if srv._fenced is not None:
            self.reply_error(cookie, cmd, _EIO, "fenced: a newer owner holds this disk")
            return
        try:
            if cmd == _READ:
                self.reply_read(cookie, offset, length, tracker.read(offset, length) if length else b"")
                return
            if cmd == _WRITE:
                assert data is not None
                if length:
                    tracker.write(offset, data, fua=bool(flags & _FUA))
            elif cmd == _FLUSH:
                tracker.flush()
            elif cmd == _TRIM:
                if length:
                    tracker.discard(offset, length)
                    if flags & _FUA:
                        tracker.flush()
            elif cmd == _ZEROES:
                if length:
                    tracker.write_zeroes(offset, length, may_trim=not flags & _NO_HOLE)
                    if flags & _FUA:
                        tracker.flush()
            elif cmd == _BSTATUS:
                self.reply_block_status(cookie, flags, offset, length)
                return
            # _CACHE: a hint we may ignore; the tracker has no cache to warm.
            self.send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie))
        except Fenced as e:
            self.reply_error(cookie, cmd, _EIO, f"fenced: {e}")
            srv._on_fenced(e)
        except Exception as e:
            log.warning("NBD %s %d+%d failed: %r", _CMD_NAMES.get(cmd), offset, length, e)
            self.reply_error(cookie, cmd, _EIO, f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------------------------------------ replies
    def send(self, *parts: bytes | memoryview, out_bytes: int = 0, error: int = 0) -> None:
        """Queue one complete reply and make sure it goes out; count it.

        Reply combining: the first thread to find nobody sending becomes the sender and writes every queued
        reply (its own and those added meanwhile) with one sendmsg per batch; other threads just queue and
        return. Replies are never interleaved byte-wise, and the syscall cost is shared under load.
        """
        with self.send_lock:
            if out_bytes:
                self.count("bytes_out", out_bytes)
            if error:
                self.count("errors")
                self.count(_ERR_KEYS[error])
            if self.dead:
                return
            self.pending.extend(parts)
            if self.sending:
                return
            self.sending = True
        while True:
            with self.send_lock:
                batch = self.pending[:_IOV_BATCH]
                del self.pending[:_IOV_BATCH]
                if not batch or self.dead:
                    self.sending = False
                    self.pending.clear()
                    return
            try:
                if len(batch) == 1:
                    self.sock.sendall(batch[0])
                else:
                    self._sendmsg_all(batch)
            except OSError as e:
                with self.send_lock:
                    self.dead = True
                log.debug("NBD connection %d: send failed: %s", self.seq, e)
                self.kill()

    def _sendmsg_all(self, parts: list[bytes | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            n = self.sock.sendmsg(views)
            while n and views:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    def reply_read(self, cookie: int, offset: int, length: int, data: bytes) -> None:
        if len(data) != length:
            raise OSError(errno.EIO, f"tracker returned {len(data)} of {length} bytes")
        if self.structured:
            if length == 0:
                self.send(
                    P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, _DONE, P.ReplyType.NONE, cookie, 0)
                )
                return
            hdr = P.STRUCTURED_REPLY.pack(
                P.STRUCTURED_REPLY_MAGIC, _DONE, P.ReplyType.OFFSET_DATA, cookie, 8 + length
            ) + P.OFFSET_DATA.pack(offset)
        else:
            hdr = P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie)
        if length <= 65536:
            self.send(hdr + data, out_bytes=length)  # one small copy beats a scatter-gather syscall
        else:
            self.send(hdr, data, out_bytes=length)

    def reply_error(self, cookie: int, cmd: int, error: int, message: str) -> None:
        if self.structured:
            # Exception texts are arbitrary: strip what the wire forbids (NUL) and bound the length.
            payload = P.ErrorChunk(error, message[:512].replace("\0", "?")).pack()
            hdr = P.STRUCTURED_REPLY.pack(
                P.STRUCTURED_REPLY_MAGIC, _DONE, P.ReplyType.ERROR, cookie, len(payload)
            )
            self.send(hdr + payload, error=error)
        else:
            self.send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie), error=error)

    def reply_block_status(self, cookie: int, flags: int, offset: int, length: int) -> None:
        req_one = bool(flags & _REQ_ONE)
        chunks: list[bytes] = []
        for cid, name in self.contexts:
            if name == BASE_ALLOCATION:
                extents = [(length, 0)]  # allocated data, contents unknown: always a safe answer
            else:
                runs = self.tracker.dirty_extents(offset, length)
                extents = dirty_descriptors(runs, offset, length, req_one=req_one)
            chunks.append(P.BlockStatusChunk(cid, tuple(extents)).pack())
        out: list[bytes] = []
        for i, payload in enumerate(chunks):
            last = i == len(chunks) - 1
            out.append(
                P.STRUCTURED_REPLY.pack(
                    P.STRUCTURED_REPLY_MAGIC,
                    _DONE if last else 0,
                    P.ReplyType.BLOCK_STATUS,
                    cookie,
                    len(payload),
                )
            )
            out.append(payload)
        self.send(b"".join(out))


FRONTEND = NBDServer
