"""A store wrapper that injects faults by rule, deterministically from a seed (kopia's blobtesting/faulty).

Example::

    faults = FaultyStore.factory(seed=1234, rules=[Fault("put", "packs/", "enospc", after=3)])
    repo = Repository.open(url, store=build_store(open_base_store(url), faults=faults))

Kinds:

* ``transient``: raise TransientStorageError before the call (the retry wrapper should absorb it);
* ``permanent``: raise StorageError before the call;
* ``enospc``: raise RepoFull before the call;
* ``lost-reply``: perform the call, then raise TransientStorageError (the reply was lost);
* ``corrupt``: perform a get/get_range and flip one byte of the result (chosen by the seeded RNG);
* ``truncate``: perform a get/get_range and drop the last byte;
* ``dead``: the process using the store died here: this call and every later one fail with StorageError and
  reach nothing (also set directly with ``store.dead = True``, to kill the process at a point of its own).

A rule fires on matching calls (verb and key prefix) once ``after`` matching calls have passed, at most
``times`` times (None = forever), each time with probability ``probability``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from baton.errors import RepoFull, StorageError, TransientStorageError
from baton.storage import ObjectInfo, Store

KINDS = ("transient", "permanent", "enospc", "lost-reply", "corrupt", "truncate", "dead")


@dataclass
class Fault:
    verb: str                      # "put" (also put_if_absent), "get" (also get_range), "stat", "list",
                                   # "delete" or "*"
    prefix: str = ""
    kind: str = "transient"
    after: int = 0
    times: int | None = 1
    probability: float = 1.0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")


class FaultyStore:
    """Wraps a store; see the module docstring. ``statistics()`` counts faults fired per kind."""

    def __init__(self, inner: Store, rules: list[Fault], seed: int) -> None:
        self.inner = inner
        self.rules = rules
        self.seed = seed
        self.capabilities = inner.capabilities
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._fired: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.dead = False  # see the ``dead`` kind

    @classmethod
    def factory(cls, rules: list[Fault], seed: int) -> Callable[[Store], Store]:
        return lambda inner: cls(inner, rules, seed)

    def _pick(self, verb: str, key: str) -> Fault | None:
        with self._lock:
            for r in self.rules:
                if r.verb not in (verb, "*") or not key.startswith(r.prefix):
                    continue
                r.seen += 1
                if r.seen <= r.after or (r.times is not None and r.fired >= r.times):
                    continue
                if self._rng.random() >= r.probability:
                    continue
                r.fired += 1
                self._fired[r.kind] += 1
                return r
        return None

    def _before(self, fault: Fault | None, what: str) -> None:
        if fault is not None and fault.kind == "dead":
            self.dead = True
        if self.dead:
            raise StorageError(f"{what}: the process using the store is dead (injected, seed {self.seed})")
        if fault is None:
            return
        if fault.kind == "transient":
            raise TransientStorageError(f"{what}: injected transient fault (seed {self.seed})")
        if fault.kind == "permanent":
            raise StorageError(f"{what}: injected permanent fault (seed {self.seed})")
        if fault.kind == "enospc":
            raise RepoFull(f"{what}: injected ENOSPC (seed {self.seed})")

    def _after(self, fault: Fault | None, what: str, data: bytes) -> bytes:
        if fault is None:
            return data
        if fault.kind == "lost-reply":
            raise TransientStorageError(f"{what}: injected lost reply (seed {self.seed})")
        if fault.kind == "corrupt" and data:
            with self._lock:
                pos = self._rng.randrange(len(data))
            b = bytearray(data)
            b[pos] ^= 0xFF
            return bytes(b)
        if fault.kind == "truncate" and data:
            return data[:-1]
        return data

    def put(self, key: str, data: bytes) -> None:
        f = self._pick("put", key)
        self._before(f, f"put {key}")
        self.inner.put(key, data)
        self._after(f, f"put {key}", b"")

    def put_if_absent(self, key: str, data: bytes) -> bool:
        f = self._pick("put", key)
        self._before(f, f"put {key}")
        created = self.inner.put_if_absent(key, data)
        self._after(f, f"put {key}", b"")
        return created

    def get(self, key: str) -> bytes:
        f = self._pick("get", key)
        self._before(f, f"get {key}")
        return self._after(f, f"get {key}", self.inner.get(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        f = self._pick("get", key)
        self._before(f, f"get {key}")
        return self._after(f, f"get {key}", self.inner.get_range(key, start, length))

    def stat(self, key: str) -> ObjectInfo:
        f = self._pick("stat", key)
        self._before(f, f"stat {key}")
        info = self.inner.stat(key)
        self._after(f, f"stat {key}", b"")
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        f = self._pick("list", prefix)
        self._before(f, f"list {prefix}")
        items = list(self.inner.list(prefix))
        self._after(f, f"list {prefix}", b"")
        return iter(items)

    def delete(self, key: str) -> None:
        f = self._pick("delete", key)
        self._before(f, f"delete {key}")
        self.inner.delete(key)
        self._after(f, f"delete {key}", b"")

    def statistics(self) -> dict[str, int]:
        with self._lock:
            fired = {f"faults_{k.replace('-', '_')}": v for k, v in self._fired.items()}
        return {**self.inner.statistics(), **fired}

    def close(self) -> None:
        self.inner.close()
