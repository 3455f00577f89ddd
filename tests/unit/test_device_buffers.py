"""baton.device.reuse_big_buffers: freed large buffers are reused instead of faulted in afresh (the full
backup's 1 MiB reads and the restore's ranged reads, allocated on pool threads), and release_free_memory
gives them back."""

from __future__ import annotations

import resource
from concurrent.futures import ThreadPoolExecutor

import pytest

from baton.device import release_free_memory, reuse_big_buffers

MiB = 1 << 20


def _read_like(i: int) -> bytes:
    buf = bytearray(MiB)            # a bounce buffer, filled, then copied out as the "read" (DirectDev.pread)
    buf[::4096] = bytes([i & 0xFF]) * len(buf[::4096])
    return bytes(buf)


def _faults(rounds: int, inflight: int) -> int:
    """Minor page faults for ``rounds`` of ``inflight`` 1 MiB reads made on pool threads, held together,
    then all freed: the shape of a backup's reads in flight (8 MiB of 1 MiB reads)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with ThreadPoolExecutor(max_workers=inflight) as pool:
        for r in range(rounds):
            bufs = list(pool.map(_read_like, range(r, r + inflight)))
            del bufs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_big_buffers_are_reused_not_faulted_in_again() -> None:
    if not reuse_big_buffers():
        pytest.skip("the C library has no mallopt (not glibc)")
    try:
        rounds, inflight = 25, 8
        fresh = rounds * inflight * 2 * (MiB // 4096)   # every page of both buffers of every read: 102,400
        faults = _faults(rounds, inflight)
        # Measured: about 18,000 with reuse, 57,000 with glibc's own thresholds.
        assert faults < fresh // 3, f"{faults} page faults of {fresh} possible"
    finally:
        release_free_memory()


def test_reader_threads_share_a_few_arenas() -> None:
    """After reuse_big_buffers, threads started later share at most one arena per core (glibc: 8 per core by
    default), so each read thread does not keep freed buffers of its own. In a fresh process: arenas are
    never destroyed, and this one has made its own already."""
    import subprocess
    import sys

    code = """
import ctypes, os, sys, threading
from baton.device import BIG_BUFFERS_ARENAS, reuse_big_buffers
if not reuse_big_buffers():
    print("skip"); sys.exit(0)
hold, go = [], threading.Barrier(16)
def work():
    hold.append(bytes(bytearray(1 << 20)))  # allocated on this thread, held until every thread has one
    go.wait()
ts = [threading.Thread(target=work) for _ in range(16)]
for t in ts: t.start()
for t in ts: t.join()
libc = ctypes.CDLL(None)
# malloc_info writes XML to a FILE*: count its <heap> elements
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
libc.open_memstream.restype = ctypes.c_void_p
fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, ctypes.c_void_p(fp)); libc.fclose(ctypes.c_void_p(fp))
print(buf.value.decode().count("<heap nr="), BIG_BUFFERS_ARENAS)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out == ["skip"]:
        pytest.skip("the C library has no mallopt (not glibc)")
    heaps, cap = int(out[0]), int(out[1])
    assert heaps <= cap, f"{heaps} arenas for 16 threads, expected at most {cap}"


def test_populate_faults_pages_in_without_changing_bytes() -> None:
    """device.populate: after it, writing the buffer takes no page faults, and what was there is still there."""
    import resource

    from baton.device import populate, uninitialized_bytearray

    buf = uninitialized_bytearray(8 << 20)
    assert isinstance(buf, bytearray) and len(buf) == 8 << 20
    buf[:4] = b"head"
    assert populate(buf)
    assert buf[:4] == b"head"
    blob = bytes(range(256)) * 256
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for pos in range(4, len(buf) - len(blob), len(blob)):  # as the writer fills a pack
        buf[pos:pos + len(blob)] = blob
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 64, faults  # about 2,000 without populate
