"""Byte stores for the repository: local directory, memory and S3, plus their wrappers.

:func:`open_store` is the only place a URL becomes a store and the only place wrappers are stacked::

    base (local | memory | s3)  ->  [faults]  ->  retry  ->  [read-only]

Fault injection sits *inside* the retry wrapper so injected transient faults exercise the real retry path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlparse

from baton.errors import StorageError
from baton.storage.base import Capabilities, ObjectInfo, Store
from baton.storage.wrappers import ReadOnlyStore, RetryingStore, RetryPolicy

DEFAULT_RETRY = RetryPolicy()

__all__ = ["DEFAULT_RETRY", "Capabilities", "ObjectInfo", "ReadOnlyStore", "RetryPolicy", "RetryingStore", "Store",
           "build_store", "open_base_store", "open_store"]


def open_base_store(url: str) -> Store:
    """The unwrapped store for ``url``: a path or ``file://`` URL, ``memory://NAME`` or ``s3://bucket/prefix``.

    Raises StorageError for an unknown scheme or a malformed URL.
    """
    if "://" not in url:
        from baton.storage.local import LocalStore

        return LocalStore(os.path.abspath(url))
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from baton.storage.local import LocalStore

        return LocalStore(parsed.path)
    if parsed.scheme == "memory":
        from baton.storage.objstore import open_memory

        return open_memory(parsed.netloc + parsed.path)
    if parsed.scheme == "s3":
        from baton.storage.objstore import open_s3

        if not parsed.netloc:
            raise StorageError(f"invalid S3 URL {url!r}: expected s3://bucket/prefix")
        return open_s3(parsed.netloc, parsed.path)
    raise StorageError(f"unsupported repository URL scheme {parsed.scheme!r} in {url!r}",
                       hint="use a directory path, file://PATH, s3://BUCKET/PREFIX or memory://NAME")


def build_store(base: Store, *, read_only: bool = False, retry: RetryPolicy | None = DEFAULT_RETRY,
                faults: Callable[[Store], Store] | None = None, sleep: Callable[[float], None] | None = None
                ) -> Store:
    """Stack the wrappers around ``base`` in the one fixed order (see the module docstring)."""
    store: Store = base
    if faults is not None:
        store = faults(store)
    if retry is not None:
        store = RetryingStore(store, retry, sleep=sleep) if sleep else RetryingStore(store, retry)
    if read_only:
        store = ReadOnlyStore(store)
    return store


def open_store(url: str, *, read_only: bool = False, retry: RetryPolicy | None = DEFAULT_RETRY,
               faults: Callable[[Store], Store] | None = None) -> Store:
    """:func:`open_base_store` plus :func:`build_store`."""
    return build_store(open_base_store(url), read_only=read_only, retry=retry, faults=faults)
