"""Process-wide worker threads for the engines, started once and reused by every backup of the process.

A per-disk daemon backs its disk up again and again. With a ThreadPoolExecutor per backup it started about
40 threads each time (32 readers, 2 encoders, 8 page stores, 1 uploader), one per submit until the pool was
full, and each start waits until the new thread first holds the GIL, which the busy encode threads keep for up
to the interpreter's switch interval. In a profile of a 1 % incremental of a 4 GiB disk the starts cost about
45 ms of the backup's main thread. :func:`shared_pool` hands out one executor per (name, size) for the life of
the process instead; its idle threads sleep on a queue (a few KiB of stack each) and keep their thread-local
compressors.

Rules for the code that uses a shared pool:

* never shut it down: wait for (or cancel) the futures you submitted, with :func:`finish`;
* a task never waits for another task of the same pool, so two users of one pool (two backups in one process)
  can only slow each other down, never deadlock;
* a child made by ``fork`` without ``exec`` starts with no pools (its parent's threads do not exist there).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

_lock = threading.Lock()
_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's executor of ``workers`` threads named ``name``-N, made on first use."""
    key = (name, max(1, workers))
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(max_workers=key[1], thread_name_prefix=name)
        return pool


PRESTART_HOLD = 0.2  # seconds a prestart task waits at most for the others to be running too


def prestart(pool: ThreadPoolExecutor, workers: int) -> None:
    """Start ``workers`` threads of ``pool`` now (a pool starts a thread per submit only while none is idle):
    a daemon does it once at start, off the I/O path, so that even its first backup starts none.

    Each task holds its thread until all ``workers`` tasks run at once (so each submit found every thread
    busy and started another), then all end together, within milliseconds: a backup that starts meanwhile
    never queues behind them. A task waits at most PRESTART_HOLD and never for the thread that submitted it:
    a daemon that exits while this runs (its preload thread is a daemon thread, which stops where it is)
    still exits, where tasks waiting for a signal from the stopped thread hung the interpreter's join of the
    pools' threads for ever."""
    ready = threading.Condition()
    running = 0

    def hold() -> None:
        nonlocal running
        with ready:
            running += 1
            ready.notify_all()
            ready.wait_for(lambda: running >= workers, timeout=PRESTART_HOLD)

    futs = []
    try:
        for _ in range(workers):
            futs.append(pool.submit(hold))
    finally:
        wait(futs)


def finish(futures: Iterable[Future[Any] | None]) -> None:
    """Cancel the given futures that have not started and wait for the ones that have: when this returns, none
    of them runs or will run (what a ``shutdown(wait=True, cancel_futures=True)`` of a private pool did)."""
    running = [f for f in futures if f is not None and not f.cancel()]
    if running:
        wait(running)


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
