"""Memory pages of an all-zero stretch of a set's bits handed back to the kernel while the set lives.

Why: a record region of a 1 TiB disk at 64 KiB chunks is 2 MiB of bits, and during an incremental after a
failover four such sets live at once (the owner's slot, the frozen set, the backup's copy, the tracker's
copy-before-write set). Two of them are all zero or become so as the backup goes on: the owner's slot, emptied
by the freeze, and the frozen set, cleared batch by batch; the tracker's set is cleared as the chunks are read.
A ``bytearray`` keeps every page it ever touched resident, zero or not.

How: ``madvise(MADV_DONTNEED)`` on the whole memory pages strictly inside a stretch of the set's buffer that is
all zero. The buffer is ordinary heap memory (private and anonymous: glibc's heaps and its mmap'd chunks), and
for such memory the kernel drops the pages and maps a zero page again on the next touch, so the bytes read as
zero afterwards, exactly what they held; only whole pages inside the buffer are given back, never the
allocator's headers around it. glibc's ``free`` gives memory back the same way. Where it can't be done (no
``madvise``) nothing happens: it only saves memory.
"""

from __future__ import annotations

import ctypes
import mmap

from baton.device import libc_handle

MADV_DONTNEED = 4  # Linux
PAGE = mmap.PAGESIZE


def buffer_address(buf: bytearray) -> int:
    """Address of ``buf[0]`` (valid until ``buf`` is resized; a set's bits never are)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if buf else 0


def release_zero_pages(buf: bytearray, lo: int = 0, hi: int | None = None, *, address: int | None = None) -> int:
    """Hand back to the kernel every memory page that lies wholly inside ``buf``, overlaps ``buf[lo:hi]``
    (default: all of it) and holds only zero bytes (each page is checked). ``address``: :func:`buffer_address`
    of ``buf``, when the caller keeps it. Returns the bytes handed back."""
    n = len(buf)
    hi = n if hi is None else min(hi, n)
    lo = max(lo, 0)
    if hi <= lo or n < PAGE:
        return 0
    base = buffer_address(buf) if address is None else address
    first = max((base + lo) // PAGE * PAGE, (base + PAGE - 1) // PAGE * PAGE)
    end = min((base + hi + PAGE - 1) // PAGE * PAGE, (base + n) // PAGE * PAGE)
    released = 0
    run = 0  # start of the current run of zero pages (0: none)
    for a in range(first, max(first, end) + PAGE, PAGE):
        zero = a < end and buf.count(0, a - base, a - base + PAGE) == PAGE
        if zero and not run:
            run = a
        elif not zero and run:
            released += _dontneed(run, a - run)
            run = 0
    return released


def _dontneed(address: int, length: int) -> int:
    libc = libc_handle()
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_DONTNEED) != 0:
        return 0
    return length
