"""The storage conformance suite and a repository round trip against a real S3 endpoint (moto server)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest

from baton.errors import StorageError
from baton.repo import BackupWriter, DiskIdentity, Repository
from baton.storage import RetryPolicy, Store, build_store, open_base_store, open_store
from baton.testing.faulty_storage import Fault, FaultyStore
from baton.testing.storage_suite import CHECKS, MotoServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    pytest.importorskip("moto.server")
    server = MotoServer(sys.executable)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    bucket = f"baton-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    return f"s3://{bucket}/repo"


@pytest.fixture
def store(s3_env: str) -> Iterator[Store]:
    s = open_store(s3_env)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance_s3(check, store: Store) -> None:  # type: ignore[no-untyped-def]
    check(store)


def test_s3_capabilities(store: Store) -> None:
    assert store.capabilities.scheme == "s3" and store.capabilities.atomic_create


def test_s3_repository_round_trip(s3_env: str) -> None:
    repo = Repository.init(s3_env)
    disk = DiskIdentity("s3disk", 3 * 65536 + 100, 65536)
    data = [os.urandom(65536), bytes(65536), b"a" * 65536, os.urandom(100)]
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="first", lineage="L")
    for i, d in enumerate(data):
        w.put(i, d)
    m = w.commit({})
    again = Repository.open(s3_env)
    reader = again.snapshot_reader(again.get_snapshot(m.snapshot_id[:8]))
    assert [reader.read(i) for i in range(4)] == data


def test_s3_connection_refused_is_storage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]       # nothing listens here once the socket closes
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    s = build_store(open_base_store("s3://nobucket/x"), retry=RetryPolicy(attempts=2), sleep=lambda _t: None)
    with pytest.raises(StorageError) as ei:
        s.get("config")
    assert "gave up after 2 attempts" in str(ei.value)


def test_s3_injected_errors_during_backup_are_retried(s3_env: str) -> None:
    seed = 99
    print("seed", seed)
    rules = [Fault("put", "packs/", "transient", times=2), Fault("put", "index/", "lost-reply", times=1),
             Fault("get", "", "transient", times=None, probability=0.2)]
    base = open_base_store(s3_env)
    store = build_store(base, faults=FaultyStore.factory(rules, seed), sleep=lambda _t: None,
                        retry=RetryPolicy(attempts=8))
    repo = Repository.init(s3_env, store=store)
    disk = DiskIdentity("d", 4 * 65536, 65536)
    chunks = [os.urandom(65536) for _ in range(4)]
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    for i, c in enumerate(chunks):
        w.put(i, c)
    m = w.commit({})
    r = repo.snapshot_reader(m)
    assert [r.read(i) for i in range(4)] == chunks
    assert store.statistics()["retries"] >= 3


def test_s3_permanent_error_fails_backup_and_publishes_nothing(s3_env: str) -> None:
    base = open_base_store(s3_env)
    store = build_store(base, faults=FaultyStore.factory([Fault("put", "packs/", "permanent")], 5),
                        sleep=lambda _t: None)
    repo = Repository.init(s3_env, store=store)
    disk = DiskIdentity("d", 2 * 65536, 65536)
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    w.put(0, os.urandom(65536))
    with pytest.raises(StorageError):
        w.commit({})
    w.abort()
    assert repo.snapshots(include_partial=True) == []
    assert list(repo.store.list("locks/")) == []


def test_s3_locks_use_conditional_create(s3_env: str) -> None:
    from baton.errors import RepoLocked
    from baton.repo.locks import RepoLock

    repo = Repository.init(s3_env)
    ex = RepoLock.acquire_exclusive(repo.store, "prune")
    with pytest.raises(RepoLocked):
        RepoLock.acquire_exclusive(repo.store, "prune")       # If-None-Match: * refuses the second create
    with pytest.raises(RepoLocked):
        BackupWriter(repo, DiskIdentity("d", 65536, 65536), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    ex.release()
    w = BackupWriter(repo, DiskIdentity("d", 65536, 65536), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    with pytest.raises(RepoLocked):
        RepoLock.acquire_exclusive(repo.store, "prune")
    w.abort()


def test_s3_cli_end_to_end(s3_env: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess

    import blake3

    baton = [sys.executable, "-m", "baton"]
    env = dict(os.environ)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*baton, *args], env=env, capture_output=True, text=True, timeout=120)

    key = str(tmp_path / "key")
    p = run("repo", "init", s3_env, "--encryption", "aes-256-gcm", "--key-file", key, "--json")
    assert p.returncode == 0, p.stderr
    repo = Repository.open(s3_env, key_file=key)
    disk = DiskIdentity("s3-cli", 10 * 65536, 65536)
    img = os.urandom(4 * 65536) + bytes(6 * 65536)
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="first", lineage="L")
    for i in range(10):
        w.put(i, img[i * 65536:(i + 1) * 65536])
    m = w.commit({})
    env["BATON_KEY_FILE"] = key
    p = run("verify", "--repo", s3_env, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["chunks"] == 4, p.stderr
    p = run("restore", m.snapshot_id[:8], "--repo", s3_env, "--to", str(tmp_path / "out"), "--digest",
            "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["image_digest"] == blake3.blake3(img).hexdigest()
    assert (tmp_path / "out").read_bytes() == img
    p = run("forget", m.snapshot_id, "--repo", s3_env, "--json")
    assert p.returncode == 0, p.stderr
    p = run("prune", "--repo", s3_env, "--grace", "0s", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["packs_deleted"] == 1, p.stderr
