"""Behaviour added around any store: retry with backoff, read-only. Composed only by :func:`build_store`."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from baton.errors import StorageError, TransientStorageError
from baton.storage.base import ObjectInfo, Store

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n sleeps uniform(0, min(cap, base * 2**n))."""

    attempts: int = 5           # total tries, including the first
    base_delay: float = 0.2     # seconds
    max_delay: float = 5.0      # seconds


class RetryingStore:
    """Retries :class:`TransientStorageError`; after the last attempt raises a plain StorageError naming it.

    ``put_if_absent`` is retried too. If an attempt created the object but its reply was lost, the retry sees
    the object and returns False. Callers that need to know "did *I* create it" (locks) therefore re-read the
    object and compare contents; content-addressed callers (packs, pages) do not care.
    """

    def __init__(self, inner: Store, policy: RetryPolicy | None = None, *,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.capabilities = inner.capabilities
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = {"retries": 0, "gave_up": 0}

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except TransientStorageError as e:
                attempt += 1
                if attempt >= self.policy.attempts:
                    with self._lock:
                        self._stats["gave_up"] += 1
                    raise StorageError(f"{e} (gave up after {attempt} attempts)",
                                       hint="check the network and the object store, then run the command again"
                                       ) from e
                with self._lock:
                    self._stats["retries"] += 1
                    delay = self._rng.uniform(0, min(self.policy.max_delay,
                                                     self.policy.base_delay * 2 ** (attempt - 1)))
                self._sleep(delay)

    def put(self, key: str, data: bytes) -> None:
        self._run(f"put {key}", lambda: self.inner.put(key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._run(f"put {key}", lambda: self.inner.put_if_absent(key, data))

    def get(self, key: str) -> bytes:
        return self._run(f"get {key}", lambda: self.inner.get(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._run(f"get {key}", lambda: self.inner.get_range(key, start, length))

    def stat(self, key: str) -> ObjectInfo:
        return self._run(f"stat {key}", lambda: self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialised so a failure half-way is retried as a whole rather than yielding duplicates.
        return iter(self._run(f"list {prefix}", lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._run(f"delete {key}", lambda: self.inner.delete(key))

    def statistics(self) -> dict[str, int]:
        with self._lock:
            mine = dict(self._stats)
        return {**self.inner.statistics(), **mine}

    def close(self) -> None:
        self.inner.close()


class ReadOnlyStore:
    """Refuses every mutating verb with StorageError; reads pass through."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.capabilities = replace(inner.capabilities, read_only=True)

    def _refuse(self, key: str) -> StorageError:
        return StorageError(f"refusing to modify {key}: the repository is open read-only")

    def put(self, key: str, data: bytes) -> None:
        raise self._refuse(key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        raise self._refuse(key)

    def delete(self, key: str) -> None:
        raise self._refuse(key)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def statistics(self) -> dict[str, int]:
        return self.inner.statistics()

    def close(self) -> None:
        self.inner.close()
