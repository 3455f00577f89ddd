"""Repository locks: shared (backup, restore, verify, forget) and exclusive (prune).

Objects (envelope magic BTNLOCK\\0, JSON body, never encrypted so any client can see who holds what):

* ``locks/exclusive``: created with put_if_absent (S3 ``If-None-Match: *``, local ``link(2)``), so at most one
  exclusive holder exists;
* ``locks/shared-<id>``: one per shared holder.

Protocol: a shared holder writes its object *then* checks for a live exclusive lock; an exclusive holder
creates its object *then* lists shared locks. On a linearisable store (S3, local) at least one of two racing
parties sees the other and backs off, so prune and backup never both proceed. A lock is stale when its
``expires`` time has passed or, on the same host, its process is gone; stale locks are removed by whoever
finds them. Holders refresh (rewrite with a later ``expires``) while they work.

Concurrency matrix (Y = may run together)::

                 backup restore verify forget prune
    backup         Y      Y       Y      Y      -
    restore        Y      Y       Y      Y      -
    verify         Y      Y       Y      Y      -
    forget         Y      Y       Y      Y      -
    prune          -      -       -      -      -
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from baton.errors import ObjectNotFound, RepoCorrupt, RepoLocked
from baton.format.repo_envelope import MAGIC_LOCK, seal, unseal
from baton.storage import Store
from baton.util import pid_alive

EXCLUSIVE_KEY = "locks/exclusive"
SHARED_PREFIX = "locks/shared-"
DEFAULT_TTL = 30 * 60.0          # seconds a lock stays valid without refresh
REFRESH_AFTER = 5 * 60.0         # holders refresh when their lock is this old


@dataclass(frozen=True)
class LockInfo:
    lock_id: str
    kind: str          # "shared" | "exclusive"
    op: str            # "backup", "prune", ...
    node: str
    host: str
    pid: int
    created: float
    expires: float

    def encode(self) -> bytes:
        return seal(MAGIC_LOCK, json.dumps(asdict(self), sort_keys=True).encode())

    @classmethod
    def decode(cls, data: bytes, name: str) -> LockInfo:
        try:
            return cls(**json.loads(unseal(data, MAGIC_LOCK, name=name)))
        except (TypeError, ValueError) as e:
            raise RepoCorrupt(f"{name}: malformed lock ({e})") from e

    def describe(self) -> str:
        return (f"{self.kind} lock for {self.op} by node {self.node or '?'} on {self.host} pid {self.pid}, "
                f"expires {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.expires))}")


_pid_alive = pid_alive


class RepoLock:
    """A held lock. Create with :meth:`acquire_shared` / :meth:`acquire_exclusive`; release exactly once."""

    def __init__(self, store: Store, key: str, info: LockInfo, ttl: float, now: Callable[[], float]) -> None:
        self.store, self.key, self.info, self.ttl, self._now = store, key, info, ttl, now
        self.released = False
        self._stats = {"refreshes": 0}

    @staticmethod
    def is_stale(info: LockInfo, now: float) -> bool:
        if info.expires < now:
            return True
        return info.host == socket.gethostname() and not _pid_alive(info.pid)

    @staticmethod
    def _info(kind: str, op: str, node: str, ttl: float, now: float) -> LockInfo:
        return LockInfo(secrets.token_hex(8), kind, op, node, socket.gethostname(), os.getpid(), now, now + ttl)

    @classmethod
    def acquire_shared(cls, store: Store, op: str, node: str = "", *, ttl: float = DEFAULT_TTL,
                       now: Callable[[], float] = time.time, wait: float = 0.0,
                       sleep: Callable[[float], None] = time.sleep) -> RepoLock:
        """Hold a shared lock, or raise RepoLocked naming the live exclusive holder.

        With ``wait`` > 0, retry every few seconds for up to ``wait`` seconds while prune holds the lock
        (a timer-driven backup should wait out a prune rather than be skipped).
        """
        deadline = now() + wait
        while True:
            try:
                return cls._acquire_shared_once(store, op, node, ttl=ttl, now=now)
            except RepoLocked:
                if now() >= deadline:
                    raise
                sleep(min(5.0, max(0.1, deadline - now())))

    @classmethod
    def _acquire_shared_once(cls, store: Store, op: str, node: str, *, ttl: float,
                             now: Callable[[], float]) -> RepoLock:
        info = cls._info("shared", op, node, ttl, now())
        key = SHARED_PREFIX + info.lock_id
        store.put(key, info.encode())
        lock = cls(store, key, info, ttl, now)
        try:
            other = cls._read(store, EXCLUSIVE_KEY)
        except BaseException:
            lock.release()
            raise
        if other is not None:
            if cls.is_stale(other, now()):
                store.delete(EXCLUSIVE_KEY)
            else:
                lock.release()
                raise RepoLocked(f"the repository is locked: {other.describe()}",
                                 hint="wait for it to finish; a crashed holder's lock expires by itself")
        return lock

    @classmethod
    def acquire_exclusive(cls, store: Store, op: str, node: str = "", *, ttl: float = DEFAULT_TTL,
                          now: Callable[[], float] = time.time) -> RepoLock:
        """Hold the exclusive lock, or raise RepoLocked naming a live holder."""
        info = cls._info("exclusive", op, node, ttl, now())
        for _attempt in range(2):
            if store.put_if_absent(EXCLUSIVE_KEY, info.encode()):
                break
            other = cls._read(store, EXCLUSIVE_KEY)
            if other is not None and other.lock_id == info.lock_id:
                break  # our own create whose reply was lost and retried
            if other is not None and not cls.is_stale(other, now()):
                raise RepoLocked(f"the repository is locked: {other.describe()}")
            store.delete(EXCLUSIVE_KEY)
        else:
            raise RepoLocked("could not take the exclusive lock (another client keeps replacing it)")
        lock = cls(store, EXCLUSIVE_KEY, info, ttl, now)
        try:
            for obj in store.list(SHARED_PREFIX):
                other = cls._read(store, obj.key)
                if other is None:
                    continue
                if cls.is_stale(other, now()):
                    store.delete(obj.key)
                    continue
                raise RepoLocked(f"the repository is in use: {other.describe()}",
                                 hint="prune runs when no backup, restore or verify is running")
        except BaseException:
            lock.release()
            raise
        return lock

    @staticmethod
    def _read(store: Store, key: str) -> LockInfo | None:
        try:
            return LockInfo.decode(store.get(key), key)
        except ObjectNotFound:
            return None

    def refresh(self, force: bool = False) -> None:
        """Rewrite the lock with a later expiry if it is older than REFRESH_AFTER (or ``force``)."""
        if self.released:
            return
        t = self._now()
        if not force and t - (self.info.expires - self.ttl) < REFRESH_AFTER:
            return
        self.info = LockInfo(self.info.lock_id, self.info.kind, self.info.op, self.info.node, self.info.host,
                             self.info.pid, self.info.created, t + self.ttl)
        self.store.put(self.key, self.info.encode())
        self._stats["refreshes"] += 1

    def release(self) -> None:
        """Remove the lock object (idempotent)."""
        if not self.released:
            self.released = True
            self.store.delete(self.key)

    def statistics(self) -> dict[str, int]:
        return dict(self._stats)


def list_locks(store: Store) -> list[LockInfo]:
    out = []
    for obj in store.list("locks/"):
        info = RepoLock._read(store, obj.key)
        if info is not None:
            out.append(info)
    return out
