"""The NBD server against a hand-written raw-socket client (struct layouts written out here, independently of
baton.format.nbd_proto, so a codec bug cannot hide behind itself) and the file-backed fake tracker."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.errors import DeviceBusy, DeviceError, Fenced
from baton.frontends.nbd import NBDServer, dirty_descriptors
from baton.testing.fake_tracker import FakeTracker

SIZE = 4 << 20
CHUNK = 64 << 10
TIMEOUT = 10.0

# --- independent wire constants (values from the NBD protocol specification) ---------------------------
NBDMAGIC, IHAVEOPT, REPMAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQ_MAGIC, SIMPLE_MAGIC, STRUCT_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BSTATUS = 0, 1, 2, 3, 4, 5, 6, 7
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, ENOTSUP, ESHUTDOWN = 1, 5, 22, 28, 95, 108
T_NONE, T_DATA, T_BSTATUS, T_ERROR = 0, 1, 5, 32769


class Client:
    """A minimal NBD client speaking raw bytes."""

    def __init__(self, addr: str | tuple[str, int]) -> None:
        fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(addr)
        self.structured = False
        self.reads: dict[int, int] = {}
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = self.sock.recv(n - len(buf))
            if not more:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += more
        return buf

    def greet(self, cflags: int = 3) -> int:
        magic, ihaveopt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", cflags))
        return hflags

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option, collect replies up to the final one (ACK or an error)."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, ropt, rtype, rlen = struct.unpack(">QIII", self.recv(20))
            assert magic == REPMAGIC and ropt == opt
            out.append((rtype, self.recv(rlen) if rlen else b""))
            if rtype == REP_ACK or rtype & 2**31:
                return out

    @staticmethod
    def info_data(name: str, reqs: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(reqs)) + b"".join(
            struct.pack(">H", r) for r in reqs
        )

    @staticmethod
    def meta_data(name: str, queries: tuple[str, ...]) -> bytes:
        raw = name.encode()
        out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q.encode())) + q.encode()
        return out

    def go(self, name: str = "", *, structured: bool = True, contexts: tuple[str, ...] = ()) -> tuple[int, int]:
        self.greet()
        if structured:
            assert self.option(OPT_STRUCTURED) == [(REP_ACK, b"")]
            self.structured = True
        if contexts:
            replies = self.option(OPT_SET_META, self.meta_data(name, contexts))
            assert replies[-1][0] == REP_ACK
        replies = self.option(OPT_GO, self.info_data(name))
        assert replies[-1] == (REP_ACK, b""), replies
        infos = [d for t, d in replies if t == REP_INFO and d[:2] == b"\0\0"]
        _, size, tflags = struct.unpack(">HQH", infos[0])
        return size, tflags

    def send(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> int:
        self.cookie += 1
        if cmd == WRITE:
            length = len(data)
        if cmd == READ:
            self.reads[self.cookie] = length
        self.sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, self.cookie, offset, length) + data)
        return self.cookie

    def reply(self) -> dict[str, Any]:
        """One complete reply: {'cookie', 'error', 'data', 'chunks'} (chunks: list of (type, payload))."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            n = self.reads.pop(cookie, 0)
            data = self.recv(n) if n and not error else b""
            return {"cookie": cookie, "error": error, "data": data, "chunks": [], "simple": True}
        assert magic == STRUCT_MAGIC, hex(magic)
        chunks, error, data = [], 0, b""
        while True:
            flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length) if length else b""
            chunks.append((ctype, payload))
            if ctype == T_ERROR:
                error = struct.unpack(">I", payload[:4])[0]
            elif ctype == T_DATA:
                data += payload[8:]
            if flags & 1:
                self.reads.pop(cookie, None)
                return {"cookie": cookie, "error": error, "data": data, "chunks": chunks, "simple": False}
            (magic,) = struct.unpack(">I", self.recv(4))
            assert magic == STRUCT_MAGIC

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> dict[str, Any]:
        cookie = self.send(cmd, offset, length, flags, data)
        r = self.reply()
        assert r["cookie"] == cookie
        return r


# --- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[FakeTracker]:
    t = FakeTracker(tmp_path / "disk.img", SIZE, chunk_size=CHUNK)
    yield t
    t.close()


