"""The storage conformance suite against the local and memory stores, plus the wrappers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from baton.errors import ObjectNotFound, RepoFull, StorageError, TransientStorageError, UsageError
from baton.storage import RetryingStore, RetryPolicy, Store, build_store, open_base_store, open_store
from baton.testing.faulty_storage import Fault, FaultyStore
from baton.testing.storage_suite import CHECKS


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Store]:
    if request.param == "local":
        s = open_store(str(tmp_path))
    else:
        s = open_store(f"memory://suite-{uuid.uuid4().hex}")
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(check, store: Store) -> None:  # type: ignore[no-untyped-def]
    check(store)


def test_local_put_leaves_no_temp_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = open_store(str(tmp_path))
    s.put("x/y", b"1")
    assert s.put_if_absent("x/y", b"2") is False
    assert sorted(os.listdir(tmp_path / "x")) == ["y"]


def test_unknown_scheme() -> None:
    with pytest.raises(UsageError):  # a wrong command line (exit 2), not a failing store (issue 9, defect 11)
        open_base_store("ftp://host/x")


def test_retry_absorbs_transient_faults() -> None:
    seed = 4242
    print("seed", seed)
    base = open_base_store(f"memory://retry-{uuid.uuid4().hex}")
    rules = [Fault("put", "", "transient", times=3), Fault("get", "", "transient", times=2)]
    s = build_store(base, faults=FaultyStore.factory(rules, seed), sleep=lambda _t: None)
    s.put("k", b"v")
    assert s.get("k") == b"v"
    st = s.statistics()
    assert st["retries"] == 5 and st["faults_transient"] == 5


def test_retry_gives_up_with_storage_error() -> None:
    base = open_base_store(f"memory://retry-{uuid.uuid4().hex}")
    s = build_store(base, faults=FaultyStore.factory([Fault("*", "", "transient", times=None)], 1),
                    retry=RetryPolicy(attempts=3), sleep=lambda _t: None)
    with pytest.raises(StorageError) as ei:
        s.put("k", b"v")
    assert not isinstance(ei.value, TransientStorageError)
    assert "gave up after 3 attempts" in str(ei.value)


def test_retry_does_not_retry_missing_or_full() -> None:
    calls = []

    class Full:
        capabilities = open_base_store("memory://x").capabilities

        def get(self, key: str) -> bytes:
            calls.append(key)
            raise ObjectNotFound("nope")

        def put(self, key: str, data: bytes) -> None:
            calls.append(key)
            raise RepoFull("full")

    r = RetryingStore(Full(), RetryPolicy(attempts=5), sleep=lambda _t: None)  # type: ignore[arg-type]
    with pytest.raises(ObjectNotFound):
        r.get("a")
    with pytest.raises(RepoFull):
        r.put("b", b"")
    assert calls == ["a", "b"]


def test_lost_reply_on_put_if_absent_reports_existing() -> None:
    base = open_base_store(f"memory://lost-{uuid.uuid4().hex}")
    s = build_store(base, faults=FaultyStore.factory([Fault("put", "", "lost-reply")], 7), sleep=lambda _t: None)
    assert s.put_if_absent("k", b"v") is False      # created by the first attempt, seen by the retry
    assert s.get("k") == b"v"


def test_read_only_refuses_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    open_store(str(tmp_path)).put("a", b"1")
    ro = open_store(str(tmp_path), read_only=True)
    assert ro.get("a") == b"1"
    for fn in (lambda: ro.put("a", b""), lambda: ro.put_if_absent("b", b""), lambda: ro.delete("a")):
        with pytest.raises(StorageError):
            fn()
    assert ro.capabilities.read_only


def test_s3_error_mapping() -> None:
    from obstore.exceptions import GenericError, PermissionDeniedError

    from baton.storage.objstore import _map_error

    assert isinstance(_map_error(GenericError("QuotaExceeded: bucket quota"), "put k"), RepoFull)
    assert isinstance(_map_error(GenericError("error sending request: connection refused"), "get k"),
                      TransientStorageError)
    denied = _map_error(PermissionDeniedError("AccessDenied"), "get k")
    assert isinstance(denied, StorageError) and not isinstance(denied, TransientStorageError)
    assert isinstance(_map_error(FileNotFoundError("x"), "get k"), ObjectNotFound)


def test_plain_http_only_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://backup.example:9000")
    with pytest.raises(StorageError, match="only loopback"):
        open_base_store("s3://bucket/prefix")


def test_dead_fault_stops_every_later_call() -> None:
    """A process that dies at its second put reaches the store no more: not with that put, nor a delete."""
    base = open_base_store(f"memory://dead-{uuid.uuid4().hex}")
    s = FaultyStore(base, [Fault("put", "", "dead", after=1)], seed=7)
    s.put("a", b"1")
    with pytest.raises(StorageError, match="dead"):
        s.put("b", b"2")
    with pytest.raises(StorageError, match="dead"):
        s.delete("a")
    assert s.dead and base.get("a") == b"1"
    with pytest.raises(ObjectNotFound):
        base.get("b")
