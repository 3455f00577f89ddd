"""A crash-simulating block device (STYLE §13): written-but-unsynced data sits in a volatile cache; ``crash()``
drops it, keeps it, or tears it at sector granularity, driven by a seeded RNG.

The durable image is a ``bytearray``; ``sync()`` moves the cache into it. Reads see the cache first (like a
real disk's write cache). Use ``CrashDevice(size, seed=N)`` and print the seed in the test.
"""

from __future__ import annotations

import random
import threading

SECTOR = 512


class PowerLoss(OSError):
    """Raised by a write or sync issued after the injected power failure point."""


class CrashDevice:
    def __init__(self, size: int, *, seed: int = 0, image: bytearray | None = None) -> None:
        self.size = size
        self.durable = image if image is not None else bytearray(size)
        self.cache: dict[int, bytes] = {}  # sector index -> 512 bytes not yet durable
        self.rng = random.Random(seed)
        self.seed = seed
        self._lock = threading.Lock()
        self.syncs = 0
        self.writes = 0
        self.fail_writes = False  # inject EIO on writes
        self.power_fail_after: int | None = None  # this many more writes/syncs succeed, then PowerLoss

    def pread(self, offset: int, length: int) -> bytes:
        with self._lock:
            out = bytearray(self.durable[offset : offset + length])
            if self.cache:
                first, last = offset // SECTOR, (offset + length - 1) // SECTOR
                for s in range(first, last + 1):
                    data = self.cache.get(s)
                    if data is None:
                        continue
                    lo = max(offset, s * SECTOR)
                    hi = min(offset + length, (s + 1) * SECTOR)
                    out[lo - offset : hi - offset] = data[lo - s * SECTOR : hi - s * SECTOR]
            return bytes(out)

    def _tick(self) -> None:
        if self.power_fail_after is not None:
            if self.power_fail_after <= 0:
                raise PowerLoss(5, "injected power loss")
            self.power_fail_after -= 1

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_writes:
            raise OSError(5, "injected I/O error")
        self._tick()
        data = bytes(data)
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError("write past the end of the crash device")
        with self._lock:
            self.writes += 1
            pos = 0
            while pos < len(data):
                s = (offset + pos) // SECTOR
                so = (offset + pos) % SECTOR
                n = min(SECTOR - so, len(data) - pos)
                if so or n < SECTOR:
                    cur = bytearray(self.cache.get(s) or self.durable[s * SECTOR : (s + 1) * SECTOR])
                    cur[so : so + n] = data[pos : pos + n]
                    self.cache[s] = bytes(cur)
                else:
                    self.cache[s] = data[pos : pos + n]
                pos += n

    def sync(self) -> None:
        self._tick()
        with self._lock:
            for s, data in self.cache.items():
                self.durable[s * SECTOR : (s + 1) * SECTOR] = data
            self.cache.clear()
            self.syncs += 1

    def crash(self, mode: str = "random") -> dict[str, int]:
        """Lose power. ``mode``: 'drop' (cache lost), 'keep' (cache made it), 'tear' (each cached sector
        independently made it or not), 'random' (one of those, by the seeded RNG). Returns what happened."""
        self.power_fail_after = None
        with self._lock:
            if mode == "random":
                mode = self.rng.choice(["drop", "keep", "tear", "tear"])
            kept = 0
            for s in sorted(self.cache):
                if mode == "keep" or (mode == "tear" and self.rng.random() < 0.5):
                    self.durable[s * SECTOR : (s + 1) * SECTOR] = self.cache[s]
                    kept += 1
            lost = len(self.cache) - kept
            self.cache.clear()
            return {"kept_sectors": kept, "lost_sectors": lost}

    def close(self) -> None:
        pass

    def statistics(self) -> dict[str, int]:
        return {"writes": self.writes, "syncs": self.syncs, "cached_sectors": len(self.cache)}
