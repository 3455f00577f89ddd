"""The storage conformance suite: one set of checks every :class:`baton.storage.Store` must pass.

Usage from a test module (see tests/unit/test_repo_storage.py and tests/integration/test_s3_storage.py)::

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_store(check, store):
        check(store)

Each check starts from an empty store (or an empty prefix) and leaves what it wrote behind; the fixture
providing the store cleans up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from baton.errors import ObjectNotFound, StorageError
from baton.storage import Store


def check_put_get(s: Store) -> None:
    s.put("a/one", b"hello")
    assert s.get("a/one") == b"hello"
    s.put("a/one", b"replaced")
    assert s.get("a/one") == b"replaced"


def check_empty_object(s: Store) -> None:
    s.put("empty", b"")
    assert s.get("empty") == b""
    assert s.stat("empty").size == 0


def check_large_object(s: Store) -> None:
    data = bytes(range(256)) * (4 * 4096 + 7)        # ~4 MiB, not a power of two
    s.put("big/x", data)
    assert s.get("big/x") == data
    assert s.get_range("big/x", 1_000_001, 65536) == data[1_000_001:1_000_001 + 65536]


def check_get_missing(s: Store) -> None:
    for fn in (lambda: s.get("nope/x"), lambda: s.get_range("nope/x", 0, 1), lambda: s.stat("nope/x")):
        try:
            fn()
        except ObjectNotFound:
            continue
        raise AssertionError("a missing object did not raise ObjectNotFound")


def check_get_range(s: Store) -> None:
    s.put("r", b"0123456789")
    assert s.get_range("r", 0, 3) == b"012"
    assert s.get_range("r", 7, 3) == b"789"
    assert s.get_range("r", 8, 10) == b"89"          # short object: short result
    assert s.get_range("r", 10, 5) == b""
    assert s.get_range("r", 4, 0) == b""


def check_put_if_absent(s: Store) -> None:
    assert s.put_if_absent("lock/x", b"first") is True
    assert s.put_if_absent("lock/x", b"second") is False
    assert s.get("lock/x") == b"first"


def check_put_if_absent_race(s: Store) -> None:
    """Eight threads race to create one key: exactly one wins and its content is what is stored."""
    wins: list[bytes] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        payload = f"writer {i}".encode()
        if s.put_if_absent("race/key", payload):
            wins.append(payload)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1, f"{len(wins)} writers won the conditional create"
    assert s.get("race/key") == wins[0]


def check_stat(s: Store) -> None:
    s.put("st/x", b"abc")
    info = s.stat("st/x")
    assert info.key == "st/x" and info.size == 3 and info.mtime > 1_600_000_000


def check_list(s: Store) -> None:
    keys = ["l/a/1", "l/a/2", "l/b/1", "l/c", "m/x"]
    for k in keys:
        s.put(k, k.encode())
    assert sorted(o.key for o in s.list("l/")) == ["l/a/1", "l/a/2", "l/b/1", "l/c"]
    assert sorted(o.key for o in s.list("l/a/")) == ["l/a/1", "l/a/2"]
    assert [o.size for o in s.list("m/")] == [3]
    assert list(s.list("zzz/")) == []
    assert [o.key for o in s.list("l/a/")] == ["l/a/1", "l/a/2"]         # sorted
    s.put("l/shared-1", b"")
    s.put("l/shared-2", b"")
    assert [o.key for o in s.list("l/shared-")] == ["l/shared-1", "l/shared-2"]   # partial last segment
    assert [o.key for o in s.list("l/")] == ["l/a/1", "l/a/2", "l/b/1", "l/c", "l/shared-1", "l/shared-2"]


def check_list_many(s: Store) -> None:
    """More keys than one S3 ListObjectsV2 page (1000): pagination must be followed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s.put(f"many/{i:05d}", b""), range(1100)))
    assert len(list(s.list("many/"))) == 1100


def check_delete(s: Store) -> None:
    s.put("d/x", b"1")
    s.delete("d/x")
    try:
        s.get("d/x")
    except ObjectNotFound:
        pass
    else:
        raise AssertionError("deleted object still readable")
    s.delete("d/x")                                   # idempotent
    assert list(s.list("d/")) == []


def check_invalid_keys(s: Store) -> None:
    for bad in ("", "/abs", "a//b", "a/../b", "trail/", "a/./b"):
        try:
            s.put(bad, b"x")
        except StorageError:
            continue
        raise AssertionError(f"key {bad!r} was accepted")


def check_statistics(s: Store) -> None:
    s.put("stats/x", b"12345")
    s.get("stats/x")
    st = s.statistics()
    assert st["puts"] >= 1 and st["gets"] >= 1 and st["bytes_written"] >= 5


CHECKS: list[Callable[[Store], None]] = [
    check_put_get, check_empty_object, check_large_object, check_get_missing, check_get_range,
    check_put_if_absent, check_put_if_absent_race, check_stat, check_list, check_list_many, check_delete,
    check_invalid_keys, check_statistics,
]


# ----- a real S3 endpoint for tests ---------------------------------------------------------------------------

class MotoServer:
    """moto in server mode on 127.0.0.1 (a real HTTP S3 endpoint that enforces If-None-Match: *).

    Started as a child process and stopped by its PID only. ``env()`` gives the AWS_* variables pointing at it.
    """

    def __init__(self, python: str, start_timeout: float = 30.0) -> None:
        import socket
        import subprocess
        import time

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto.server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto.server did not start in time") from None
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        """Create a bucket with a plain HTTP PUT (no boto3 needed)."""
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
