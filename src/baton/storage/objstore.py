"""Stores backed by obstore: ``memory://`` (tests) and ``s3://bucket/prefix`` (any S3-compatible endpoint).

obstore's own retry loop is switched off (``max_retries=0``): retries live in exactly one place,
:class:`baton.storage.wrappers.RetryingStore`, so fault injection and backoff are testable and bounded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)

from baton.errors import ObjectNotFound, RepoFull, StorageError, TransientStorageError
from baton.storage.base import Capabilities, ObjectInfo, check_key

# Substrings of obstore's error text that mean "out of space/quota" on S3-compatible stores.
_FULL_MARKERS = ("QuotaExceeded", "EntityTooLarge", "No space left", "XMinioStorageFull", "InsufficientStorage")


def _map_error(err: BaseException, what: str) -> BaseException:
    """Translate an obstore/OS exception into Baton's error tree (the caller raises the result)."""
    text = str(err)
    if isinstance(err, NotFoundError | FileNotFoundError):
        return ObjectNotFound(f"{what}: no such object")
    if any(m in text for m in _FULL_MARKERS):
        return RepoFull(f"{what}: the store is out of space or quota", hint="free space or prune the repository")
    if isinstance(err, PermissionDeniedError | UnauthenticatedError):
        return StorageError(f"{what}: access denied ({text.splitlines()[0] if text else type(err).__name__})",
                            hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy")
    # Everything else from the HTTP layer (connection refused/reset, timeouts, 5xx, throttling) may pass
    # on a retry; RetryingStore turns persistent ones into a plain StorageError.
    first = text.splitlines()[0] if text else type(err).__name__
    return TransientStorageError(f"{what}: {first}")


class ObjectStore:
    """Adapter from an obstore store to :class:`baton.storage.base.Store`."""

    def __init__(self, store: Any, capabilities: Capabilities) -> None:
        self._store = store
        self.capabilities = capabilities
        self._lock = threading.Lock()
        self._stats = {"puts": 0, "gets": 0, "lists": 0, "deletes": 0, "bytes_written": 0, "bytes_read": 0}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def put(self, key: str, data: bytes) -> None:
        try:
            obstore.put(self._store, check_key(key), data)
        except StorageError:
            raise
        except Exception as e:
            raise _map_error(e, f"put {key}") from e
        self._count("puts")
        self._count("bytes_written", len(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            obstore.put(self._store, check_key(key), data, mode="create")
        except (AlreadyExistsError, PreconditionError, FileExistsError):
            self._count("puts")
            return False
        except StorageError:
            raise
        except Exception as e:
            raise _map_error(e, f"put {key}") from e
        self._count("puts")
        self._count("bytes_written", len(data))
        return True

    def get(self, key: str) -> bytes:
        try:
            data = bytes(obstore.get(self._store, check_key(key)).bytes())
        except StorageError:
            raise
        except Exception as e:
            raise _map_error(e, f"get {key}") from e
        self._count("gets")
        self._count("bytes_read", len(data))
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise StorageError(f"get_range {key}: negative start or length")
        if length == 0:
            self.stat(key)
            return b""
        try:
            data = bytes(obstore.get_range(self._store, check_key(key), start=start, length=length))
        except StorageError:
            raise
        except Exception as e:
            # A range starting at or beyond the end is "unsatisfiable" on S3; the contract says short read.
            if "range" in str(e).lower() and not isinstance(e, NotFoundError | FileNotFoundError):
                info = self.stat(key)
                if start >= info.size:
                    return b""
            raise _map_error(e, f"get {key}") from e
        self._count("gets")
        self._count("bytes_read", len(data))
        return data

    def stat(self, key: str) -> ObjectInfo:
        try:
            meta = obstore.head(self._store, check_key(key))
        except StorageError:
            raise
        except Exception as e:
            raise _map_error(e, f"stat {key}") from e
        return ObjectInfo(key, int(meta["size"]), meta["last_modified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("lists")
        # obstore matches prefixes by whole path segments; list the enclosing "directory" and filter, so a
        # partial last segment ("locks/shared-") behaves the same on every backend.
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        try:
            batches = list(obstore.list(self._store, prefix=directory or None))
        except StorageError:
            raise
        except Exception as e:
            raise _map_error(e, f"list {prefix or '/'}") from e
        items = [ObjectInfo(m["path"], int(m["size"]), m["last_modified"].timestamp())
                 for batch in batches for m in batch if m["path"].startswith(prefix)]
        items.sort(key=lambda i: i.key)
        yield from items

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, check_key(key))
        except (NotFoundError, FileNotFoundError):
            pass
        except StorageError:
            raise
        except Exception as e:
            raise _map_error(e, f"delete {key}") from e
        self._count("deletes")

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        pass


_MEMORY: dict[str, Any] = {}
_MEMORY_LOCK = threading.Lock()


def open_memory(name: str) -> ObjectStore:
    """A process-wide in-memory store; the same ``memory://NAME`` gives the same objects (tests reopen)."""
    from obstore.store import MemoryStore

    with _MEMORY_LOCK:
        st = _MEMORY.get(name)
        if st is None:
            st = _MEMORY[name] = MemoryStore()
    return ObjectStore(st, Capabilities(scheme="memory", atomic_create=True, durable=False))


def open_s3(bucket: str, prefix: str) -> ObjectStore:
    """An S3 store. Endpoint and credentials come from the standard AWS_* environment variables.

    ``AWS_ENDPOINT_URL`` selects a non-AWS endpoint; plain ``http://`` is allowed only for loopback
    addresses (test servers), never for remote hosts, so credentials do not cross a network in clear.
    """
    from obstore.store import S3Store

    if len(bucket) < 3:
        raise StorageError(f"invalid S3 bucket name {bucket!r} (3 characters or more)")
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    client: dict[str, Any] = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=120)}
    if endpoint:
        kwargs["endpoint"] = endpoint
        host = endpoint.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if endpoint.startswith("http://"):
            if host not in ("127.0.0.1", "localhost", "[::1]"):
                raise StorageError(f"refusing plain-HTTP S3 endpoint {endpoint}: only loopback may use http")
            client["allow_http"] = True
    for env, key in (("AWS_ACCESS_KEY_ID", "access_key_id"), ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
                     ("AWS_SESSION_TOKEN", "token")):
        if os.environ.get(env):
            kwargs[key] = os.environ[env]
    kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    try:
        st = S3Store(bucket, prefix=prefix.strip("/") or None, client_options=client,  # type: ignore[arg-type]
                     retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)}, **kwargs)
    except Exception as e:
        raise StorageError(f"cannot configure S3 store s3://{bucket}/{prefix}: {e}") from e
    return ObjectStore(st, Capabilities(scheme="s3", atomic_create=True, durable=True))
