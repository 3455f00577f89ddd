"""Value types of the repository API: the identity of a backed-up disk and a snapshot manifest."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from baton.errors import RepoCorrupt, UsageError
from baton.format.record import is_chunk_size

MANIFEST_VERSION = 1
MODES = ("full", "incremental")


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` if it is a power of two in [4 KiB, 4 MiB] (the record's one rule,
    ``baton.format.record.is_chunk_size``), else UsageError."""
    if not is_chunk_size(chunk_size):
        raise UsageError(f"chunk size {chunk_size} is not a power of two between 4 KiB and 4 MiB")
    return chunk_size


@dataclass(frozen=True)
class DiskIdentity:
    """Which disk a snapshot is of. ``disk_uuid`` is the key for parent lookup; the rest describes it."""

    disk_uuid: str
    size: int
    chunk_size: int
    fs_uuid: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        if self.size < 0:
            raise UsageError(f"disk size {self.size} is negative")
        if not self.disk_uuid:
            raise UsageError("a disk identity needs a disk uuid")

    @property
    def chunk_count(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size


@dataclass(frozen=True)
class Manifest:
    """A snapshot: the commit point of a backup, written last (``snapshots/<snapshot_id>``).

    ``complete`` is False for checkpoints: such a manifest is a valid *parent* for the next incremental but
    is not a point-in-time image, so restore refuses it unless explicitly asked.
    """

    snapshot_id: str               # 32 lowercase hex chars
    disk: DiskIdentity
    lineage: str                   # the change record's lineage the backup followed
    parent: str                    # parent snapshot id, "" for none
    node: str                      # cluster node that took the backup
    start_time: float              # UNIX seconds
    end_time: float                # UNIX seconds (time of the last checkpoint for partial snapshots)
    mode: str                      # "full" | "incremental"
    reason: str                    # why this mode (e.g. "record lost", "first backup")
    chunks_read: int
    bytes_read: int
    chunks_stored: int             # new chunks written to packs
    bytes_stored: int              # bytes those chunks take in packs
    chunks_deduplicated: int
    zero_chunks: int
    root: str                      # hex id of the root index page (64 zeros for an all-zero disk)
    tree_depth: int                # levels of index pages (1 = the root is a leaf)
    complete: bool
    info: dict[str, Any] = field(default_factory=dict)
    checkpoint: int = 0            # how many checkpoints preceded this manifest
    version: int = MANIFEST_VERSION

    @property
    def short_id(self) -> str:
        return self.snapshot_id[:8]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start_time))
        d["end"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.end_time))
        return d

    def encode_body(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode_body(cls, body: bytes, name: str) -> Manifest:
        try:
            d = json.loads(body)
            if d.get("version") != MANIFEST_VERSION:
                raise RepoCorrupt(f"{name}: manifest version {d.get('version')}, this Baton reads "
                                  f"{MANIFEST_VERSION}")
            d["disk"] = DiskIdentity(**d["disk"])
            return cls(**d)
        except (TypeError, ValueError, KeyError, UsageError) as e:
            raise RepoCorrupt(f"{name}: malformed manifest ({e})") from e
