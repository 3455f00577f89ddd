"""The backup repository: packs, chunk index, snapshot index trees, manifests, locks and maintenance.

Public API (used by the backup engine, restore, verify and the CLI)::

    from baton.repo import Repository, DiskIdentity, Manifest
    repo = Repository.init(url, encryption="none" | "aes-256-gcm", key_file=None)
    repo = Repository.open(url, key_file=None)
    w = BackupWriter(repo, disk, parent=..., node=..., mode=..., reason=..., lineage=...)
    w.put(i, data); w.checkpoint(); w.commit(info) | w.abort()
    repo.snapshots(disk_uuid=None, include_partial=False); repo.get_snapshot(prefix)
    repo.snapshot_reader(manifest).read(i)
"""

from __future__ import annotations

from baton.format.repo_index import ZERO_ID
from baton.repo.model import DiskIdentity, Manifest
from baton.repo.repository import Repository, SnapshotReader
from baton.repo.writer import BackupWriter

__all__ = ["ZERO_ID", "BackupWriter", "DiskIdentity", "Manifest", "Repository", "SnapshotReader"]