@pytest.fixture
def server(tracker: FakeTracker, tmp_path: Path) -> Iterator[NBDServer]:
    s = NBDServer(tracker, "disk1", unix_path=tmp_path / "run" / "disk1.sock", description="test disk", workers=4)
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=TIMEOUT)
    # No thread of this server may outlive stop(): connection, worker and accept threads all end.
    for t in threading.enumerate():
        if t.name.startswith("nbd-"):
            t.join(TIMEOUT)
            assert not t.is_alive(), f"thread {t.name} survived stop()"


def connect(server: NBDServer) -> Client:
    return Client(str(server.unix_path))


# --- handshake -------------------------------------------------------------------------------------------
def test_socket_is_private_and_removed_on_stop(server: NBDServer) -> None:
    path = server.unix_path
    assert path is not None
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    server.stop(timeout=TIMEOUT)
    assert not path.exists()


def test_list_unknown_options_and_abort(server: NBDServer) -> None:
    c = connect(server)
    assert c.greet() == 3  # FIXED_NEWSTYLE | NO_ZEROES
    replies = c.option(OPT_LIST)
    assert [t for t, _ in replies] == [REP_SERVER, REP_ACK]
    (nlen,) = struct.unpack(">I", replies[0][1][:4])
    assert replies[0][1][4 : 4 + nlen] == b"disk1" and replies[0][1][4 + nlen :] == b"test disk"
    assert c.option(OPT_LIST, b"x")[-1][0] == ERR_INVALID
    assert c.option(99, b"abc")[-1][0] == ERR_UNSUP
    assert c.option(OPT_STARTTLS)[-1][0] == ERR_UNSUP
    assert c.option(OPT_ABORT) == [(REP_ACK, b"")]
    assert c.sock.recv(1) == b""  # server closed
    c.close()


def test_info_and_go(server: NBDServer) -> None:
    c = connect(server)
    c.greet()
    assert c.option(OPT_INFO, c.info_data("nope"))[-1][0] == ERR_UNKNOWN
    replies = c.option(OPT_INFO, c.info_data("disk1", (1, 3)))
    assert replies[-1] == (REP_ACK, b"")
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in replies if t == REP_INFO}
    size, tflags = struct.unpack(">QH", infos[0])
    assert size == SIZE
    want = 1 | 4 | 8 | 32 | 64 | 256 | 2048  # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN FAST_ZERO
    assert tflags == want  # no DF (bit 7) before structured replies
    assert infos[1] == b"disk1"
    assert struct.unpack(">III", infos[3]) == (1, 4096, 32 << 20)
    assert c.option(OPT_STRUCTURED) == [(REP_ACK, b"")]
    c.structured = True
    replies = c.option(OPT_GO, c.info_data(""))  # the default export is ours
    assert replies[-1] == (REP_ACK, b"")
    _, size, tflags = struct.unpack(">HQH", replies[0][1])
    assert tflags == want | 128
    assert c.call(READ, 0, 512)["data"] == bytes(512)
    c.close()


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name(server: NBDServer, no_zeroes: bool) -> None:
    c = connect(server)
    c.greet(3 if no_zeroes else 1)
    c.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 5) + b"disk1")
    size, tflags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE and tflags & 1
    if not no_zeroes:
        assert c.recv(124) == bytes(124)
    assert c.call(WRITE, 0, data=b"x" * 100)["error"] == 0
    c.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):  # nothing more than the reply was sent
        c.sock.recv(1)
    c.close()


def test_export_name_unknown_disconnects(server: NBDServer) -> None:
    c = connect(server)
    c.greet()
    c.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 4) + b"nope")
    assert c.sock.recv(1) == b""
    c.close()


def test_unknown_client_flags_disconnect(server: NBDServer) -> None:
    c = connect(server)
    c.greet(cflags=0x80)
    assert c.sock.recv(1) == b""
    c.close()
    assert server.statistics()["handshakes_failed"] == 1


