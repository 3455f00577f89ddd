"""plan_backup's trust decisions about the repository's side of the lineage: an absent parent snapshot is a
lineage mismatch, a corrupt one says so (full, never 'lineage mismatch'), and a failing store is not a reason
for a full backup (the error rises)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from baton.backup import plan_backup, run_backup
from baton.errors import StorageError
from baton.format.record import PLACEMENT_TAIL, RecordHeader, geometry_for
from baton.record.core import Record, format_record
from baton.repo import DiskIdentity, Repository
from baton.testing.crashdev import CrashDevice
from baton.tracker.core import Tracker

CHUNK = 4096
DATA = 64 * CHUNK


def _attached(tmp_path: Path) -> tuple[Tracker, Repository, DiskIdentity, str]:
    geo = geometry_for(DATA, CHUNK, 2, 2)
    rdev, ddev = CrashDevice(geo.size), CrashDevice(DATA)
    hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=2, chunk_size=CHUNK, disk_uuid=str(uuid.uuid4()),
                       lineage="", disk_size=DATA + geo.size, data_size=DATA, record_offset=DATA,
                       record_size=geo.size, pages_per_slot=geo.pages_per_slot, nrepos=2)
    format_record(rdev, hdr)
    rec = Record.load(rdev, record_offset=DATA)
    rec.attach("n1")
    tracker = Tracker(rec, ddev)
    url = str(tmp_path / "repo")
    Repository.init(url)
    repo = Repository.open(url)
    tracker.write(0, b"x" * CHUNK)
    first = run_backup(tracker, repo, node="n1")
    assert first["mode"] == "full"
    tracker.write(5 * CHUNK, b"y" * CHUNK)
    h = rec.header
    disk = DiskIdentity(disk_uuid=h.disk_uuid, size=tracker.size, chunk_size=CHUNK, fs_uuid=h.fs_uuid)
    return tracker, repo, disk, str(first["snapshot"])


def test_the_parent_snapshot_present_gives_an_incremental(tmp_path: Path) -> None:
    tracker, repo, disk, _ = _attached(tmp_path)
    assert plan_backup(tracker, repo, disk).mode == "incremental"


def test_a_corrupt_parent_snapshot_is_a_full_backup_that_says_so(tmp_path: Path) -> None:
    tracker, _repo, disk, snap = _attached(tmp_path)
    path = tmp_path / "repo" / "snapshots" / snap
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    plan = plan_backup(tracker, Repository.open(str(tmp_path / "repo")), disk)
    assert plan.mode == "full"
    assert plan.reason.startswith(f"the repository's snapshot {snap[:12]} is corrupt"), plan.reason
    assert "lineage mismatch" not in plan.reason


def test_an_absent_parent_snapshot_is_a_lineage_mismatch(tmp_path: Path) -> None:
    tracker, repo, disk, _snap = _attached(tmp_path)
    tracker.write(9 * CHUNK, b"z" * CHUNK)
    run_backup(tracker, repo, node="n1")  # another snapshot of the disk stays in the repository
    (tmp_path / "repo" / "snapshots" / tracker.record.header.last_backup).unlink()
    plan = plan_backup(tracker, Repository.open(str(tmp_path / "repo")), disk)
    assert plan.mode == "full" and plan.reason.startswith("lineage mismatch"), plan.reason


def test_a_failing_store_is_an_error_not_a_full_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker, repo, disk, _ = _attached(tmp_path)
    repo = Repository.open(str(tmp_path / "repo"))

    def broken(_snapshot_id: str) -> None:
        raise StorageError("the store is unreachable")

    monkeypatch.setattr(repo, "read_manifest", broken)
    with pytest.raises(StorageError):
        plan_backup(tracker, repo, disk)
