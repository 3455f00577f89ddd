"""The byte-store interface every repository backend implements: few verbs, capabilities in a frozen record.

A store maps keys (``/``-separated relative paths such as ``packs/ab/ab12...``) to immutable byte strings.
It knows nothing about packs, indexes or snapshots; that is :mod:`baton.repo`'s business.

Failure contract shared by every implementation (checked by :mod:`baton.testing.storage_suite`):

* a missing key raises :class:`~baton.errors.ObjectNotFound` from ``get``/``get_range``/``stat``;
* ``delete`` of a missing key is not an error (idempotent, so retries are safe);
* out of space or quota raises :class:`~baton.errors.RepoFull`;
* failures that may pass when retried raise :class:`~baton.errors.TransientStorageError`, everything else
  :class:`~baton.errors.StorageError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Capabilities:
    """What a store can promise. Frozen: wrappers derive a new record instead of mutating one."""

    scheme: str                 # "file", "memory", "s3"
    atomic_create: bool         # put_if_absent is a real conditional create (If-None-Match: * / link(2))
    durable: bool               # a returned put survives a crash of this machine
    read_only: bool = False     # every mutating verb raises StorageError


@dataclass(frozen=True)
class ObjectInfo:
    """Result of ``stat`` and ``list``: the key, its size in bytes and its modification time (UNIX seconds)."""

    key: str
    size: int
    mtime: float


@runtime_checkable
class Store(Protocol):
    """A dumb byte store. Every verb is synchronous and thread-safe."""

    capabilities: Capabilities

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any old object. Durable (per capabilities) on return."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist. True if this call created it, False if it existed."""

    def get(self, key: str) -> bytes:
        """The whole object. ObjectNotFound if missing."""

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``. ObjectNotFound if missing; a short object gives a short result."""

    def stat(self, key: str) -> ObjectInfo:
        """Size and mtime of ``key``. ObjectNotFound if missing."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (any string; sorted by key)."""

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is fine."""

    def statistics(self) -> dict[str, int]:
        """Counters of calls and bytes since creation."""

    def close(self) -> None:
        """Release resources. Calls after close are undefined."""


def check_key(key: str) -> str:
    """Reject keys that could escape the store root or that backends disagree about. Returns ``key``."""
    from baton.errors import StorageError

    if not key or key.startswith("/") or key.endswith("/") or "//" in key or "\\" in key:
        raise StorageError(f"invalid object key {key!r}")
    if any(part in (".", "..") or part.startswith(".tmp-") for part in key.split("/")):
        raise StorageError(f"invalid object key {key!r}")
    return key
