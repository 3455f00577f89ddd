"""Durability order of the store stage: a pack is durable before anything that references it is written.

Two layers, each tested where it can fail:

* ``LocalStore``: an object's bytes are fsynced before its name appears (link or rename), and the directory is
  fsynced before the put returns; large objects take the O_DIRECT path, small ones the buffered one.
* ``BackupWriter``: no index file, page or manifest is put while a pack put is still running or before every
  pack put started so far has returned (the packs it names are then durable, by the store's contract).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from baton.repo import DiskIdentity, Repository
from baton.repo.writer import BackupWriter
from baton.storage import local as local_mod
from baton.storage import open_store
from baton.storage.base import ObjectInfo, Store
from baton.storage.local import DIRECT_ALIGN, DIRECT_MIN, DIRECT_PIECE, LocalStore


class _Trace:
    """Records the syscalls of a LocalStore put that matter for durability, by inode."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int]] = []
        real_pwrite, real_fsync, real_link, real_replace = os.pwrite, os.fsync, os.link, os.replace

        def pwrite(fd: int, data: Any, off: int) -> int:
            self.events.append(("write", os.fstat(fd).st_ino))
            return real_pwrite(fd, data, off)

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.events.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync", st.st_ino))
            real_fsync(fd)

        def link(src: Any, dst: Any) -> None:
            self.events.append(("publish", os.stat(src).st_ino))
            real_link(src, dst)

        def replace(src: Any, dst: Any) -> None:
            self.events.append(("publish", os.stat(src).st_ino))
            real_replace(src, dst)

        monkeypatch.setattr(local_mod.os, "pwrite", pwrite)
        monkeypatch.setattr(local_mod.os, "fsync", fsync)
        monkeypatch.setattr(local_mod.os, "link", link)
        monkeypatch.setattr(local_mod.os, "replace", replace)

    def check_put(self, dir_ino: int) -> None:
        """Every write of the object precedes its fsync, which precedes its publication, which precedes the
        directory's fsync, the last event of the put."""
        pub = [i for i, (e, _n) in enumerate(self.events) if e == "publish"]
        assert len(pub) == 1, self.events
        ino = self.events[pub[0]][1]
        writes = [i for i, (e, n) in enumerate(self.events) if e == "write" and n == ino]
        syncs = [i for i, (e, n) in enumerate(self.events) if e == "fsync" and n == ino]
        assert writes and syncs, self.events
        assert max(writes) < syncs[-1] < pub[0], self.events
        assert self.events[-1] == ("fsync-dir", dir_ino), self.events


SIZES = [10, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, 2 * DIRECT_PIECE + DIRECT_ALIGN + 7]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("verb", ["put", "put_if_absent"])
def test_local_put_fsyncs_data_before_the_name_and_the_directory_before_returning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, verb: str) -> None:
    store = LocalStore(tmp_path)
    data = os.urandom(size)
    (tmp_path / "packs" / "ab").mkdir(parents=True)
    trace = _Trace(monkeypatch)
    getattr(store, verb)("packs/ab/obj", data)
    trace.check_put(os.stat(tmp_path / "packs" / "ab").st_ino)
    monkeypatch.undo()
    assert store.get("packs/ab/obj") == data
    assert store.get_range("packs/ab/obj", size - 3, 10) == data[-3:]
    direct = store.statistics()["direct_bytes"]
    if size < DIRECT_MIN:
        assert direct == 0
    else:  # tmp_path is on a file system with O_DIRECT here; if not, the fallback is what ran
        assert direct in (0, size - size % DIRECT_ALIGN)
    assert sorted(os.listdir(tmp_path / "packs" / "ab")) == ["obj"]