def test_meta_context_negotiation(server: NBDServer) -> None:
    c = connect(server)
    c.greet()
    assert c.option(OPT_LIST_META, c.meta_data("disk1", ()))[-1][0] == ERR_INVALID  # needs structured
    c.option(OPT_STRUCTURED)

    def names(replies: list[tuple[int, bytes]]) -> dict[str, int]:
        assert replies[-1] == (REP_ACK, b"")
        return {d[4:].decode(): struct.unpack(">I", d[:4])[0] for t, d in replies if t == REP_META}

    assert names(c.option(OPT_LIST_META, c.meta_data("disk1", ()))) == {"base:allocation": 0, "baton:dirty": 0}
    assert names(c.option(OPT_LIST_META, c.meta_data("", ("base:",)))) == {"base:allocation": 0}
    assert names(c.option(OPT_LIST_META, c.meta_data("", ("baton:", "x-other:foo")))) == {"baton:dirty": 0}
    assert c.option(OPT_LIST_META, c.meta_data("", ("nocolon",)))[-1][0] == ERR_INVALID
    assert c.option(OPT_LIST_META, c.meta_data("nope", ()))[-1][0] == ERR_UNKNOWN
    assert c.option(OPT_LIST_META, c.meta_data("disk1", ())[:-1])[-1][0] == ERR_INVALID  # truncated data
    sel = names(c.option(OPT_SET_META, c.meta_data("disk1", ("base:", "baton:dirty", "base:nothing"))))
    assert list(sel) == ["baton:dirty"] and sel["baton:dirty"] != 0
    assert names(c.option(OPT_SET_META, c.meta_data("disk1", ()))) == {}  # zero queries select nothing
    c.close()


# --- transmission ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [False, True])
def test_read_write_flush_fua(server: NBDServer, tracker: FakeTracker, structured: bool) -> None:
    c = connect(server)
    c.go("disk1", structured=structured)
    data = os.urandom(8192)
    assert c.call(WRITE, 4096, data=data)["error"] == 0
    assert c.call(WRITE, 100_000, flags=F_FUA, data=b"\xab" * 10)["error"] == 0
    r = c.call(READ, 4096, 8192)
    assert r["error"] == 0 and r["data"] == data and r["simple"] is not structured
    assert c.call(READ, 100_000, 10, flags=F_FUA)["data"] == b"\xab" * 10  # FUA on a read is accepted
    assert c.call(READ, 0, 0)["error"] == 0
    assert c.call(FLUSH)["error"] == 0
    assert c.call(CACHE, 0, 4096)["error"] == 0
    st = tracker.statistics()
    assert (st["writes"], st["fua_writes"], st["flushes"]) == (2, 1, 1)
    assert tracker.dirty_chunks() == [0, 1]
    assert Path(tracker.path).read_bytes()[4096 : 4096 + 8192] == data
    c.send(DISC)
    assert c.sock.recv(1) == b""
    c.close()
    stats = server.statistics()
    assert stats["requests_write"] == 2 and stats["requests_read"] == 3 and stats["requests_disc"] == 1
    assert stats["bytes_in"] == 8192 + 10 and stats["bytes_out"] == 8192 + 10


def test_request_errors(server: NBDServer, tracker: FakeTracker) -> None:
    c = connect(server)
    c.go("disk1", structured=True)
    r = c.call(READ, SIZE - 10, 20)
    assert r["error"] == EINVAL and r["chunks"][0][0] == T_ERROR
    assert b"beyond" in r["chunks"][0][1]
    assert c.call(WRITE, SIZE - 10, data=b"y" * 20)["error"] == ENOSPC  # payload consumed, stream in sync
    assert c.call(ZEROES, SIZE, 1)["error"] == ENOSPC
    assert c.call(TRIM, SIZE, 1)["error"] == EINVAL
    assert c.call(WRITE, 0, flags=F_NO_HOLE, data=b"z")["error"] == EINVAL  # flag not valid for WRITE
    assert c.call(READ, 0, 10, flags=0x100)["error"] == EINVAL  # unknown flag
    assert c.call(FLUSH, 0, 5)["error"] == EINVAL
    assert c.call(42, 0, 0)["error"] == EINVAL  # unknown command
    assert c.call(BSTATUS, 0, 4096)["error"] == EINVAL  # no metadata context selected
    assert c.call(READ, 0, (32 << 20) + 1)["error"] == EINVAL  # beyond the export anyway
    tracker.fail("read", OSError(5, "injected"))
    r = c.call(READ, 0, 10)
    assert r["error"] == EIO and b"injected" in r["chunks"][0][1]
    tracker.fail("read", ValueError("NUL \0 in the message"))  # must not kill the worker
    assert c.call(READ, 0, 10)["error"] == EIO
    tracker.fail("write", RuntimeError("boom"))
    assert c.call(WRITE, 0, data=b"q")["error"] == EIO
    assert c.call(WRITE, 0, data=b"q")["error"] == 0  # the connection and the server carry on
    assert tracker.statistics()["writes"] == 1
    c.close()
    st = server.statistics()
    assert st["errors"] == 13 and st["errors_eio"] == 3 and st["errors_enospc"] == 2


