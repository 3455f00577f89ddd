"""A snapshot served read-only as a block device: ``/dev/baton/snap-NAME``, chunks fetched on demand.

How a read travels::

    mount -o ro,noload /dev/baton/snap-NAME -> read-only /dev/loopN -> FUSE file RUN_DIR/snap-NAME/fuse/disk
        -> SnapshotDisk.read -> LRU chunk cache -> (miss) fetch(chunk index) -> the repository

The FUSE + loop machinery is the FUSE frontend's (:class:`baton.frontends.fuse.FuseFrontend`: direct_io, no
writeback cache, its crash record RUN_DIR/snap-NAME/state.json and its :func:`cleanup_stale` for what a killed
process left). This module adds what differs for a snapshot:

* :class:`SnapshotDisk`, the ``TrackerLike`` it serves: reads come from ``fetch(chunk_index) -> bytes`` (given
  by the caller, :mod:`baton.mount`, which owns the repository: a frontend never imports it) through a bounded
  LRU cache of whole chunks (``cache_bytes``); nothing is fetched before a read asks for it, so the first read
  of a 1 TiB snapshot costs a few chunks. Every write, discard and write-zeroes fails (EIO to the kernel);
* :class:`SnapshotFrontend` (a :class:`Frontend`): the FUSE frontend over a ``SnapshotDisk``, with its loop
  device switched read-only (BLKROSET, ``blockdev --setro``) before the device name is handed out, so the
  kernel refuses writes before they reach us and a file system mounts only ``ro``.

Statistics: ``chunks_fetched``, ``bytes_fetched`` (plaintext), ``cache_hits``, ``cache_misses``,
``cache_bytes`` (now), ``cache_limit``, ``reads``, ``bytes_read``, ``write_refused``.
"""

from __future__ import annotations

import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

from baton.errors import DeviceError, ReadOnlyDevice
from baton.frontends import loopdev
from baton.frontends.base import Endpoint, Frontend, FrontendConfig, FrontendFailure
from baton.frontends.fuse import FuseFrontend, load_state
from baton.frontends.fuse import cleanup_stale as fuse_cleanup_stale
from baton.tracker import TrackerLike

DEFAULT_CACHE_BYTES = 256 << 20

Fetch = Callable[[int], bytes]  # chunk index -> its plaintext (chunk_size bytes, the last chunk may be shorter)


class SnapshotDisk:
    """A read-only ``TrackerLike`` over ``fetch`` with an LRU cache of at most ``cache_bytes`` of chunks."""

    def __init__(self, size: int, chunk_size: int, fetch: Fetch, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if cache_bytes < chunk_size:
            raise DeviceError(f"a cache of {cache_bytes} bytes cannot hold one {chunk_size}-byte chunk")
        self.size = size
        self.chunk_size = chunk_size
        self._fetch = fetch
        self._limit = cache_bytes
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("chunks_fetched", "bytes_fetched", "cache_hits", "cache_misses", "reads",
                                     "bytes_read", "write_refused"), 0)

    def _chunk(self, c: int) -> bytes:
        with self._lock:
            data = self._cache.get(c)
            if data is not None:
                self._cache.move_to_end(c)
                self._stats["cache_hits"] += 1
                return data
            self._stats["cache_misses"] += 1
        data = self._fetch(c)  # outside the lock: other readers go on (two may fetch one chunk; harmless)
        with self._lock:
            self._stats["chunks_fetched"] += 1
            self._stats["bytes_fetched"] += len(data)
            if c not in self._cache:
                self._cache[c] = data
                self._cached += len(data)
                while self._cached > self._limit:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return data

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceError(f"read at {offset}+{length} is outside the {self.size}-byte snapshot")
        cs = self.chunk_size
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            c = pos // cs
            data = self._chunk(c)
            lo = pos - c * cs
            hi = min(len(data), end - c * cs)
            out += data[lo:hi]
            pos = c * cs + hi
        with self._lock:
            self._stats["reads"] += 1
            self._stats["bytes_read"] += length
        return bytes(out)

    def _refuse(self) -> None:
        with self._lock:
            self._stats["write_refused"] += 1
        raise ReadOnlyDevice("a snapshot device is read-only")

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._refuse()

    def flush(self) -> None:
        return None  # nothing is ever written

    def discard(self, offset: int, length: int) -> None:
        self._refuse()

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False) -> None:
        self._refuse()

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, False)]

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats) | {"cache_bytes": self._cached, "cache_limit": self._limit,
                                        "cache_chunks": len(self._cache)}


class SnapshotFrontend(Frontend):
    """The FUSE frontend over a :class:`SnapshotDisk`, with a read-only loop device (see the module docstring).
    ``config.name`` is the device's name under BATON_DEV_DIR (``snap-NAME``)."""

    kind: ClassVar[str] = "snapshot"

    def __init__(self, disk: TrackerLike, config: FrontendConfig) -> None:
        # No watchdog: a read waits for the repository (S3 can be slow); it never blocks a writer.
        self._inner = FuseFrontend(disk, config.name, config.run_dir, config.dev_dir, request_timeout=None)
        self.disk = disk

    @classmethod
    def create(cls, tracker: TrackerLike, config: FrontendConfig) -> SnapshotFrontend:
        return cls(tracker, config)

    @classmethod
    def cleanup_stale(cls, config: FrontendConfig) -> list[str]:
        """The FUSE frontend's clean-up, then the read-only flag of the dead daemon's loop device is cleared
        once that device is free (the kernel keeps BLKROSET across a detach: the next user of loopN would get
        a read-only device)."""
        st = load_state(config.run_dir.absolute() / config.name / "state.json")
        done = fuse_cleanup_stale(config.name, config.run_dir, config.dev_dir)
        if st is not None and loopdev.info(st.loop) is None and _set_ro(st.loop, False):
            done.append(f"cleared the read-only flag of {st.loop}")
        return done

    def start(self) -> Endpoint:
        ep = self._inner.start()
        dev = self._inner.loop_device
        assert dev is not None
        if not _set_ro(dev, True):
            self._inner.stop(force=True)
            _set_ro(dev, False)
            raise DeviceError(f"cannot make {dev} read-only (blockdev --setro)")
        return ep

    @property
    def endpoint(self) -> Endpoint | None:
        return self._inner.endpoint

    @property
    def ready(self) -> bool:
        return self._inner.ready

    def wait(self, timeout: float | None = None) -> bool:
        return self._inner.wait(timeout)

    @property
    def failure(self) -> FrontendFailure | None:
        return self._inner.failure

    def stop(self, force: bool = False) -> None:
        """The FUSE frontend's stop; the loop device's read-only flag is cleared once it is detached (the
        kernel keeps it across a detach)."""
        dev = self._inner.loop_device
        self._inner.stop(force)
        if dev is not None and loopdev.info(dev) is None:
            _set_ro(dev, False)

    @property
    def loop_device(self) -> str | None:
        return self._inner.loop_device

    def statistics(self) -> dict[str, int]:
        return self._inner.statistics() | self.disk.statistics()


def _set_ro(dev: str, ro: bool) -> bool:
    """BLKROSET on ``dev`` (blockdev --setro/--setrw); True if it worked."""
    try:
        r = subprocess.run(["blockdev", "--setro" if ro else "--setrw", dev], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0