def test_local_store_falls_back_to_buffered_writes_where_o_direct_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refuse_direct(path: Any, flags: int, *a: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(local_mod.os, "open", refuse_direct)
    store = LocalStore(tmp_path)
    data = os.urandom(DIRECT_MIN + 5)
    assert store.put_if_absent("packs/x/one", data) is True
    assert store.put_if_absent("packs/x/two", data[::-1]) is True
    monkeypatch.undo()
    assert store.get("packs/x/one") == data and store.get("packs/x/two") == data[::-1]
    assert store.statistics()["direct_bytes"] == 0
    assert sorted(os.listdir(tmp_path / "packs" / "x")) == ["one", "two"]


def test_local_store_direct_write_failure_leaves_no_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from baton.errors import RepoFull

    real_pwrite = os.pwrite
    calls = {"n": 0}

    def enospc_on_second(fd: int, data: Any, off: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, off)

    monkeypatch.setattr(local_mod.os, "pwrite", enospc_on_second)
    store = LocalStore(tmp_path)
    with pytest.raises(RepoFull):
        store.put_if_absent("packs/y/obj", os.urandom(2 * DIRECT_PIECE))
    monkeypatch.undo()
    assert list(store.list("packs/")) == []
    assert os.listdir(tmp_path / "packs" / "y") == []


class _OrderCheckingStore:
    """Wraps a store. Pack puts are slowed down (to leave a window a wrong writer would use) and counted;
    a put of anything that can reference a pack (an index file, which names packs, or a manifest, which makes
    chunks reachable) fails the test while a pack put is running. Pages may be stored meanwhile: they name
    chunk ids only, and are reached only through a manifest (docs/format.md, write ordering); a manifest put
    while a page put is running fails the test too."""

    def __init__(self, inner: Store, page_delay: float = 0.01) -> None:
        self.inner = inner
        self.page_delay = page_delay
        self.capabilities = inner.capabilities
        self._lock = threading.Lock()
        self.running = 0
        self.started = 0
        self.returned = 0
        self.violations: list[str] = []
        self.checked = 0
        self.pages_running = 0
        self.pages_put = 0

    def _check(self, key: str) -> None:
        if key.startswith(("index/", "snapshots/")):
            with self._lock:
                self.checked += 1
                if self.running or self.started != self.returned:
                    self.violations.append(f"{key} put while {self.running} pack put(s) had not returned")
                if key.startswith("snapshots/") and self.pages_running:
                    self.violations.append(f"{key} put while {self.pages_running} page put(s) had not returned")

    def put(self, key: str, data: bytes) -> None:
        self._check(key)
        self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        if key.startswith("pages/"):
            with self._lock:
                self.pages_running += 1
                self.pages_put += 1
            try:
                time.sleep(self.page_delay)
                return self.inner.put_if_absent(key, data)
            finally:
                with self._lock:
                    self.pages_running -= 1
        if not key.startswith("packs/"):
            self._check(key)
            return self.inner.put_if_absent(key, data)
        with self._lock:
            self.running += 1
            self.started += 1
        try:
            time.sleep(0.02)  # widens the window; the assertions do not depend on time
            return self.inner.put_if_absent(key, data)
        finally:
            with self._lock:
                self.running -= 1
                self.returned += 1

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Any:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def statistics(self) -> dict[str, int]:
        return self.inner.statistics()

    def close(self) -> None:
        self.inner.close()


def test_writer_references_no_pack_before_its_put_returned(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    Repository.init(url, pack_target=64 * 1024)
    checking = _OrderCheckingStore(open_store(url))
    repo = Repository.open(url, store=checking)  # type: ignore[arg-type]
    cs = 16 * 1024
    disk = DiskIdentity("d", 96 * cs, cs)
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    for i in range(disk.chunk_count):
        w.put(i, os.urandom(cs))  # incompressible: 4 chunks per pack, 24 packs
        if i in (30, 70):
            w.checkpoint()
    w.commit()
    assert checking.started >= 20 and checking.checked >= 3 and checking.pages_put >= 3
    assert checking.violations == []
    assert not w._spare and w._pack is None  # no pack buffer outlives the writer's work


def _back_up_32_chunks(repo: Repository) -> None:
    """A full backup of 32 incompressible 16 KiB chunks (8 packs at the 64 KiB pack target)."""
    cs = 16 * 1024
    disk = DiskIdentity("d", 32 * cs, cs)
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    for i in range(disk.chunk_count):
        w.put(i, os.urandom(cs))
    w.commit()


def test_order_checker_catches_a_writer_that_does_not_wait_for_its_uploads(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a writer whose pack puts may still run when it writes an index file."""
    url = str(tmp_path / "repo")
    Repository.init(url, pack_target=64 * 1024)
    checking = _OrderCheckingStore(open_store(url))
    repo = Repository.open(url, store=checking)  # type: ignore[arg-type]
    real = BackupWriter._store_pack

    def store_in_background(self: BackupWriter, parts: Any, entries: Any, length: int) -> Any:
        out: dict[str, Any] = {}
        orig_put = self.repo.store.put_if_absent

        def put_later(key: str, data: bytes) -> bool:
            threading.Thread(target=orig_put, args=(key, bytes(data))).start()  # a copy: the writer reuses its buffer
            return True

        self.repo.store.put_if_absent = put_later  # type: ignore[method-assign]
        try:
            out["r"] = real(self, parts, entries, length)
        finally:
            del self.repo.store.put_if_absent
        return out["r"]

    monkeypatch.setattr(BackupWriter, "_store_pack", store_in_background)
    _back_up_32_chunks(repo)
    time.sleep(0.1)  # let the stray puts finish before tmp_path goes away
    assert checking.violations


def test_order_checker_catches_a_writer_that_does_not_wait_for_its_pages(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The page half of the check can fail: a writer that names a root in a manifest before its pages are
    stored."""
    url = str(tmp_path / "repo")
    Repository.init(url, pack_target=64 * 1024)
    checking = _OrderCheckingStore(open_store(url), page_delay=0.3)  # outlasts the pack and index puts
    repo = Repository.open(url, store=checking)  # type: ignore[arg-type]
    real = BackupWriter._build_root
    late: list[Any] = []

    def not_waiting(self: BackupWriter) -> Any:
        root, futs = real(self)
        late.extend(futs)
        return root, []

    monkeypatch.setattr(BackupWriter, "_build_root", not_waiting)
    _back_up_32_chunks(repo)
    for f in late:
        f.result()  # the stray page puts end before tmp_path goes away
    assert any("page put" in v for v in checking.violations), checking.violations