def test_simple_read_error_has_no_payload(server: NBDServer, tracker: FakeTracker) -> None:
    c = connect(server)
    c.go("disk1", structured=False)
    tracker.fail("read", OSError(5, "injected"))
    assert c.call(READ, 0, 4096) == {"cookie": 1, "error": EIO, "data": b"", "chunks": [], "simple": True}
    assert c.call(READ, 0, 4)["data"] == bytes(4)  # next reply parses: no stray payload was sent
    assert c.call(READ, 0, 4, flags=F_DF)["error"] == EINVAL  # DF only with structured replies
    c.close()


def test_write_zeroes_trim_fast_zero(server: NBDServer, tracker: FakeTracker) -> None:
    c = connect(server)
    c.go("disk1", structured=True)
    c.call(WRITE, 0, data=b"\xff" * (4 * CHUNK))
    tracker.clear_dirty()
    r = c.call(ZEROES, CHUNK, CHUNK, flags=F_FAST_ZERO)
    assert r["error"] == ENOTSUP  # fails fast, changes nothing, marks nothing
    assert tracker.dirty_chunks() == [] and c.call(READ, CHUNK, 16)["data"] == b"\xff" * 16
    assert c.call(ZEROES, CHUNK, CHUNK, flags=F_NO_HOLE | F_FUA)["error"] == 0
    assert c.call(TRIM, 3 * CHUNK, 100)["error"] == 0
    assert c.call(READ, CHUNK, CHUNK)["data"] == bytes(CHUNK)
    assert tracker.dirty_chunks() == [1, 3]
    st = tracker.statistics()
    assert (st["write_zeroes"], st["discards"], st["flushes"]) == (1, 1, 1)  # FUA on zeroes -> flush
    c.close()


def test_block_status(server: NBDServer, tracker: FakeTracker) -> None:
    c = connect(server)
    c.go("disk1", contexts=("base:allocation", "baton:dirty"))
    c.call(WRITE, CHUNK + 5, data=b"a")
    c.call(WRITE, 3 * CHUNK, data=b"b" * (2 * CHUNK))
    r = c.call(BSTATUS, 0, SIZE)
    assert r["error"] == 0 and [t for t, _ in r["chunks"]] == [T_BSTATUS, T_BSTATUS]

    def extents(payload: bytes) -> list[tuple[int, int]]:
        return [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)]

    by_ctx = {struct.unpack(">I", p[:4])[0]: extents(p) for _, p in r["chunks"]}
    assert sorted(by_ctx) == [1, 2]
    assert by_ctx[1] == [(SIZE, 0)]
    assert by_ctx[2] == [(CHUNK, 0), (CHUNK, 1), (CHUNK, 0), (2 * CHUNK, 1), (SIZE - 5 * CHUNK, 0)]
    r = c.call(BSTATUS, CHUNK + 100, 3 * CHUNK, flags=F_REQ_ONE)
    by_ctx = {struct.unpack(">I", p[:4])[0]: extents(p) for _, p in r["chunks"]}
    assert by_ctx == {1: [(3 * CHUNK, 0)], 2: [(CHUNK - 100, 1)]}
    assert c.call(BSTATUS, SIZE - 1, 2)["error"] == EINVAL
    c.close()


def test_dirty_descriptors_fill_gaps_as_dirty() -> None:
    runs = [(0, 100, False), (150, 50, False), (200, 100, True), (300, 50, False)]
    assert dirty_descriptors(runs, 10, 330) == [(90, 0), (50, 1), (50, 0), (100, 1), (40, 0)]
    assert dirty_descriptors([], 0, 10) == [(10, 1)]
    assert dirty_descriptors(runs, 10, 330, req_one=True) == [(90, 0)]


