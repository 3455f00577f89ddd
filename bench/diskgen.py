"""Test images with realistic content, the chunk changes applied to them, and raw device rates.

The image mixes extents the way a used disk does (the peer notes' ``make_disk.py`` proportions): about 29 %
zeros, 28 % incompressible data, 33 % text-like pages (about 4x compressible) and 10 % duplicates of earlier
extents at 4 KiB-aligned, not chunk-aligned, offsets. Everything is written, so the file is fully allocated and
a cold read really goes to the device. Content is a pure function of the seed: pseudo-random bytes come from
AES-CTR keyed by the seed (gigabytes per second, unlike ``random.randbytes``).
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bench.common import JSON, KiB, MiB

PAGE = 4 * KiB
_WORDS = [
    "block", "chunk", "record", "owner", "epoch", "backup", "restore", "cluster", "failover", "disk", "write",
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "with", "as", "on", "be", "at", "by", "this",
    "snapshot", "journal", "extent", "inode", "sector", "page", "bitmap", "index", "pack", "manifest", "node",
]


class Stream:
    """Deterministic pseudo-random bytes (AES-256-CTR keystream of a seeded key)."""

    def __init__(self, seed: int, label: str = "") -> None:
        key = hashlib.sha256(f"baton-bench:{seed}:{label}".encode()).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def read(self, n: int) -> bytes:
        return self._enc.update(bytes(n))


@functools.lru_cache(maxsize=8)
def text_pages(seed: int, count: int = 256) -> list[bytes]:
    """``count`` 4 KiB pages of Zipf-distributed words: compress about 4x with zstd-1."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(_WORDS))]
    pages: list[bytes] = []
    for i in range(count):
        words = rng.choices(_WORDS, weights, k=900)
        text = (f"{i:06d} " + " ".join(words) + "\n").encode()
        pages.append((text * (PAGE // len(text) + 1))[:PAGE] if len(text) < PAGE else text[:PAGE])
    return pages


def make_image(path: Path, size: int, seed: int) -> JSON:
    """Write a fully allocated image of ``size`` bytes (a multiple of 4 KiB) and fsync it.

    Returns its composition (bytes per kind) and the time it took. Raises OSError on I/O failure.
    """
    rng = random.Random(seed)
    rand = Stream(seed, "image")
    pages = text_pages(seed)
    kinds = {"zero": 0, "random": 0, "text": 0, "duplicate": 0}
    t0 = time.perf_counter()
    with open(path, "wb+", buffering=0) as f:
        pos = 0
        while pos < size:
            n = min(size - pos, rng.randrange(16, 8 * 256 + 1) * PAGE)  # 64 KiB .. 8 MiB
            kind = rng.choices(["zero", "random", "text", "duplicate"], [29, 28, 33, 10])[0]
            if kind == "duplicate" and pos < n + PAGE:
                kind = "random"
            written = 0
            while written < n:
                step = min(n - written, 4 * MiB)
                if kind == "zero":
                    buf = bytes(step)
                elif kind == "random":
                    buf = rand.read(step)
                elif kind == "text":
                    buf = b"".join(rng.choice(pages) for _ in range(step // PAGE))
                else:
                    src = rng.randrange(0, (pos - step) // PAGE + 1) * PAGE
                    buf = os.pread(f.fileno(), step, src)
                f.write(buf)
                written += step
            kinds[kind] += n
            pos += n
        os.fsync(f.fileno())
        if os.fstat(f.fileno()).st_size != size:
            raise OSError(f"{path}: short image, {os.fstat(f.fileno()).st_size} of {size} bytes")
    return {"bytes_by_kind": kinds, "seed": seed, "write_s": round(time.perf_counter() - t0, 3)}


def pick_chunks(n_chunks: int, rate_pct: float, rng: random.Random) -> list[int]:
    """Distinct chunk indices covering ``rate_pct`` % of ``n_chunks`` (at least one), sorted."""
    k = max(1, round(n_chunks * rate_pct / 100.0))
    return sorted(rng.sample(range(n_chunks), min(k, n_chunks)))


class AlignedBuffer:
    """A page-aligned anonymous mapping, as O_DIRECT needs."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        self.map.close()


def write_chunks(target: str, chunks: Sequence[int], chunk_size: int, seed: int) -> JSON:
    """Overwrite whole chunks of ``target`` (a block device or file) with new content using O_DIRECT,
    half incompressible, half text; fsync before returning, so every write is acknowledged and durable.
    Raises OSError on any failed write (EIO from a fenced device, ENOSPC...)."""
    rand = Stream(seed, "changes")
    pages = text_pages(seed + 1, 64)
    rng = random.Random(seed)
    buf = AlignedBuffer(chunk_size)
    t0 = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_DIRECT)
    try:
        for i, c in enumerate(chunks):
            if i % 2 == 0:
                data = rand.read(chunk_size)
            else:
                data = b"".join(rng.choice(pages) for _ in range(chunk_size // PAGE))
            buf.view[:] = data
            done = os.pwrite(fd, buf.view, c * chunk_size)
            if done != chunk_size:
                raise OSError(f"short write at chunk {c}: {done} of {chunk_size}")
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return {"chunks": len(chunks), "bytes": len(chunks) * chunk_size, "write_s": round(time.perf_counter() - t0, 4)}


def device_size(path: str) -> int:
    """Size in bytes of a block device or file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def seq_read_rate(path: Path, limit: int | None = None, block: int = 4 * MiB) -> JSON:
    """Sequential read rate of ``path`` with O_DIRECT 4 MiB reads (the caller drops caches first, and
    O_DIRECT bypasses whatever is left). This is the device rate used for the physical bound."""
    size = min(os.path.getsize(path), limit) if limit else os.path.getsize(path)
    buf = AlignedBuffer(block)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    t0 = time.perf_counter()
    done = 0
    try:
        while done < size:
            n = os.preadv(fd, [buf.view], done)
            if n <= 0:
                break
            done += n
    finally:
        os.close(fd)
        buf.close()
    dt = time.perf_counter() - t0
    return {"bytes": done, "seconds": round(dt, 4), "bytes_per_s": round(done / dt) if dt else 0}


def seq_write_rate(directory: Path, size: int, block: int = 4 * MiB) -> JSON:
    """Sequential O_DIRECT write rate of a new file in ``directory`` (fsync included); the file is removed.
    This is the restore target's rate that restores are compared with."""
    path = directory / "seq-write-probe.bin"
    buf = AlignedBuffer(block)
    buf.view[:] = Stream(7, "probe").read(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    t0 = time.perf_counter()
    done = 0
    try:
        while done < size:
            done += os.pwrite(fd, buf.view, done)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
        dt = time.perf_counter() - t0
        path.unlink(missing_ok=True)
    return {"bytes": done, "seconds": round(dt, 4), "bytes_per_s": round(done / dt) if dt else 0}


def files_identical(a: Path, b: Path, length: int | None = None, block: int = 4 * MiB) -> bool:
    """Byte comparison of the first ``length`` bytes (all of ``a`` by default); a missing or short file
    compares unequal."""
    n = os.path.getsize(a) if length is None else length
    try:
        if os.path.getsize(b) < n:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            left = n
            while left > 0:
                step = min(block, left)
                if fa.read(step) != fb.read(step):
                    return False
                left -= step
    except OSError:
        return False
    return True
