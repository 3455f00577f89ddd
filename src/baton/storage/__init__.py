"""Byte stores for the repository: local directory, memory and S3, plus their wrappers.

:func:`open_store` is the only place a URL becomes a store and the only place wrappers are stacked::

    base (local | memory | s3)  ->  [faults]  ->  retry  ->  [read-only]

Fault injection sits *inside* the retry wrapper so injected transient faults exercise the real retry path.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from baton.errors import RepoError, StorageError, UsageError

if TYPE_CHECKING:
    from baton.storage.base import Capabilities, ObjectInfo, Store
    from baton.storage.wrappers import ReadOnlyStore, RetryingStore, RetryPolicy

    DEFAULT_RETRY: RetryPolicy

# The store classes load on first use (PEP 562): `baton backup NAME` only checks the URL (check_url) before its
# request to the daemon, and base + wrappers (dataclasses, random, urllib) cost it ~7 ms of start-up.
_LAZY = {"Capabilities": "base", "ObjectInfo": "base", "Store": "base", "ReadOnlyStore": "wrappers",
         "RetryingStore": "wrappers", "RetryPolicy": "wrappers"}


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_RETRY":
        value: Any = importlib.import_module("baton.storage.wrappers").RetryPolicy()
    elif name in _LAZY:
        value = getattr(importlib.import_module(f"baton.storage.{_LAZY[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once: DEFAULT_RETRY is one object
    return value


def _default_retry() -> RetryPolicy:
    policy: RetryPolicy = globals().get("DEFAULT_RETRY") or __getattr__("DEFAULT_RETRY")
    return policy


__all__ = ["DEFAULT_RETRY", "Capabilities", "ObjectInfo", "ReadOnlyStore", "RetryPolicy", "RetryingStore", "Store",
           "build_store", "check_url", "open_base_store", "open_store"]

SCHEMES = ("file", "memory", "s3")


def check_url(url: str) -> None:
    """Refuse a repository URL that no store can serve, before anything is opened or created.

    UsageError (exit 2) for an unsupported scheme; RepoError for a local path (or ``file://`` URL) that names an
    existing regular file or other non-directory, which is never a repository. Says nothing about whether a
    repository exists there: opening it does.
    """
    if "://" in url:
        from urllib.parse import urlparse

        parsed = urlparse(url)
        if parsed.scheme not in SCHEMES:
            raise UsageError(f"unsupported repository URL scheme {parsed.scheme!r} in {url!r}",
                             hint="use a directory path, file://PATH, s3://BUCKET/PREFIX or memory://NAME")
        if parsed.scheme != "file":
            return
        path = parsed.path
    else:
        path = url
    if os.path.exists(path) and not os.path.isdir(path):
        what = "a file" if os.path.isfile(path) else "not a directory"
        raise RepoError(f"{url} is {what}, not a repository (a local repository is a directory)",
                        hint="pass the repository's directory, or create one with `baton repo init DIR` at a "
                             "path that does not exist yet")


def open_base_store(url: str) -> Store:
    """The unwrapped store for ``url``: a path or ``file://`` URL, ``memory://NAME`` or ``s3://bucket/prefix``.

    Raises UsageError for an unknown scheme, RepoError for a path that is a file (see :func:`check_url`),
    StorageError for a malformed URL.
    """
    check_url(url)
    if "://" not in url:
        from baton.storage.local import LocalStore

        return LocalStore(os.path.abspath(url))
    from urllib.parse import urlparse

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
    raise AssertionError(f"check_url let {url!r} through")  # unreachable: check_url knows every scheme


def build_store(base: Store, *, read_only: bool = False, retry: RetryPolicy | EllipsisType | None = ...,
                faults: Callable[[Store], Store] | None = None, sleep: Callable[[float], None] | None = None
                ) -> Store:
    """Stack the wrappers around ``base`` in the one fixed order (see the module docstring). ``retry``:
    DEFAULT_RETRY when not given, None for no retries."""
    from baton.storage.wrappers import ReadOnlyStore, RetryingStore

    if isinstance(retry, EllipsisType):
        retry = _default_retry()
    store: Store = base
    if faults is not None:
        store = faults(store)
    if retry is not None:
        store = RetryingStore(store, retry, sleep=sleep) if sleep else RetryingStore(store, retry)
    if read_only:
        store = ReadOnlyStore(store)
    return store


def open_store(url: str, *, read_only: bool = False, retry: RetryPolicy | EllipsisType | None = ...,
               faults: Callable[[Store], Store] | None = None) -> Store:
    """:func:`open_base_store` plus :func:`build_store`."""
    return build_store(open_base_store(url), read_only=read_only, retry=retry, faults=faults)
