"""Block-device access: size, O_DIRECT aligned I/O through bounce buffers, FIEMAP-free helpers.

Shared cluster disks are opened with ``O_DIRECT`` so that no node's page cache ever serves data another node has
since overwritten. Python's ``bytes`` are not aligned, so transfers go through a page-aligned ``mmap`` bounce
buffer (one extra memcpy), except a backup's reads (:meth:`DirectDev.pread_view`), which land in an aligned
region of a heap buffer handed on as a view. Unaligned requests are widened to the alignment with a
read-modify-write under a lock (only the record layer and odd-sized tails ever need that; frontends send aligned I/O).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from baton.errors import DeviceError

ALIGN = 4096
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class BlockDev(Protocol):
    """What the record and tracker need from a device. ``sync`` makes everything written so far durable."""

    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


def device_size(path: str) -> int:
    """Size in bytes of a regular file or block device. Raises DeviceError if it is neither."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path}: no such file or device") from None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("<Q", buf)[0])
        finally:
            os.close(fd)
    raise DeviceError(f"{path}: not a regular file or block device")


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def aligned_buffer(size: int) -> mmap.mmap:
    """A zero-filled anonymous buffer of ``size`` bytes rounded up to ALIGN, page-aligned (an ``mmap``), as
    O_DIRECT transfers need: Python's ``bytes`` are not aligned."""
    return mmap.mmap(-1, max(ALIGN, (size + ALIGN - 1) // ALIGN * ALIGN))


class AlignedWriter:
    """Positional writes of whole buffers to an open file or block device, with ``O_DIRECT`` where it works.

    ``fd`` is the caller's (it opens and closes it). :meth:`enable_direct` adds ``O_DIRECT`` to it; then a
    write whose offset and length are multiples of ALIGN goes straight from the caller's page-aligned buffer
    to the device (no copy into the page cache, no write-back later), and the unaligned remainder of a write
    (only the end of a disk whose size is not a multiple of ALIGN) goes through a second, buffered
    descriptor of the same open file. A file system that refuses O_DIRECT (EINVAL: tmpfs, some FUSE) makes
    every write buffered. Thread-safe: writes to disjoint ranges may run concurrently. Errors are OSError.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct = False
        self._buffered = -1
        self._lock = threading.Lock()
        self.direct_writes = 0
        self.buffered_writes = 0

    def enable_direct(self) -> bool:
        """Switch the descriptor to O_DIRECT (fcntl F_SETFL); False when the file system refuses it."""
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            return False
        self.direct = True
        return True

    def _buffered_fd(self) -> int:
        with self._lock:
            if self._buffered < 0:
                # The same open file, reopened without O_DIRECT (never the path again: it could name
                # something else by now).
                self._buffered = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_CLOEXEC)
            return self._buffered

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""
        if self.direct and not offset % ALIGN:
            aligned = len(data) // ALIGN * ALIGN
            if aligned:
                try:
                    _pwrite_full(self.fd, data[:aligned], offset)
                    self.direct_writes += 1
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # alignment the device refuses: buffered from now on
                    _pwrite_full(self._buffered_fd(), data[:aligned], offset)
                    self.buffered_writes += 1
                data, offset = data[aligned:], offset + aligned
        if len(data):
            _pwrite_full(self._buffered_fd() if self.direct or self._buffered >= 0 else self.fd, data, offset)
            self.buffered_writes += 1

    def sync(self) -> None:
        """fsync both descriptors (O_DIRECT writes still need it: allocation metadata, the device's cache)."""
        if self._buffered >= 0:
            os.fsync(self._buffered)
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the buffered descriptor this writer opened (not the caller's ``fd``)."""
        if self._buffered >= 0:
            os.close(self._buffered)
            self._buffered = -1


def _pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data, offset = data[n:], offset + n


class _Buffers(threading.local):
    buf: mmap.mmap | None = None


class DirectDev:
    """A file or block device opened ``O_DIRECT`` (falling back to buffered + fdatasync where the file system
    refuses O_DIRECT, e.g. tmpfs). Thread-safe: each thread has its own aligned bounce buffer.

    ``pread``/``pwrite`` accept any offset and length; aligned requests are a single syscall.
    Errors surface as ``OSError`` (callers decide); opening failures as ``DeviceError``.
    """

    def __init__(self, path: str, *, writable: bool = True, direct: bool = True, max_io: int = 4 << 20) -> None:
        self.path = path
        self.size = device_size(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.direct = False
        fd = -1
        if direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise DeviceError(f"cannot open {path}: {e.strerror}") from e
        if fd < 0:
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise DeviceError(f"cannot open {path}: {e.strerror}") from e
        self.fd = fd
        self.max_io = max_io
        self._local = _Buffers()
        self._rmw = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0
        self.syncs = 0

    def _buf(self, n: int) -> mmap.mmap:
        b = self._local.buf
        if b is None or len(b) < n:
            size = max(n, 1 << 20)
            size = (size + ALIGN - 1) // ALIGN * ALIGN
            b = mmap.mmap(-1, size)
            self._local.buf = b
        return b

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if not self.direct:
            data = os.pread(self.fd, length, offset)
            self.bytes_read += len(data)
            return data.ljust(length, b"\0") if len(data) < length else data
        start = offset // ALIGN * ALIGN
        end = (offset + length + ALIGN - 1) // ALIGN * ALIGN
        if end - start <= self.max_io:  # one syscall and one copy out of the bounce buffer
            n = end - start
            view = memoryview(self._buf(n))
            self._read_into(view[:n], start)
            self.bytes_read += length
            skip = offset - start
            data = bytes(view[skip : skip + length])
            view.release()
            return data
        out = bytearray()
        pos = start
        while pos < end:
            n = min(end - pos, self.max_io)
            buf = self._buf(n)
            self._read_into(memoryview(buf)[:n], pos)
            out += buf[:n]
            pos += n
        self.bytes_read += length
        skip = offset - start
        return bytes(out[skip : skip + length])

    def pread_view(self, offset: int, length: int) -> memoryview:
        """What :meth:`pread` returns, as a read-only view of memory the read landed in: with O_DIRECT, a read of
        at most ``max_io`` goes straight into a new page-aligned region of a heap buffer (no bounce buffer and
        no copy out of it), which lives as long as a view of it does (:meth:`direct_read`). Else
        ``memoryview(pread(...))``. Why: a backup keeps up to 32 reads in flight, and a bounce buffer per read
        thread held 1 MiB each (32 MiB) for the whole backup of a disk with scattered changes."""
        r = self.direct_read(offset, length)
        if r is None:
            return memoryview(self.pread(offset, length))
        return r.result(os.preadv(self.fd, [r.buf], r.pos))

    def direct_read(self, offset: int, length: int) -> DirectRead | None:
        """How to read ``length`` bytes at ``offset`` straight into memory, by whoever issues the read (this
        device's :meth:`pread_view`, or the kernel's asynchronous reads, :class:`AioReads`): the aligned device
        range and a new page-aligned buffer for it. None where that can't be done: not O_DIRECT, nothing to
        read, or more than ``max_io``."""
        if length <= 0 or not self.direct:
            return None
        start = offset // ALIGN * ALIGN
        end = (offset + length + ALIGN - 1) // ALIGN * ALIGN
        if end - start > self.max_io:
            return None
        return DirectRead(self, self.fd, start, aligned_view(end - start), offset - start, length)

    def _read_into(self, view: memoryview, pos: int) -> None:
        """One aligned read filling ``view`` from ``pos``; past EOF of a regular file, zeros (as a block device
        would never be short)."""
        _zero_after(view, os.preadv(self.fd, [view], pos))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        if length == 0:
            return
        if not self.direct:
            self._pwrite_all(data, offset)
            self.bytes_written += length
            return
        if offset % ALIGN or length % ALIGN:
            # Read-modify-write of the partial blocks. Serialised: two unaligned writers to one block would
            # otherwise lose one another's bytes.
            with self._rmw:
                start = offset // ALIGN * ALIGN
                end = (offset + length + ALIGN - 1) // ALIGN * ALIGN
                cur = bytearray(self.pread(start, end - start))
                cur[offset - start : offset - start + length] = data
                self._direct_write(start, cur)
        else:
            self._direct_write(offset, data)
        self.bytes_written += length

    def _direct_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        pos = 0
        while pos < len(mv):
            n = min(len(mv) - pos, self.max_io)
            buf = self._buf(n)
            buf[:n] = mv[pos : pos + n]
            self._pwrite_all(memoryview(buf)[:n], offset + pos)
            pos += n

    def _pwrite_all(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        mv = memoryview(data)
        while len(mv):
            n = os.pwritev(self.fd, [mv], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            mv = mv[n:]
            offset += n

    def sync(self) -> None:
        os.fdatasync(self.fd)
        self.syncs += 1

    def discard(self, offset: int, length: int, *, zero: bool) -> None:
        """Punch a hole (file) or BLKDISCARD/BLKZEROOUT (block device). ``zero``: the range must read as zeros
        afterwards. Falls back to writing zeros when the device cannot."""
        mode = os.fstat(self.fd).st_mode
        try:
            if stat.S_ISREG(mode):
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            if stat.S_ISBLK(mode):
                req = BLKZEROOUT if zero else BLKDISCARD
                fcntl.ioctl(self.fd, req, struct.pack("<QQ", offset, length))
                return
        except OSError:
            if not zero:
                return
        step = 1 << 20
        zeros = bytes(min(step, length))
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            self.pwrite(pos, zeros[:n])
            pos += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def statistics(self) -> dict[str, int]:
        return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written, "syncs": self.syncs}


class DirectRead:
    """One read planned by :meth:`DirectDev.direct_read`: ``buf`` (page-aligned, writable) is to receive the
    device's bytes from ``pos`` (aligned) on; the bytes asked for start ``skip`` bytes into it."""

    __slots__ = ("buf", "dev", "fd", "length", "pos", "skip")

    def __init__(self, dev: DirectDev, fd: int, pos: int, buf: memoryview, skip: int, length: int) -> None:
        self.dev, self.fd, self.pos, self.buf, self.skip, self.length = dev, fd, pos, buf, skip, length

    def result(self, got: int) -> memoryview:
        """The bytes asked for, as a read-only view of ``buf``, once ``got`` bytes of it were read: zeros after
        a short read (past the end of a regular file, as a block device never is short)."""
        _zero_after(self.buf, got)
        self.dev.bytes_read += self.length
        return self.buf[self.skip:self.skip + self.length].toreadonly()


def _zero_after(view: memoryview, got: int) -> None:
    """Zeros in ``view`` after the ``got`` bytes a read filled: past the end of a regular file (a block device
    is never short)."""
    if got < len(view):
        view[got:] = bytes(len(view) - got)


def direct_read(dev: object, offset: int, length: int) -> DirectRead | None:
    """``dev.direct_read`` (:meth:`DirectDev.direct_read`, or a SubDev window of one); None for any other
    device, or where that gives None."""
    plan = getattr(dev, "direct_read", None)
    return plan(offset, length) if plan is not None else None


def reads_direct(dev: object) -> bool:
    """Whether ``dev`` (a DirectDev, or a SubDev window of one) reads with O_DIRECT: :func:`direct_read`
    applies to its reads (those of at most ``max_io``)."""
    while isinstance(dev, SubDev):
        dev = dev.dev
    return isinstance(dev, DirectDev) and dev.direct


# Linux's native asynchronous I/O, by its system call numbers: (io_setup, io_destroy, io_submit, io_getevents).
_AIO_SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}
AIO_ENV = "BATON_AIO"   # "off": the backup reads with its thread pool instead


class AioReads:
    """Reads in flight in the kernel without a thread each: Linux's native AIO (``io_setup``, ``io_submit``,
    ``io_getevents``) on O_DIRECT file descriptors, where a read is really asynchronous. The system calls go
    through ctypes, which lets go of the GIL while they run.

    Why: a backup's scattered reads (a 1 % incremental: 655 reads of 64 KiB) on a pool of 32 threads cost
    about 190 µs of CPU per read (thread wake-ups, the GIL handed around, futures) and kept the encode
    threads waiting for the GIL; here they cost a few µs each, in two system calls per batch.

    Not thread-safe: one user. Each :class:`DirectRead` submitted must stay referenced until :meth:`reap`
    returned it (the kernel writes into its buffer); :meth:`close` waits for every read still in flight."""

    def __init__(self, depth: int) -> None:
        import ctypes
        import platform

        calls = _AIO_SYSCALLS.get(platform.machine())
        if calls is None:
            raise OSError(errno.ENOSYS, f"no native AIO system call numbers for {platform.machine()}")
        self._setup, self._destroy, self._submit, self._getevents = calls
        libc = libc_handle()
        if libc is None:
            raise OSError(errno.ENOSYS, "no C library to make system calls through")
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._ct = ctypes

        class Iocb(ctypes.Structure):
            _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                        ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                        ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                        ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]

        class Event(ctypes.Structure):
            _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                        ("res2", ctypes.c_int64)]

        if ctypes.sizeof(Iocb) != 64 or ctypes.sizeof(Event) != 32:
            raise OSError(errno.ENOSYS, "unexpected AIO structure sizes")
        self._Iocb = Iocb
        self.depth = depth
        self._events = (Event * depth)()
        self._ctx = ctypes.c_ulong(0)
        if self._call(self._setup, depth, ctypes.byref(self._ctx)) < 0:
            raise OSError(ctypes.get_errno(), f"io_setup: {os.strerror(ctypes.get_errno())}")
        self._inflight: dict[int, tuple[Any, Any, Any]] = {}   # iocb data -> (token, read, iocb)
        self._next = 0
        self.pid = os.getpid()   # a context belongs to the process that made it (a forked child has none)

    def _call(self, *args: Any) -> int:
        while True:
            r = int(self._syscall(*args))
            if r >= 0 or self._ct.get_errno() != errno.EINTR:
                return r

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def submit(self, reads: list[tuple[Any, DirectRead]]) -> None:
        """Start (token, read) pairs; at most ``depth - in_flight`` of them. OSError if the kernel refuses."""
        ct = self._ct
        if len(reads) > self.depth - len(self._inflight):
            raise ValueError(f"{len(reads)} reads would exceed the depth of {self.depth}")
        cbs = []
        for token, r in reads:
            cb = self._Iocb()
            self._next += 1
            cb.data = self._next
            cb.opcode = 0   # IOCB_CMD_PREAD
            cb.fildes = r.fd
            cb.buf = ct.addressof(ct.c_char.from_buffer(r.buf))
            cb.nbytes = len(r.buf)
            cb.offset = r.pos
            self._inflight[self._next] = (token, r, cb)
            cbs.append(cb)
        ptrs = (ct.POINTER(self._Iocb) * len(cbs))(*(ct.pointer(cb) for cb in cbs))
        done = 0
        while done < len(cbs):
            n = self._call(self._submit, self._ctx, len(cbs) - done, ct.byref(ptrs, done * ct.sizeof(ct.c_void_p)))
            if n <= 0:
                e = ct.get_errno() if n < 0 else errno.EAGAIN
                for cb in cbs[done:]:
                    del self._inflight[cb.data]
                raise OSError(e, f"io_submit: {os.strerror(e)}")
            done += n

    def reap(self, min_nr: int = 1) -> list[tuple[Any, DirectRead, int]]:
        """(token, read, result) of reads that completed, at least ``min_nr`` of them (waiting for them): the
        result is the number of bytes read, or minus an errno."""
        ct = self._ct
        min_nr = min(min_nr, len(self._inflight))
        n = self._call(self._getevents, self._ctx, min_nr, self.depth, self._events, None)
        if n < 0:
            raise OSError(ct.get_errno(), f"io_getevents: {os.strerror(ct.get_errno())}")
        out = []
        for ev in self._events[:n]:
            token, r, _cb = self._inflight.pop(ev.data)
            out.append((token, r, int(ev.res)))
        return out

    def close(self) -> None:
        """Wait for every read in flight (io_destroy does), then forget them. Idempotent."""
        if self._ctx.value and self.pid == os.getpid():
            self._call(self._destroy, self._ctx)
        self._ctx.value = 0
        self._inflight.clear()


class AioLease:
    """One user's hold on an :class:`AioReads` kept by the process (:func:`open_aio`): the same calls, and a
    :meth:`close` that waits for the reads still in flight by reaping them and hands the context back for
    the next user instead of destroying it.

    Why: ``io_destroy`` took 28-36 ms here each time (the kernel waits out an RCU grace period), a tenth of a
    1 % incremental of 4 GiB after a takeover. The kernel frees a kept context when the process exits; each
    counts its depth against the system-wide ``fs.aio-max-nr`` (65,536 by default) for the life of the
    process, one per backup the process runs at a time."""

    def __init__(self, ctx: AioReads) -> None:
        self._ctx: AioReads | None = ctx
        self.depth = ctx.depth

    def _held(self) -> AioReads:
        if self._ctx is None:
            raise ValueError("this AIO lease was closed")
        return self._ctx

    @property
    def in_flight(self) -> int:
        return self._ctx.in_flight if self._ctx is not None else 0

    def submit(self, reads: list[tuple[Any, DirectRead]]) -> None:
        self._held().submit(reads)

    def reap(self, min_nr: int = 1) -> list[tuple[Any, DirectRead, int]]:
        return self._held().reap(min_nr)

    def close(self) -> None:
        """Wait for every read in flight, then hand the context back. Idempotent: only the first call does
        anything (the context may have a new user by the second). A context whose reaping fails is destroyed
        instead (io_destroy waits for what is left)."""
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        try:
            while ctx.in_flight:
                ctx.reap(ctx.in_flight)
        except OSError:
            ctx.close()
            return
        except BaseException:
            ctx.close()
            raise
        with _AIO_LOCK:
            _AIO_FREE.append(ctx)


_AIO_LOCK = threading.Lock()
_AIO_FREE: list[AioReads] = []   # contexts between users (AioLease), of this process only


def open_aio(depth: int) -> AioLease | None:
    """Native AIO of at least ``depth`` reads for one user until its :meth:`AioLease.close`: a context a
    previous user of this process handed back, else a new one (kept after). None where native AIO is not to
    be had (another system, the system-wide limit ``fs.aio-max-nr`` reached, BATON_AIO=off): the caller reads
    with threads instead."""
    if os.environ.get(AIO_ENV, "").lower() in ("off", "0", "no"):
        return None
    pid = os.getpid()
    with _AIO_LOCK:
        _AIO_FREE[:] = [a for a in _AIO_FREE if a.pid == pid]   # a forked child's copies are not its own
        for i in range(len(_AIO_FREE) - 1, -1, -1):   # the one handed back last first
            if _AIO_FREE[i].depth >= depth:
                return AioLease(_AIO_FREE.pop(i))
    try:
        return AioLease(AioReads(depth))
    except OSError:
        return None


def device_has_data(dev: object, offset: int, length: int) -> bool | None:
    """Whether [offset, offset+length) of ``dev`` (a DirectDev, or a SubDev window of one) holds any allocated
    data: False for a hole of a regular file (it reads as zeros), True when data is there, None when it can't
    be known. A block device can't say: SEEK_DATA reports a block device as all data, and whether a range
    of a LUN, a thin volume or a dm device was ever written or discarded is not visible to a reader (a thin
    pool knows its own mappings, an array its own; neither is queried here), so full backups of block
    devices read every byte."""
    base = 0
    while isinstance(dev, SubDev):
        base += dev.base
        dev = dev.dev
    fd = getattr(dev, "fd", -1)
    if not isinstance(fd, int) or fd < 0 or length <= 0:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        pos = os.lseek(fd, base + offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at or after offset
            return False
        return None
    return pos < base + offset + length


def data_extents(dev: object, offset: int, length: int) -> list[tuple[int, int]] | None:
    """The (start, end) byte ranges of [offset, offset+length) that hold data (SEEK_DATA/SEEK_HOLE), or None
    when it can't be known (see :func:`device_has_data`). Ranges are clipped to the window."""
    base = 0
    while isinstance(dev, SubDev):
        base += dev.base
        dev = dev.dev
    fd = getattr(dev, "fd", -1)
    if not isinstance(fd, int) or fd < 0:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
    except OSError:
        return None
    out: list[tuple[int, int]] = []
    pos, end = base + offset, base + offset + length
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            return None
        if start >= end:
            break
        try:
            stop = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            return None
        out.append((start - base, min(stop, end) - base))
        pos = stop
    return out


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of a regular file, keeping its size (reads give zeros).
    OSError (EOPNOTSUPP and others) when the file system can't; callers then write zeros."""
    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> bool:
    """Make [offset, offset+length) of the block device ``fd`` read as zeros without sending zeros from here
    (BLKZEROOUT: the kernel uses WRITE ZEROES or an unmap that reads back zeros where the device has one,
    else writes zeros itself). Returns False when the device refuses (the caller writes zeros)."""
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
    except OSError:
        return False
    return True


_libc: object = None

M_TRIM_THRESHOLD = -1        # mallopt(3) parameters (glibc)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
BIG_BUFFERS_ARENAS = max(2, os.cpu_count() or 2)  # glibc's default is 8 per core
BIG_BUFFERS_MMAP = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
BIG_BUFFERS_TRIM = 16 << 20  # free memory a heap keeps at its top: 2x the reads in flight (see below)


def reuse_big_buffers() -> bool:
    """Let the C allocator reuse freed large buffers instead of mapping fresh memory for each one.

    Why: glibc serves an allocation above its mmap threshold (128 KiB at start, raised only by the frees it
    sees) with a new ``mmap``, and the kernel then faults in and zeroes every page on first touch. A full
    backup allocates a new 1 MiB buffer per disk read (the chunks it hands to the writer are views of it), a
    restore a new buffer per ranged read of a pack: about 214,000 minor page faults for a full backup of the
    1 GiB benchmark image, 130,000 to 145,000 with this (the 32 MiB pack images stay above any threshold).
    It also caps the allocator's arenas at one per core (BIG_BUFFERS_ARENAS) for threads started from now on:
    every pool thread that reads would otherwise get an arena of its own, each keeping the freed buffers it
    served (peak RSS of a full backup of the 1 GiB benchmark image 149-178 MiB, median 150, against 180-187
    with glibc's 8 arenas per core, no slower). The free memory a heap keeps at its top before giving it back is
    BIG_BUFFERS_TRIM, 16 MiB, twice the reads in flight: 64 MiB let each arena keep that much spare, and 4 MiB
    gave freed read buffers back only to fault them in again (55,000 faults instead of 18,000 in
    tests/unit/test_device_buffers.py, 5-9 % more CPU for a full backup).
    Process-wide and idempotent; call :func:`release_free_memory` when the work is done (the arena cap stays).
    Returns False where the C library has no ``mallopt`` (not glibc): nothing changes there."""
    libc = libc_handle()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt(M_ARENA_MAX, BIG_BUFFERS_ARENAS)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, BIG_BUFFERS_MMAP)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, BIG_BUFFERS_TRIM))


MADV_POPULATE_WRITE = 23  # madvise(2), Linux 5.14 and later


def uninitialized_bytearray(n: int) -> bytearray:
    """A bytearray of ``n`` bytes whose contents are left as the allocator gives them (``bytearray(n)`` zeroes
    every byte, touching every page with the GIL held: about 10 ms for a 16 MiB pack buffer). For a buffer
    every byte of which is written before it is read (a pack is built front to back, and only its written
    length is ever read). CPython's ``PyByteArray_FromStringAndSize(NULL, n)``."""
    import ctypes

    make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    make.restype = ctypes.py_object
    make.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    buf: bytearray = make(None, n)
    return buf


def populate(buf: bytearray) -> bool:
    """Fault in the memory pages that lie wholly inside ``buf`` now, writable, without changing its bytes
    (``madvise(MADV_POPULATE_WRITE)``; what is there already stays), in a C call that lets go of the GIL.

    Why: the pages of a new pack buffer (:func:`uninitialized_bytearray`, 4,096 of them at 16 MiB) were
    otherwise faulted in one by one as the writer's thread copied blobs into it, with the GIL held, while the
    encode threads waited for the GIL.
    Called on a pool thread. ``buf`` must not be resized meanwhile (it only faults pages in: a buffer that
    moved costs some memory, never data). False where the kernel or C library can't (nothing changes)."""
    import ctypes

    libc = libc_handle()
    if libc is None or not hasattr(libc, "madvise") or len(buf) < 2 * mmap.PAGESIZE:
        return False
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # the export ends with this statement
    first = -(-base // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (base + len(buf)) // mmap.PAGESIZE * mmap.PAGESIZE
    return int(libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_POPULATE_WRITE)) == 0


def daemon_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment to start a per-disk daemon with: ``environ`` plus ``MALLOC_ARENA_MAX`` (unless set), so
    glibc caps its arenas at BIG_BUFFERS_ARENAS from the daemon's first thread. :func:`reuse_big_buffers` caps
    only the threads started after it runs, and a daemon starts its serving threads long before its first
    backup: at the peak of an incremental of a 64 GiB disk with 10 % changed, six arenas held 73 MiB."""
    env = dict(environ)
    env.setdefault("MALLOC_ARENA_MAX", str(BIG_BUFFERS_ARENAS))
    return env


def release_free_memory() -> None:
    """Give memory the allocator holds free back to the kernel (``malloc_trim``): a long-lived daemon's RSS
    returns to its idle size after a backup that :func:`reuse_big_buffers` let keep its buffers."""
    libc = libc_handle()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def libc_handle() -> Any:
    """The C library through ctypes (None if it can't be loaded), loaded once: by its glibc name first, which
    the process has mapped already; ``ctypes.util.find_library`` runs ``ldconfig -p`` in a child process
    (about 7 ms of a restore's start), so it is asked only where that name is not there."""
    import ctypes

    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            import ctypes.util

            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            except OSError:
                return None
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        _libc = libc
    return _libc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = libc_handle()
    if libc is None:
        raise OSError(errno.EOPNOTSUPP, "no C library to call fallocate through")
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def aligned_view(n: int) -> memoryview:
    """A writable view of ``n`` bytes at a page-aligned address inside a new bytearray: heap memory, which the
    allocator hands out again after it is freed (see :func:`reuse_big_buffers`), unlike a fresh mapping.

    Not zeroed (:func:`uninitialized_bytearray`): it is a read's buffer (:meth:`DirectDev.direct_read`), and
    :meth:`DirectRead.result` zero-fills whatever a short read left. ``bytearray(n)`` zeroed each one with the
    GIL held, faulting in a new daemon's fresh heap page by page (about 20 ms of the backup thread for the
    655 reads of a 1 % incremental of 4 GiB, while the encode threads waited for the GIL)."""
    import ctypes

    raw = uninitialized_bytearray(n + ALIGN)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % ALIGN
    return memoryview(raw)[skip:skip + n]


def read_view(dev: BlockDev, offset: int, length: int) -> memoryview:
    """``dev.pread(offset, length)`` as a read-only view, without the copy where the device can read in place
    (:meth:`DirectDev.pread_view`)."""
    direct = getattr(dev, "pread_view", None)
    if direct is not None:
        view: memoryview = direct(offset, length)
        return view
    return memoryview(dev.pread(offset, length))


class SubDev:
    """A window [base, base+size) of another device, as its own BlockDev (a tail-placement data area, or one
    record-disk slot). I/O outside the window raises ValueError: a bug, never silently clamped."""

    def __init__(self, dev: BlockDev, base: int, size: int) -> None:
        self.dev = dev
        self.base = base
        self.size = size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"I/O at {offset}+{length} outside a {self.size}-byte window")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.dev.pread(self.base + offset, length)

    def pread_view(self, offset: int, length: int) -> memoryview:
        self._check(offset, length)
        return read_view(self.dev, self.base + offset, length)

    def direct_read(self, offset: int, length: int) -> DirectRead | None:
        self._check(offset, length)
        return direct_read(self.dev, self.base + offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        self.dev.pwrite(self.base + offset, data)

    def sync(self) -> None:
        self.dev.sync()

    def close(self) -> None:
        pass