# --- concurrency, multiple connections, shutdown ---------------------------------------------------------
class BarrierTracker(FakeTracker):
    """Writes wait until ``parties`` writes are inside the tracker at once: passes only with concurrency."""

    def __init__(self, *a: Any, parties: int, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.barrier = threading.Barrier(parties, timeout=TIMEOUT)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.barrier.wait()  # BrokenBarrierError -> EIO -> the test fails
        super().write(offset, data, fua)


def test_queue_depth_reaches_tracker_and_replies_out_of_order(tmp_path: Path) -> None:
    t = BarrierTracker(tmp_path / "d.img", SIZE, parties=4)
    with NBDServer(t, "d", unix_path=tmp_path / "d.sock", workers=4) as s:
        c = Client(str(s.unix_path))
        c.go("d")
        cookies = [c.send(WRITE, i * 4096, data=bytes([i]) * 4096) for i in range(4)]
        replies = [c.reply() for _ in cookies]
        assert sorted(r["cookie"] for r in replies) == cookies
        assert all(r["error"] == 0 for r in replies)
        c.close()
    assert t.statistics()["writes"] == 4


class GateTracker(FakeTracker):
    """Writes block until the test opens the gate; ``entered`` is set once a write is inside."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.entered, self.gate = threading.Event(), threading.Event()

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        super().write(offset, data, fua)


def test_stop_drains_in_flight_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import baton.frontends.nbd as nbd

    read_side_shut = threading.Event()
    original = nbd._Connection.shutdown_read

    def shutdown_read(self: Any) -> None:
        original(self)
        read_side_shut.set()

    monkeypatch.setattr(nbd._Connection, "shutdown_read", shutdown_read)
    t = GateTracker(tmp_path / "g.img", SIZE)
    s = NBDServer(t, "g", unix_path=tmp_path / "g.sock", workers=2)
    s.start()
    c = Client(str(s.unix_path))
    c.go("g")
    cookie = c.send(WRITE, 0, data=b"in flight")
    assert t.entered.wait(TIMEOUT)
    stopper = threading.Thread(target=s.stop, kwargs={"timeout": TIMEOUT})
    stopper.start()
    assert read_side_shut.wait(TIMEOUT)  # teardown has begun: no new requests are read
    t.gate.set()  # the blocked write completes while stop() is draining
    stopper.join(TIMEOUT)
    r = c.reply()  # its reply still went out before the server closed the connection
    assert (r["cookie"], r["error"]) == (cookie, 0)
    assert c.sock.recv(1) == b""
    c.close()
    assert t.statistics()["writes"] == 1 and not stopper.is_alive()


def test_multi_connection_flush_and_visibility(server: NBDServer, tracker: FakeTracker) -> None:
    a, b = connect(server), connect(server)
    a.go("disk1")
    b.go("disk1", structured=False)
    assert a.call(WRITE, 777, data=b"shared")["error"] == 0
    assert b.call(FLUSH)["error"] == 0
    assert b.call(READ, 777, 6)["data"] == b"shared"
    assert server.statistics()["connections_open"] == 2
    a.close()
    b.close()


def test_oversized_write_disconnects(server: NBDServer) -> None:
    c = connect(server)
    c.go("disk1")
    c.sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, WRITE, 1, 0, (32 << 20) + 1))
    assert c.sock.recv(1) == b""
    c.close()
    assert server.statistics()["protocol_errors"] == 1


def test_bad_magic_disconnects(server: NBDServer) -> None:
    c = connect(server)
    c.go("disk1")
    c.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, READ, 1, 0, 1))
    assert c.sock.recv(1) == b""
    c.close()


def test_fenced_tracker_stops_server(tmp_path: Path) -> None:
    t = FakeTracker(tmp_path / "f.img", SIZE, fence_after_writes=2)
    s = NBDServer(t, "f", unix_path=tmp_path / "f.sock", workers=2)
    s.start()
    outcome: list[BaseException | None] = []

    def serve() -> None:
        try:
            s.serve_forever()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    th = threading.Thread(target=serve)
    th.start()
    try:
        c = Client(str(s.unix_path))
        c.go("f")
        assert c.call(WRITE, 0, data=b"1")["error"] == 0
        assert c.call(WRITE, 1, data=b"2")["error"] == 0
        r = c.call(WRITE, 2, data=b"3")
        assert r["error"] == EIO and b"fenced" in r["chunks"][0][1]
        th.join(TIMEOUT)
        assert not th.is_alive() and len(outcome) == 1 and isinstance(outcome[0], Fenced)
        with pytest.raises((EOFError, OSError)):  # the connection was closed by the server
            c.call(READ, 0, 1)
        c.close()
        assert not Path(tmp_path / "f.sock").exists()
        st = s.statistics()
        assert st["fenced"] == 1 and st["errors_eio"] == 1
        assert t.statistics()["writes"] == 2
    finally:
        s.stop(timeout=TIMEOUT)
        th.join(TIMEOUT)


def test_stop_then_serve_forever_returns(server: NBDServer) -> None:
    c = connect(server)
    c.go("disk1")
    server.stop(timeout=TIMEOUT)
    server.serve_forever()  # returns at once: stopped without a fence
    assert server.fenced is None
    with pytest.raises((EOFError, OSError)):
        c.call(READ, 0, 1)
    c.close()


def test_stale_socket_replaced_live_one_refused(tracker: FakeTracker, tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed server leaves behind
    with NBDServer(tracker, "x", unix_path=path) as s:
        c = Client(str(path))
        c.go("x")
        c.close()
        with pytest.raises(DeviceBusy):
            NBDServer(tracker, "x", unix_path=path).start()
        assert s.unix_path is not None and s.unix_path.exists()  # the refused server left ours alone
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(DeviceError):
        NBDServer(tracker, "x", unix_path=tmp_path / "plain").start()


def test_tcp_only_when_asked(tracker: FakeTracker) -> None:
    with NBDServer(tracker, "t", tcp=("127.0.0.1", 0)) as s:
        assert s.unix_path is None and s.tcp_address is not None
        assert s.tcp_address[0] == "127.0.0.1"
        c = Client(s.tcp_address)
        c.go("t")
        assert c.call(WRITE, 0, data=b"tcp")["error"] == 0
        c.close()
    with pytest.raises(ValueError):
        NBDServer(tracker, "t")


def test_read_only_export(tracker: FakeTracker, tmp_path: Path) -> None:
    with NBDServer(tracker, "ro", unix_path=tmp_path / "ro.sock", read_only=True) as s:
        c = Client(str(s.unix_path))
        _, tflags = c.go("ro")
        assert tflags & 2 and not tflags & 32
        assert c.call(WRITE, 0, data=b"no")["error"] == EPERM
        assert c.call(READ, 0, 2)["error"] == 0
        c.close()
    assert tracker.statistics()["writes"] == 0


@pytest.mark.parametrize("seed", [4101, 4102])
def test_random_pipelined_operations_match_a_model(server: NBDServer, tracker: FakeTracker, seed: int) -> None:
    """Batches of up to 8 pipelined requests on disjoint ranges, spread over a structured and a simple
    connection, checked against a bytearray model of the disk and a set model of the dirty chunks."""
    import random

    print(f"seed={seed}")
    rng = random.Random(seed)
    model, dirty = bytearray(SIZE), set()
    conns = [connect(server), connect(server)]
    conns[0].go("disk1", contexts=("baton:dirty",))
    conns[1].go("disk1", structured=False)
    for _ in range(40):
        slots = rng.sample(range(SIZE // CHUNK), 8)  # one op per chunk-aligned region: no overlap in a batch
        sent: dict[tuple[int, int], tuple[str, int, int, bytes]] = {}
        for slot in slots[: rng.randint(1, 8)]:
            c = rng.randrange(2)
            off = slot * CHUNK + rng.randrange(CHUNK // 2)
            n = rng.randint(1, CHUNK // 2)
            op = rng.choice(["write", "write", "read", "zero", "trim", "fua"])
            if op in ("write", "fua"):
                data = rng.randbytes(n)
                cookie = conns[c].send(WRITE, off, flags=F_FUA if op == "fua" else 0, data=data)
                model[off : off + n] = data
            elif op == "read":
                cookie, data = conns[c].send(READ, off, n), b""
            else:
                flags = F_NO_HOLE if op == "zero" and rng.random() < 0.5 else 0
                cookie, data = conns[c].send(ZEROES if op == "zero" else TRIM, off, n, flags), b""
                model[off : off + n] = bytes(n)  # the fake tracker punches/zeroes: reads back as zeroes
            if op != "read":
                dirty |= set(range(off // CHUNK, (off + n - 1) // CHUNK + 1))
            sent[(c, cookie)] = (op, off, n, bytes(model[off : off + n]) if op == "read" else data)
        for c in (0, 1):
            for _ in [k for k in sent if k[0] == c]:
                r = conns[c].reply()
                op, off, n, expect = sent.pop((c, r["cookie"]))
                assert r["error"] == 0, (op, off, n)
                if op == "read":
                    assert r["data"] == expect, (op, off, n)
        assert not sent
    assert Path(tracker.path).read_bytes() == bytes(model)
    assert set(tracker.dirty_chunks()) == dirty
    r = conns[0].call(BSTATUS, 0, SIZE)
    payload = r["chunks"][0][1]
    pos, reported = 0, set()
    for i in range(4, len(payload), 8):
        n, flags = struct.unpack(">II", payload[i : i + 8])
        if flags & 1:
            reported |= set(range(pos // CHUNK, (pos + n) // CHUNK))
        pos += n
    assert pos == SIZE and reported == dirty
    for c in conns:
        c.close()


@pytest.mark.parametrize("structured", [False, True])
def test_reply_combining_under_backpressure(server: NBDServer, tracker: FakeTracker, structured: bool) -> None:
    """1000 pipelined reads, sent before any reply is read: the server's socket buffer fills, replies pile
    up behind the sender (batches beyond one sendmsg's iovec limit, partial sends), and all must arrive
    whole. Two 1 MiB reads take the scatter-gather path."""
    data = os.urandom(2 << 20)
    c = connect(server)
    c.go("disk1", structured=structured)
    assert c.call(WRITE, 0, data=data[: 1 << 20])["error"] == 0
    assert c.call(WRITE, 1 << 20, data=data[1 << 20 :])["error"] == 0
    expect: dict[int, bytes] = {}
    for i in range(1000):
        off = (i * 4096 * 7) % (len(data) - 4096)
        expect[c.send(READ, off, 4096)] = data[off : off + 4096]
    for off in (0, 1 << 20):
        expect[c.send(READ, off, 1 << 20)] = data[off : off + (1 << 20)]
    for _ in range(len(expect)):
        r = c.reply()
        assert r["error"] == 0 and r["data"] == expect.pop(r["cookie"])
    assert not expect
    c.close()


DAEMON = """
import signal, sys
from baton.errors import Fenced
from baton.frontends.nbd import NBDServer
from baton.testing.fake_tracker import FakeTracker
t = FakeTracker(sys.argv[1], 1 << 20, fence_after_writes=int(sys.argv[3]))
s = NBDServer(t, "d", unix_path=sys.argv[2], workers=2)
signal.signal(signal.SIGTERM, lambda *_: s.stop())
try:
    s.serve_forever()
except Fenced:
    sys.exit(5)
"""


@pytest.mark.parametrize("how", ["sigterm", "fenced"])
def test_daemon_exits_on_sigterm_or_fence(tmp_path: Path, how: str) -> None:
    """The daemon pattern: main thread in serve_forever(), SIGTERM handler calls stop() -> exit 0; a fence
    makes serve_forever() raise -> exit 5. Either way the socket file is gone."""
    import signal
    import subprocess
    import sys
    import time

    sock = tmp_path / "d.sock"
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, str(tmp_path / "d.img"), str(sock), "1"])
    try:
        for _ in range(200):  # bounded wait for the socket (the interpreter needs a moment to start)
            if sock.exists():
                break
            time.sleep(0.05)
        c = Client(str(sock))
        c.go("d")
        assert c.call(WRITE, 0, data=b"ok")["error"] == 0
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
        else:
            assert c.call(WRITE, 0, data=b"late")["error"] == EIO
            assert proc.wait(TIMEOUT) == 5
        c.close()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
