"""Pure codecs for the change record (format v3; v1 and v2 records are still read and written as v1 and v2). No I/O
here: bytes in, frozen dataclasses out.

The layout, field tables and rationale are in docs/format.md; constant names match the spec. Every structure
carries a magic, a version checked against ``SUPPORTED_VERSIONS``, its length, a CRC32C and its own identity
(its copy number and region/page index, the disk UUID and owner epoch where they apply). ``unpack`` checks them
in a fixed order (magic, version, length, checksum, identity) and raises :class:`FormatError` saying what it
expected and what it found.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from baton.format.errors import BadChecksum, BadIdentity, BadLength, BadValue, Blank, OtherDiskSize, Truncated
from baton.format.errors import BadMagic as BadMagic  # re-exported: callers that read records catch these
from baton.format.errors import BadVersion as BadVersion
from baton.format.errors import FormatError as FormatError

BLOCK = 4096  # every record structure occupies whole 4 KiB blocks, aligned for O_DIRECT
SECTOR = 512  # the smallest unit a torn write can leave half-old/half-new
FORMAT_VERSION = 3  # what `baton init` writes; v1 and v2 records keep writing their own version (docs/format.md)
SUPPORTED_VERSIONS = range(1, 4)
STRUCT_V1 = 1  # anchors, extent maps and record-disk superblocks are unchanged since v1 and stay version 1

MIN_CHUNK = 4096
MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_CHUNK = 64 * 1024


def is_chunk_size(n: int) -> bool:
    """The one chunk-size rule (record header, ``baton init``, repository disks): a power of two in 4 KiB..4 MiB."""
    return MIN_CHUNK <= n <= MAX_CHUNK and not n & (n - 1)

HEADER_MAGIC = b"BATONREC"
SLOT_MAGIC = b"BATONSLT"
PAGE_MAGIC = b"BATONBMP"
HISTORY_MAGIC = b"BATONHIS"
RDISK_MAGIC = b"BATONRDK"
ANCHOR_MAGIC = b"BATONANC"
EXTMAP_MAGIC = b"BATONEXT"

PLACEMENT_TAIL = 1
PLACEMENT_FILE = 2
PLACEMENT_EXTERNAL = 3
PLACEMENT_NAMES = {PLACEMENT_TAIL: "tail", PLACEMENT_FILE: "file", PLACEMENT_EXTERNAL: "external"}

# header flags
FLAG_CLEAN = 1 << 0  # the last owner detached cleanly
FLAG_RESET = 1 << 1  # the record was reset (new lineage); the next backup must be full
FLAG_SUSPECT = 1 << 2  # damage was found in the record (a header copy); the next backup must be full
FLAG_UNTRACKED = 1 << 3  # v2: the file system was written while no owner tracked it; the next backup must be full
FLAG_ERA_PENDING = 1 << 4  # v3: a dm owner may have era-tracked writes not yet folded into the bitmaps
FLAG_DISTRUSTED = 1 << 5  # v3, always with FLAG_RESET: the header's distrust_reason says why the next backup is full
FULL_FLAGS = FLAG_RESET | FLAG_SUSPECT | FLAG_UNTRACKED | FLAG_DISTRUSTED  # each makes the next backup (to every
# repository) full

# v3 header: the frontend of the current (or last) owner
FRONTEND_NONE = 0
FRONTEND_FUSE = 1
FRONTEND_NBD = 2
FRONTEND_DM = 3
FRONTEND_NAMES = {FRONTEND_NONE: "", FRONTEND_FUSE: "fuse", FRONTEND_NBD: "nbd", FRONTEND_DM: "dm"}
FRONTEND_CODES = {v: k for k, v in FRONTEND_NAMES.items()}
DISTRUST_REASON_MAX = 128  # bytes of the v3 header's distrust_reason (utf-8, NUL padded)

# v2 header: what the file-system markers saved at the last detach/commit describe
FS_UNSAVED = 0  # no markers saved (v1, or never saved): nothing to compare
FS_EXT4 = 1
FS_XFS = 2
FS_NONE = 3  # checked: no ext4/xfs on the disk, so writes that bypass Baton cannot be noticed
FS_KIND_NAMES = {FS_UNSAVED: "unsaved", FS_EXT4: "ext4", FS_XFS: "xfs", FS_NONE: "none"}
FS_MARKERS_SIZE = 40

REGION_NODE = 1
REGION_FROZEN = 2
REGION_REPO = 3  # v2: one repository's owed set and last backup

HEADER_COPIES = 2
EXTMAP_START = 2  # blocks 2, 3: extent map copies (file placement; zeros otherwise)
HISTORY_START = 4
HISTORY_ENTRY_SIZE = 512
HISTORY_ENTRIES = 64
HISTORY_BLOCKS = HISTORY_ENTRIES * HISTORY_ENTRY_SIZE // BLOCK  # 8
REGIONS_START = HISTORY_START + HISTORY_BLOCKS  # block 12

NODE_NAME_MAX = 64


def _load_crc32c() -> Callable[[bytes | bytearray | memoryview], int]:
    """The crc32c package's C function, from its extension module loaded on its own: the package's
    ``__init__`` asks ``importlib.metadata`` for its own version, a scan of every installed distribution that
    cost about 40 ms of every command that reads a record (restore, verify, attach, the daemon's start).
    Falls back to the plain import where the extension can't be found that way."""
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec("crc32c")  # finds the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_crc32c" + suffix)
            if not os.path.exists(path):
                continue
            loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", path)
            ext = importlib.util.spec_from_file_location("crc32c._crc32c", path, loader=loader)
            if ext is None:
                continue
            try:
                module = importlib.util.module_from_spec(ext)
                loader.exec_module(module)
                fn: Callable[[bytes | bytearray | memoryview], int] = module.crc32c
                return fn
            except (ImportError, OSError, AttributeError):
                continue
    import crc32c as package

    return package.crc32c


_crc32c = _load_crc32c()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return int(_crc32c(data))


def _name(b: bytes) -> str:
    return b.rstrip(b"\0").decode("utf-8", "replace")


def _enc_name(s: str, n: int = NODE_NAME_MAX) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > n:
        raise ValueError(f"name {s!r} is longer than {n} bytes")
    return raw


def _uuid_bytes(s: str) -> bytes:
    return uuid.UUID(s).bytes if s else bytes(16)


def _uuid_str(b: bytes) -> str:
    return "" if b == bytes(16) else str(uuid.UUID(bytes=b))


def _check_common(what: str, data: bytes, magic: bytes, min_len: int) -> int:
    if len(data) < min_len:
        raise Truncated(what, f"expected at least {min_len} bytes, found {len(data)}", expected=min_len,
                        found=len(data))
    if data[:8] != magic:
        if data[:8] == bytes(8):
            raise Blank(what, f"expected magic {magic!r}, found a blank block", expected=magic, found=bytes(8))
        raise BadMagic(what, f"expected magic {magic!r}, found {bytes(data[:8])!r}", expected=magic,
                       found=bytes(data[:8]))
    (version,) = struct.unpack_from("<H", data, 8)
    if version not in SUPPORTED_VERSIONS:
        raise BadVersion(
            what,
            f"format version {version} is not supported (this Baton reads versions "
            f"{SUPPORTED_VERSIONS.start}..{SUPPORTED_VERSIONS.stop - 1})",
            expected=SUPPORTED_VERSIONS, found=version,
        )
    return int(version)


def _check_crc(what: str, body: bytes | memoryview, stored: int) -> None:
    got = crc32c(body)
    if got != stored:
        raise BadChecksum(what, f"checksum mismatch: stored crc32c {stored:#010x}, computed {got:#010x}",
                          expected=stored, found=got)


# --------------------------------------------------------------------------------------------------------------
# Extent: where a piece of the record area lives on its device (one for tail/external; FIEMAP's for file)


@dataclass(frozen=True)
class Extent:
    logical: int  # byte offset inside the record area
    physical: int  # byte offset on the device
    length: int  # bytes


EXTENT = struct.Struct("<QQQ")  # logical, physical, length (bytes)


def extents_crc(extents: tuple[Extent, ...]) -> int:
    return crc32c(b"".join(EXTENT.pack(e.logical, e.physical, e.length) for e in extents))


# --------------------------------------------------------------------------------------------------------------
# Record header: two alternating copies in blocks 0 and 1; the valid copy with the highest seq wins.

HEADER = struct.Struct(
    "<"
    "8s"  # magic            b"BATONREC"
    "H"  # version           FORMAT_VERSION
    "H"  # length            bytes covered: this struct + crc (286)
    "B"  # copy              0 or 1: which header block this is (self-location)
    "B"  # placement         PLACEMENT_TAIL | PLACEMENT_FILE | PLACEMENT_EXTERNAL
    "H"  # nslots            node slots (regions 0..nslots-1); region nslots is the frozen set
    "Q"  # seq               incremented on every header write
    "I"  # chunk_size        tracking granularity in bytes (power of two, 4 KiB..4 MiB)
    "I"  # flags             FLAG_CLEAN | FLAG_RESET | FLAG_SUSPECT
    "16s"  # disk_uuid       Baton's id of the data disk
    "16s"  # fs_uuid         file-system UUID blkid saw at init (zeros if none)
    "16s"  # lineage         changes whenever the record is reset
    "16s"  # last_backup     snapshot id of the last backup (or checkpoint) committed from this record
    "Q"  # disk_size         bytes of the data disk at init
    "Q"  # data_size         bytes tracked and exposed (disk minus a tail record area)
    "Q"  # record_offset     physical byte offset of record block 0 on its device (self-location)
    "Q"  # record_size       bytes of the record area
    "I"  # pages_per_slot    bitmap pages per region
    "Q"  # epoch             owner epoch: the fencing token
    "64s"  # owner           node name of the current owner (utf-8, NUL padded)
    "Q"  # created_ns        wall clock at init
    "Q"  # updated_ns        wall clock at this write
    "Q"  # backup_seq        backups committed so far (history ring head)
    "48s"  # hw_id           serial/WWN of the data disk when known (external placement identity)
    "H"  # nextents          file placement: extents of the record file (0 for tail/external)
    "I"  # extents_crc       crc32c of the packed extent list (EXTENT records) found at init
)
HEADER_V2 = struct.Struct(
    "<"
    "H"  # nrepos          v2: repository regions (regions nslots+1 .. nslots+nrepos)
    "B"  # fs_kind         v2: FS_UNSAVED | FS_EXT4 | FS_XFS | FS_NONE: what fs_markers describe
    "B"  # reserved        zero
    "40s"  # fs_markers    v2: the file system's own write/mount markers at the last detach or commit
    "Q"  # markers_ns      v2: wall clock when fs_markers were saved
)
HEADER_V3 = struct.Struct(
    "<"
    "B"  # frontend        v3: FRONTEND_NONE | FRONTEND_FUSE | FRONTEND_NBD | FRONTEND_DM of the current/last owner
    "B"  # reserved        zero
    "Q"  # era_offset      v3: byte offset of the era region inside the record area (0: no region)
    "Q"  # era_size        v3: bytes of the era region (0: no region)
    "Q"  # era_folded      v3: every write of an era < era_folded is in Baton's bitmaps
    "128s"  # distrust_reason  v3: why the next backup is full (FLAG_DISTRUSTED), utf-8, NUL padded
)
HEADER_CRC = struct.Struct("<I")


def header_length(version: int) -> int:
    """Bytes a header of ``version`` covers (struct + crc): 286 for v1, 338 for v2, 492 for v3."""
    return (HEADER.size + (HEADER_V2.size if version >= 2 else 0) + (HEADER_V3.size if version >= 3 else 0)
            + HEADER_CRC.size)


def _enc_text(s: str, n: int) -> bytes:
    """``s`` as utf-8, cut to at most ``n`` bytes on a character boundary (free text: never refused)."""
    raw = s.encode("utf-8")[:n]
    return raw.decode("utf-8", "ignore").encode("utf-8")


@dataclass(frozen=True)
class RecordHeader:
    placement: int
    nslots: int
    chunk_size: int
    disk_uuid: str
    lineage: str
    disk_size: int
    data_size: int
    record_offset: int
    record_size: int
    pages_per_slot: int
    seq: int = 0
    copy: int = 0
    flags: int = 0
    fs_uuid: str = ""
    last_backup: str = ""  # 32 hex chars or ""
    epoch: int = 0
    owner: str = ""
    created_ns: int = 0
    updated_ns: int = 0
    backup_seq: int = 0
    hw_id: str = ""
    nextents: int = 0
    extents_crc: int = 0
    version: int = FORMAT_VERSION
    nrepos: int = 0  # v2
    fs_kind: int = FS_UNSAVED  # v2
    fs_markers: bytes = b""  # v2: FS_MARKERS_SIZE bytes (shorter is zero-padded)
    markers_ns: int = 0  # v2
    frontend: str = ""  # v3: "", "fuse", "nbd" or "dm" (FRONTEND_NAMES)
    era_offset: int = 0  # v3: byte offset of the era region in the record area (0 with era_size 0: none)
    era_size: int = 0  # v3
    era_folded: int = 0  # v3: every write of an era < era_folded is in Baton's bitmaps
    distrust_reason: str = ""  # v3: why the next backup is full (with FLAG_DISTRUSTED)

    @property
    def nchunks(self) -> int:
        return (self.data_size + self.chunk_size - 1) // self.chunk_size

    @property
    def clean(self) -> bool:
        return bool(self.flags & FLAG_CLEAN)

    def pack(self) -> bytes:
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"cannot write a version {self.version} header")
        length = header_length(self.version)
        body = HEADER.pack(
            HEADER_MAGIC, self.version, length, self.copy, self.placement, self.nslots, self.seq,
            self.chunk_size, self.flags, _uuid_bytes(self.disk_uuid), _uuid_bytes(self.fs_uuid),
            _uuid_bytes(self.lineage), bytes.fromhex(self.last_backup) if self.last_backup else bytes(16),
            self.disk_size, self.data_size, self.record_offset, self.record_size, self.pages_per_slot,
            self.epoch, _enc_name(self.owner), self.created_ns, self.updated_ns, self.backup_seq,
            _enc_name(self.hw_id, 48), self.nextents, self.extents_crc,
        )
        if self.version >= 2:
            if len(self.fs_markers) > FS_MARKERS_SIZE:
                raise ValueError(f"file-system markers are {len(self.fs_markers)} bytes, at most {FS_MARKERS_SIZE}")
            markers = self.fs_markers if self.fs_kind in (FS_EXT4, FS_XFS) else b""
            body += HEADER_V2.pack(self.nrepos, self.fs_kind, 0, markers, self.markers_ns)
        if self.version >= 3:
            if self.frontend not in FRONTEND_CODES:
                raise ValueError(f"unknown frontend {self.frontend!r} (one of {sorted(FRONTEND_CODES)})")
            body += HEADER_V3.pack(FRONTEND_CODES[self.frontend], 0, self.era_offset, self.era_size,
                                   self.era_folded, _enc_text(self.distrust_reason, DISTRUST_REASON_MAX))
        out = body + HEADER_CRC.pack(crc32c(body))
        return out + bytes(BLOCK - len(out))

    @classmethod
    def unpack(cls, data: bytes, *, copy: int | None = None, record_offset: int | None = None) -> RecordHeader:
        """Decode one header block. ``copy`` and ``record_offset``, when given, are checked against the block's
        own claims of where it lives (a header read from the wrong place is rejected)."""
        what = "record header" if copy is None else f"record header copy {copy}"
        version = _check_common(what, data, HEADER_MAGIC, HEADER.size + HEADER_CRC.size)
        (length,) = struct.unpack_from("<H", data, 10)
        if length != header_length(version) or len(data) < length:
            raise BadLength(what, f"length {length}, expected {header_length(version)} for version {version}",
                            expected=header_length(version), found=length)
        (stored,) = HEADER_CRC.unpack_from(data, length - HEADER_CRC.size)
        _check_crc(what, memoryview(data)[: length - HEADER_CRC.size], stored)
        f = HEADER.unpack_from(data, 0)
        (_, _, _, hcopy, placement, nslots, seq, chunk_size, flags, disk_uuid, fs_uuid, lineage, last_backup,
         disk_size, data_size, rec_off, rec_size, pps, epoch, owner, created, updated, bseq, hw_id, next,
         ext_crc) = f
        if copy is not None and hcopy != copy:
            raise BadIdentity(what, f"expected copy {copy}, the block says it is copy {hcopy}", expected=copy,
                              found=hcopy)
        if record_offset is not None and rec_off != record_offset:
            raise BadIdentity(what, f"expected record at byte {record_offset}, the block says {rec_off}",
                              expected=record_offset, found=rec_off)
        if placement not in PLACEMENT_NAMES:
            raise BadValue(what, f"unknown placement {placement}", expected=set(PLACEMENT_NAMES), found=placement)
        if not is_chunk_size(chunk_size):
            raise BadValue(what, f"chunk size {chunk_size} is not a power of two in 4 KiB..4 MiB",
                           expected="a power of two in 4 KiB..4 MiB", found=chunk_size)
        ext: dict[str, Any] = {}
        if version >= 2:
            nrepos, fs_kind, _, markers, markers_ns = HEADER_V2.unpack_from(data, HEADER.size)
            if fs_kind not in FS_KIND_NAMES:
                raise BadValue(what, f"unknown file-system marker kind {fs_kind}", expected=set(FS_KIND_NAMES),
                               found=fs_kind)
            ext = {"nrepos": nrepos, "fs_kind": fs_kind,
                   "fs_markers": markers if fs_kind in (FS_EXT4, FS_XFS) else b"", "markers_ns": markers_ns}
        if version >= 3:
            fe, _, era_off, era_size, era_folded, reason = HEADER_V3.unpack_from(data, HEADER.size + HEADER_V2.size)
            if fe not in FRONTEND_NAMES:
                raise BadValue(what, f"unknown frontend {fe}", expected=set(FRONTEND_NAMES), found=fe)
            if era_off % BLOCK or era_size % BLOCK or (era_size and era_off < BLOCK * REGIONS_START):
                raise BadValue(what, f"era region at byte {era_off}, {era_size} bytes: not whole blocks after the "
                               "record's fixed blocks", expected="4 KiB-aligned", found=(era_off, era_size))
            ext |= {"frontend": FRONTEND_NAMES[fe], "era_offset": era_off, "era_size": era_size,
                   "era_folded": era_folded, "distrust_reason": _name(reason)}
        return cls(
            placement=placement, nslots=nslots, chunk_size=chunk_size, disk_uuid=_uuid_str(disk_uuid),
            lineage=_uuid_str(lineage), disk_size=disk_size, data_size=data_size, record_offset=rec_off,
            record_size=rec_size, pages_per_slot=pps, seq=seq, copy=hcopy, flags=flags,
            fs_uuid=_uuid_str(fs_uuid), last_backup="" if last_backup == bytes(16) else last_backup.hex(),
            epoch=epoch, owner=_name(owner), created_ns=created, updated_ns=updated, backup_seq=bseq,
            hw_id=_name(hw_id), nextents=next, extents_crc=ext_crc, version=version, **ext,
        )


# --------------------------------------------------------------------------------------------------------------
# Region (slot) header: two alternating copies at the start of each region. A region holds one bitmap: a node's
# slot (the chunks it dirtied while owner) or the frozen set of an in-flight backup.

SLOT = struct.Struct(
    "<"
    "8s"  # magic        b"BATONSLT"
    "H"  # version
    "H"  # length        bytes covered: struct + page map + crc
    "I"  # region        region index (self-identity)
    "B"  # kind          REGION_NODE | REGION_FROZEN
    "B"  # copy          0 or 1 (self-location)
    "2x"  # reserved
    "Q"  # seq           incremented on every write of this slot header
    "Q"  # generation    bumped when the region is cleared; pages of older generations are ignored
    "Q"  # epoch         owner epoch of the writer
    "16s"  # disk_uuid
    "64s"  # node        node owning this slot (node regions), "" if free
    "16s"  # backup_id   frozen region: the backup that froze it
    "I"  # npages       pages in this region (== header.pages_per_slot)
)
SLOT_V2 = struct.Struct(
    "<"
    "16s"  # repo_id     v2, repository regions: the repository's id (its config repo_id), zeros if free
    "16s"  # last_backup v2, repository regions: that repository's last snapshot (or checkpoint) from this record
    "16s"  # lineage     v2, repository regions: the record lineage that snapshot followed
    "Q"  # used_seq      v2, repository regions: header seq when last used (least recently used is evicted)
    "I"  # repo_flags    v2, repository regions: FLAG_RESET | FLAG_SUSPECT | FLAG_UNTRACKED owed to this repository
    "4x"  # reserved     zero
)


def slot_fixed_size(version: int) -> int:
    """Bytes of a slot header before its page map: 144 for v1, 208 for v2."""
    return SLOT.size + (SLOT_V2.size if version >= 2 else 0)


@dataclass(frozen=True)
class SlotHeader:
    region: int
    kind: int
    disk_uuid: str
    npages: int
    seq: int = 0
    copy: int = 0
    generation: int = 1
    epoch: int = 0
    node: str = ""
    backup_id: str = ""
    page_map: bytes = b""  # bit p set = page p holds bits of this generation
    version: int = FORMAT_VERSION
    repo_id: str = ""  # v2 repository regions: 32 hex chars, "" if the region is free
    last_backup: str = ""  # v2 repository regions: 32 hex chars or ""
    lineage: str = ""  # v2 repository regions
    used_seq: int = 0  # v2 repository regions
    repo_flags: int = 0  # v2 repository regions

    def pack(self) -> bytes:
        pm_len = (self.npages + 7) // 8
        pm = self.page_map.ljust(pm_len, b"\0")[:pm_len]
        fixed = slot_fixed_size(self.version)
        length = fixed + pm_len + 4
        if length > BLOCK:
            raise ValueError(f"{self.npages} pages do not fit a slot header block")
        body = SLOT.pack(
            SLOT_MAGIC, self.version, length, self.region, self.kind, self.copy, self.seq, self.generation,
            self.epoch, _uuid_bytes(self.disk_uuid), _enc_name(self.node),
            bytes.fromhex(self.backup_id) if self.backup_id else bytes(16), self.npages,
        )
        if self.version >= 2:
            body += SLOT_V2.pack(bytes.fromhex(self.repo_id) if self.repo_id else bytes(16),
                                 bytes.fromhex(self.last_backup) if self.last_backup else bytes(16),
                                 _uuid_bytes(self.lineage), self.used_seq, self.repo_flags)
        body += pm
        out = body + struct.pack("<I", crc32c(body))
        return out + bytes(BLOCK - len(out))

    @classmethod
    def unpack(cls, data: bytes, *, region: int, copy: int, disk_uuid: str) -> SlotHeader:
        what = f"slot header (region {region} copy {copy})"
        version = _check_common(what, data, SLOT_MAGIC, SLOT.size + 4)
        fixed = slot_fixed_size(version)
        (length,) = struct.unpack_from("<H", data, 10)
        if not fixed + 4 <= length <= BLOCK:
            raise BadLength(what, f"length {length} out of range", expected=f"{fixed + 4}..{BLOCK}", found=length)
        (stored,) = struct.unpack_from("<I", data, length - 4)
        _check_crc(what, memoryview(data)[: length - 4], stored)
        (_, _, _, reg, kind, hcopy, seq, gen, epoch, duuid, node, bid, npages) = SLOT.unpack_from(data, 0)
        if length != fixed + (npages + 7) // 8 + 4:
            raise BadLength(what, f"length {length} does not match {npages} pages",
                            expected=fixed + (npages + 7) // 8 + 4, found=length)
        if kind not in (REGION_NODE, REGION_FROZEN, REGION_REPO) or (kind == REGION_REPO and version < 2):
            raise BadValue(what, f"unknown region kind {kind} in a version {version} slot header", found=kind,
                           expected=(REGION_NODE, REGION_FROZEN) + ((REGION_REPO,) if version >= 2 else ()))
        if reg != region or hcopy != copy:
            raise BadIdentity(what, f"expected region {region} copy {copy}, found region {reg} copy {hcopy}",
                              expected=(region, copy), found=(reg, hcopy))
        if _uuid_str(duuid) != disk_uuid:
            raise BadIdentity(what, f"belongs to disk {_uuid_str(duuid)}, expected {disk_uuid}", expected=disk_uuid,
                              found=_uuid_str(duuid))
        v2: dict[str, Any] = {}
        if version >= 2:
            rid, last, lin, used, rflags = SLOT_V2.unpack_from(data, SLOT.size)
            v2 = {"repo_id": "" if rid == bytes(16) else rid.hex(),
                  "last_backup": "" if last == bytes(16) else last.hex(), "lineage": _uuid_str(lin),
                  "used_seq": used, "repo_flags": rflags}
        return cls(
            region=reg, kind=kind, disk_uuid=disk_uuid, npages=npages, seq=seq, copy=hcopy, generation=gen,
            epoch=epoch, node=_name(node), backup_id="" if bid == bytes(16) else bid.hex(),
            page_map=bytes(data[fixed : fixed + (npages + 7) // 8]), version=version, **v2,
        )


# --------------------------------------------------------------------------------------------------------------
# Bitmap page: two alternating copies per page. Each copy is 8 sectors; each sector carries its own seq and
# CRC32C (a trailer), so a load can tell a torn write (every sector valid, seqs mixed: the newer version never
# completed, so it was never acknowledged) from damage (a sector whose checksum fails: its range is treated as
# all dirty when it may have been the newest). seq = generation << 32 | counter, so sectors of a cleared
# (older) generation are recognisably stale. Sector 0's payload starts with the page header.

SECTOR_PAYLOAD = SECTOR - 12
SECTOR_TRAILER = struct.Struct(
    "<"
    "Q"  # seq          generation << 32 | write counter of this page
    "I"  # crc          crc32c(payload + seq + identity(region, page, copy, disk tag))
)
SECTORS_PER_PAGE = BLOCK // SECTOR
PAGE = struct.Struct(
    "<"
    "8s"  # magic        b"BATONBMP"
    "H"  # version
    "H"  # header_len   PAGE_HEADER_SIZE
    "I"  # region       (self-identity)
    "I"  # page         page index within the region (self-identity)
    "B"  # copy         0 or 1 (self-location)
    "3x"  # reserved
    "Q"  # epoch        owner epoch of the writer
)
PAGE_HEADER_SIZE = PAGE.size  # 32
PAGE_BITS = (SECTORS_PER_PAGE * SECTOR_PAYLOAD - PAGE_HEADER_SIZE) * 8  # 31744 chunks per bitmap page
PAGE_BYTES = PAGE_BITS // 8
_IDENT = struct.Struct("<IIB8s")


def _sector_crc(payload: bytes | memoryview, seq: int, ident: bytes) -> int:
    return crc32c(bytes(payload) + struct.pack("<Q", seq) + ident)


def pack_page(*, region: int, page: int, copy: int, seq: int, epoch: int, disk_uuid: str, bits: bytes,
              version: int = FORMAT_VERSION) -> bytes:
    """One 4 KiB copy of a bitmap page (the layout is the same in v1 and v2; ``version`` is the record's)."""
    if len(bits) != PAGE_BYTES:
        raise ValueError(f"page bits must be {PAGE_BYTES} bytes, got {len(bits)}")
    ident = _IDENT.pack(region, page, copy, _uuid_bytes(disk_uuid)[:8])
    payload = PAGE.pack(PAGE_MAGIC, version, PAGE_HEADER_SIZE, region, page, copy, epoch) + bits
    out = bytearray()
    for i in range(SECTORS_PER_PAGE):
        p = payload[i * SECTOR_PAYLOAD : (i + 1) * SECTOR_PAYLOAD]
        out += p + SECTOR_TRAILER.pack(seq, _sector_crc(p, seq, ident))
    return bytes(out)


@dataclass(frozen=True)
class PageCopy:
    """What one copy of a bitmap page says, sector by sector (see pack_page)."""

    copy: int
    seqs: tuple[int | None, ...]  # per sector: seq if the sector is intact and of this generation, else None
    damaged: tuple[int, ...]  # sectors whose checksum fails (or whose header does not identify this page)
    payload: bytes  # concatenated payloads (bits start at PAGE_HEADER_SIZE)

    @property
    def seq(self) -> int | None:
        known = [s for s in self.seqs if s is not None]
        return max(known) if known else None

    @property
    def complete(self) -> bool:
        return not self.damaged and None not in self.seqs and len(set(self.seqs)) == 1

    @property
    def bits(self) -> bytes:
        return self.payload[PAGE_HEADER_SIZE:]


def parse_page(data: bytes, *, region: int, page: int, copy: int, disk_uuid: str, generation: int) -> PageCopy:
    """Classify one copy. Never raises for damage: the caller decides what damage means."""
    ident = _IDENT.pack(region, page, copy, _uuid_bytes(disk_uuid)[:8])
    seqs: list[int | None] = []
    damaged: list[int] = []
    payload = bytearray()
    blank = not any(data[:BLOCK])
    for i in range(SECTORS_PER_PAGE):
        sec = data[i * SECTOR : (i + 1) * SECTOR]
        p = sec[:SECTOR_PAYLOAD]
        seq, crc = SECTOR_TRAILER.unpack_from(sec, SECTOR_PAYLOAD)
        payload += p
        if blank:
            seqs.append(None)
        elif _sector_crc(p, seq, ident) != crc:
            seqs.append(None)
            damaged.append(i)
        elif seq >> 32 != generation & 0xFFFFFFFF:
            seqs.append(None)  # stale: from a cleared generation
        else:
            seqs.append(seq)
    if seqs[0] is not None:
        magic, version, hlen, reg, pg, hcopy, _ = PAGE.unpack_from(payload, 0)
        if magic != PAGE_MAGIC or version not in SUPPORTED_VERSIONS or hlen != PAGE_HEADER_SIZE or (
            reg, pg, hcopy) != (region, page, copy):
            seqs[0] = None
            damaged.append(0)
    return PageCopy(copy=copy, seqs=tuple(seqs), damaged=tuple(sorted(set(damaged))), payload=bytes(payload))


def sector_bit_range(sector: int) -> tuple[int, int]:
    """Byte range of the page's bits held by ``sector`` (for marking a damaged sector's chunks dirty)."""
    lo = max(0, sector * SECTOR_PAYLOAD - PAGE_HEADER_SIZE)
    hi = max(0, (sector + 1) * SECTOR_PAYLOAD - PAGE_HEADER_SIZE)
    return lo, min(hi, PAGE_BYTES)


# --------------------------------------------------------------------------------------------------------------
# History entry: the seed patent's "backup info saved in the record area". A ring of HISTORY_ENTRIES entries of
# 512 bytes (one sector each, so a torn write can only damage the entry being written).

HISTORY = struct.Struct(
    "<"
    "8s"  # magic          b"BATONHIS"
    "H"  # version
    "H"  # length         HISTORY_ENTRY_SIZE
    "I"  # slot           ring position (self-location)
    "Q"  # seq            backup sequence number (1, 2, ...)
    "16s"  # snapshot_id
    "16s"  # lineage
    "64s"  # node
    "Q"  # start_ns
    "Q"  # end_ns
    "Q"  # chunks_read
    "Q"  # bytes_read
    "Q"  # chunks_stored
    "Q"  # bytes_stored
    "Q"  # bytes_deduped
    "B"  # mode           1 full, 2 incremental
    "B"  # result         1 ok, 2 failed, 3 aborted
    "6x"  # reserved
    "96s"  # reason       why full (or "" for incremental), utf-8
    "32s"  # digest       integrity digest (snapshot root digest)
    "Q"  # epoch          owner epoch at commit
)
HISTORY_V3 = struct.Struct(
    "<"
    "Q"  # era            v3: the era the backup's fold closed (its freeze folded every write of an era < era); 0
    #                     for a backup with no dm-era fold
)
MODES = {1: "full", 2: "incremental"}
RESULTS = {1: "ok", 2: "failed", 3: "aborted"}


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    snapshot_id: str
    lineage: str
    node: str
    start_ns: int
    end_ns: int
    chunks_read: int
    bytes_read: int
    chunks_stored: int
    bytes_stored: int
    bytes_deduped: int
    mode: str
    result: str
    reason: str
    digest: str  # hex
    epoch: int
    slot: int = 0
    version: int = FORMAT_VERSION  # the record's version (v1 and v2 entries have the same layout; v3 adds era)
    era: int = 0  # v3: the era the backup's dm-era fold closed (0: no fold); not stored by v1/v2 entries

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def pack(self) -> bytes:
        mode = {v: k for k, v in MODES.items()}[self.mode]
        result = {v: k for k, v in RESULTS.items()}[self.result]
        reason = self.reason.encode("utf-8")[:96]
        body = HISTORY.pack(
            HISTORY_MAGIC, self.version, HISTORY_ENTRY_SIZE, self.slot, self.seq,
            bytes.fromhex(self.snapshot_id) if self.snapshot_id else bytes(16), _uuid_bytes(self.lineage),
            _enc_name(self.node), self.start_ns, self.end_ns, self.chunks_read, self.bytes_read,
            self.chunks_stored, self.bytes_stored, self.bytes_deduped, mode, result, reason,
            bytes.fromhex(self.digest)[:32].ljust(32, b"\0") if self.digest else bytes(32), self.epoch,
        )
        if self.version >= 3:
            body += HISTORY_V3.pack(self.era)
        body = body.ljust(HISTORY_ENTRY_SIZE - 4, b"\0")
        return body + struct.pack("<I", crc32c(body))

    @classmethod
    def unpack(cls, data: bytes, *, slot: int) -> HistoryEntry:
        what = f"history entry {slot}"
        version = _check_common(what, data, HISTORY_MAGIC, HISTORY_ENTRY_SIZE)
        (stored,) = struct.unpack_from("<I", data, HISTORY_ENTRY_SIZE - 4)
        _check_crc(what, memoryview(data)[: HISTORY_ENTRY_SIZE - 4], stored)
        f = HISTORY.unpack_from(data, 0)
        (_, _, _, hslot, seq, sid, lin, node, s, e, cr, br, cs, bs, bd, mode, result, reason, digest, ep) = f
        if hslot != slot:
            raise BadIdentity(what, f"found entry for ring slot {hslot}", expected=slot, found=hslot)
        return cls(
            seq=seq, snapshot_id="" if sid == bytes(16) else sid.hex(), lineage=_uuid_str(lin), node=_name(node),
            start_ns=s, end_ns=e, chunks_read=cr, bytes_read=br, chunks_stored=cs, bytes_stored=bs,
            bytes_deduped=bd, mode=MODES.get(mode, "?"), result=RESULTS.get(result, "?"), reason=_name(reason),
            digest=digest.hex(), epoch=ep, slot=hslot, version=version,
            era=HISTORY_V3.unpack_from(data, HISTORY.size)[0] if version >= 3 else 0,
        )


# --------------------------------------------------------------------------------------------------------------
# Record disk (external placement): a superblock in two copies (blocks 0, 1) with a slot table keyed by data-disk
# identity. Slot i's record area starts at byte RDISK_DATA_START + i * slot_size.

RDISK = struct.Struct(
    "<"
    "8s"  # magic        b"BATONRDK"
    "H"  # version
    "H"  # length       struct + table + crc
    "B"  # copy         0 or 1
    "3x"  # reserved
    "Q"  # seq
    "16s"  # rdisk_uuid  id of the record disk itself
    "Q"  # slot_size    bytes per slot (a multiple of BLOCK)
    "H"  # nslots
    "6x"  # reserved
)
RDISK_ENTRY = struct.Struct(
    "<"
    "B"  # in_use
    "7x"  # reserved
    "16s"  # disk_uuid   Baton id of the data disk using this slot
    "Q"  # disk_size
    "16s"  # fs_uuid
    "48s"  # hw_id
)
RDISK_MAX_SLOTS = (BLOCK - RDISK.size - 4) // RDISK_ENTRY.size
RDISK_DATA_START = 2 * BLOCK


@dataclass(frozen=True)
class RecordDiskSlot:
    in_use: bool = False
    disk_uuid: str = ""
    disk_size: int = 0
    fs_uuid: str = ""
    hw_id: str = ""


@dataclass(frozen=True)
class RecordDiskSuper:
    rdisk_uuid: str
    slot_size: int
    slots: tuple[RecordDiskSlot, ...]
    seq: int = 0
    copy: int = 0

    def pack(self) -> bytes:
        n = len(self.slots)
        if n > RDISK_MAX_SLOTS:
            raise ValueError(f"at most {RDISK_MAX_SLOTS} slots fit a record disk")
        length = RDISK.size + n * RDISK_ENTRY.size + 4
        body = RDISK.pack(RDISK_MAGIC, STRUCT_V1, length, self.copy, self.seq,
                          _uuid_bytes(self.rdisk_uuid), self.slot_size, n)
        body += b"".join(
            RDISK_ENTRY.pack(int(s.in_use), _uuid_bytes(s.disk_uuid), s.disk_size, _uuid_bytes(s.fs_uuid),
                             _enc_name(s.hw_id, 48))
            for s in self.slots
        )
        out = body + struct.pack("<I", crc32c(body))
        return out + bytes(BLOCK - len(out))

    @classmethod
    def unpack(cls, data: bytes, *, copy: int) -> RecordDiskSuper:
        what = f"record-disk superblock copy {copy}"
        _check_common(what, data, RDISK_MAGIC, RDISK.size + 4)
        (length,) = struct.unpack_from("<H", data, 10)
        if not RDISK.size + 4 <= length <= BLOCK:
            raise BadLength(what, f"length {length} out of range", expected=f"{RDISK.size + 4}..{BLOCK}", found=length)
        (stored,) = struct.unpack_from("<I", data, length - 4)
        _check_crc(what, memoryview(data)[: length - 4], stored)
        (_, _, _, hcopy, seq, ruuid, slot_size, n) = RDISK.unpack_from(data, 0)
        if hcopy != copy:
            raise BadIdentity(what, f"the block says it is copy {hcopy}", expected=copy, found=hcopy)
        if length != RDISK.size + n * RDISK_ENTRY.size + 4:
            raise BadLength(what, f"length {length} does not match {n} slots",
                            expected=RDISK.size + n * RDISK_ENTRY.size + 4, found=length)
        slots = []
        for i in range(n):
            in_use, duuid, dsize, fsu, hw = RDISK_ENTRY.unpack_from(data, RDISK.size + i * RDISK_ENTRY.size)
            slots.append(RecordDiskSlot(bool(in_use), _uuid_str(duuid), dsize, _uuid_str(fsu), _name(hw)))
        return cls(rdisk_uuid=_uuid_str(ruuid), slot_size=slot_size, slots=tuple(slots), seq=seq, copy=hcopy)


# --------------------------------------------------------------------------------------------------------------
# Geometry: where everything sits inside a record area (in blocks from record block 0).


@dataclass(frozen=True)
class Geometry:
    nslots: int
    pages_per_slot: int
    nrepos: int = 0  # v2: repository regions, after the frozen region

    @property
    def region_blocks(self) -> int:
        return 2 + 2 * self.pages_per_slot

    @property
    def nregions(self) -> int:
        return self.nslots + 1 + self.nrepos  # node slots, the frozen set, then repository regions

    @property
    def frozen_region(self) -> int:
        return self.nslots

    @property
    def repo_regions(self) -> range:
        return range(self.nslots + 1, self.nslots + 1 + self.nrepos)

    def region_kind(self, region: int) -> int:
        if region < self.nslots:
            return REGION_NODE
        return REGION_FROZEN if region == self.nslots else REGION_REPO

    @property
    def total_blocks(self) -> int:
        return REGIONS_START + self.nregions * self.region_blocks

    @property
    def size(self) -> int:
        return self.total_blocks * BLOCK

    def header_block(self, copy: int) -> int:
        return copy

    def history_offset(self, slot: int) -> int:
        """Byte offset of history ring entry ``slot``."""
        return HISTORY_START * BLOCK + slot * HISTORY_ENTRY_SIZE

    def slot_header_block(self, region: int, copy: int) -> int:
        return REGIONS_START + region * self.region_blocks + copy

    def page_block(self, region: int, page: int, copy: int) -> int:
        return REGIONS_START + region * self.region_blocks + 2 + 2 * page + copy


def pages_for(nchunks: int) -> int:
    return max(1, (nchunks + PAGE_BITS - 1) // PAGE_BITS)


def geometry_for(data_size: int, chunk_size: int, nslots: int, nrepos: int = 0) -> Geometry:
    nchunks = (data_size + chunk_size - 1) // chunk_size
    return Geometry(nslots=nslots, pages_per_slot=pages_for(nchunks), nrepos=nrepos)


def max_pages_per_slot(version: int = FORMAT_VERSION) -> int:
    return (BLOCK - slot_fixed_size(version) - 4) * 8


# --------------------------------------------------------------------------------------------------------------
# Era region (v3): where dm-era keeps its metadata, inside the record area after every other structure.

ERA_ALIGN = 1 << 20  # the region's offset (inside the record area) and its size are multiples of 1 MiB
ERA_MIN_SIZE = 4 << 20  # the floor: room for dm-era's superblock, space map and btrees on any disk
ERA_MAX_SIZE = 16 << 30  # dm's metadata space map addresses at most ~16 GiB of 4 KiB blocks; more is never used
ERA_ZERO_BYTES = 64 << 10  # zeroed by init: an all-zero superblock makes dm-era format fresh metadata
ERA_MD_BLOCK = 4096  # dm-era's metadata block size
ERA_ARRAY_PER_BLOCK = (ERA_MD_BLOCK - 24) // 4  # 1018 u32 era entries per dm-array block (24-byte header)
ERA_BITS_PER_BLOCK = (ERA_MD_BLOCK - 24) // 8 * 64  # 32576 writeset bits per dm-bitset block (509 u64 words)


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def era_region_size(data_size: int, chunk_size: int) -> int:
    """Bytes of the era region that dm-era needs for a ``data_size``-byte data area at ``chunk_size`` (the era
    block size is the chunk size, so era blocks are chunks). The one sizing rule (init, ``--upgrade``, the
    ``baton init --help`` figures). From dm-era's metadata (drivers/md/dm-era-target.c), in 4 KiB blocks::

        N = ceil(data_size / chunk_size)      era blocks
        A = ceil(N / 1018)                    era array: one u32 per block, 1018 per dm-array block
        W = ceil(N / 32576)                   one writeset: one bit per block, 32576 per dm-bitset block
        B = 2*A + 4*W                         the era array plus one copy-on-write copy of it (a held metadata
                                              snapshot shadows every array block the digest then changes);
                                              the current writeset, up to two archived ones awaiting digestion,
                                              and one shadowed copy
        S = ceil(B / 8) + 256                 btree interior nodes, the space map's bitmaps and index, the
                                              superblock and a transaction's shadows
        size = min(16 GiB, max(4 MiB, roundup((B + S) * 4096, 1 MiB)))

    At 64 KiB chunks: 4 GiB -> 4 MiB (the floor), 1 TiB -> 155 MiB, 16 TiB -> 2464 MiB. A full metadata device
    turns into write errors on the disk, so this errs on the large side."""
    n = -(-data_size // chunk_size)
    a = -(-n // ERA_ARRAY_PER_BLOCK)
    w = -(-n // ERA_BITS_PER_BLOCK)
    b = 2 * a + 4 * w
    blocks = b + -(-b // 8) + 256
    return min(ERA_MAX_SIZE, max(ERA_MIN_SIZE, _up(blocks * ERA_MD_BLOCK, ERA_ALIGN)))


def era_offset_at_end(area_size: int, structures_size: int, era_size: int) -> int | None:
    """Where a region of at least ``era_size`` bytes starts in an ``area_size``-byte record area whose other
    structures take ``structures_size`` bytes: as near the end as 1 MiB alignment allows, never overlapping
    them (the region then runs to the area's end). None when it does not fit."""
    off = (area_size - era_size) // ERA_ALIGN * ERA_ALIGN
    return off if era_size and off >= structures_size and off >= ERA_ALIGN else None


def area_for_era(structures_size: int, era_size: int) -> int:
    """Bytes of a record area sized for its structures followed by an era region (file placement: the record
    file's size): the structures rounded up to 1 MiB, then the region."""
    return _up(max(structures_size, 1), ERA_ALIGN) + era_size


# --------------------------------------------------------------------------------------------------------------
# Tail anchor: the last two blocks of a tail-placed disk (written once, at init) say where the record area starts,
# so attach finds it from the device size alone.

ANCHOR = struct.Struct(
    "<"
    "8s"  # magic          b"BATONANC"
    "H"  # version
    "B"  # copy           0 (second-to-last block) or 1 (last block)
    "5x"  # reserved
    "16s"  # disk_uuid
    "Q"  # disk_size      device size the anchor was written for (self-location)
    "Q"  # record_offset  byte offset of record block 0
    "Q"  # record_size
    "I"  # crc
)
ANCHOR_BLOCKS = 2


@dataclass(frozen=True)
class Anchor:
    disk_uuid: str
    disk_size: int
    record_offset: int
    record_size: int
    copy: int = 0

    def pack(self) -> bytes:
        body = ANCHOR.pack(ANCHOR_MAGIC, STRUCT_V1, self.copy, _uuid_bytes(self.disk_uuid), self.disk_size,
                           self.record_offset, self.record_size, 0)[:-4]
        return (body + struct.pack("<I", crc32c(body))).ljust(BLOCK, b"\0")

    @classmethod
    def unpack(cls, data: bytes, *, copy: int, disk_size: int) -> Anchor:
        what = f"tail anchor copy {copy}"
        _check_common(what, data, ANCHOR_MAGIC, ANCHOR.size)
        _check_crc(what, memoryview(data)[: ANCHOR.size - 4], struct.unpack_from("<I", data, ANCHOR.size - 4)[0])
        (_, _, hcopy, duuid, dsize, off, size, _) = ANCHOR.unpack_from(data, 0)
        if hcopy != copy:
            raise BadIdentity(what, f"the block says it is copy {hcopy}", expected=copy, found=hcopy)
        if dsize != disk_size:
            raise OtherDiskSize(what, f"written for a {dsize}-byte disk, this one has {disk_size} bytes",
                                expected=disk_size, found=dsize)
        return cls(disk_uuid=_uuid_str(duuid), disk_size=dsize, record_offset=off, record_size=size, copy=hcopy)


# --------------------------------------------------------------------------------------------------------------
# Extent map (file placement): blocks 2 and 3 of the record area, written once at init. Lists where the record
# file's bytes are on the data disk, as FIEMAP reported them after the file was written through and pinned.

EXTMAP = struct.Struct(
    "<"
    "8s"  # magic        b"BATONEXT"
    "H"  # version
    "B"  # copy
    "1x"  # reserved
    "H"  # nextents
    "2x"  # reserved
    "16s"  # disk_uuid
)
EXTMAP_MAX = (BLOCK - EXTMAP.size - 4) // EXTENT.size


def pack_extmap(extents: tuple[Extent, ...], *, copy: int, disk_uuid: str) -> bytes:
    if len(extents) > EXTMAP_MAX:
        raise ValueError(f"{len(extents)} extents exceed the {EXTMAP_MAX} an extent map holds")
    body = EXTMAP.pack(EXTMAP_MAGIC, STRUCT_V1, copy, len(extents), _uuid_bytes(disk_uuid))
    body += b"".join(EXTENT.pack(e.logical, e.physical, e.length) for e in extents)
    return (body + struct.pack("<I", crc32c(body))).ljust(BLOCK, b"\0")


def unpack_extmap(data: bytes, *, copy: int) -> tuple[str, tuple[Extent, ...]]:
    what = f"extent map copy {copy}"
    _check_common(what, data, EXTMAP_MAGIC, EXTMAP.size + 4)
    (_, _, hcopy, n, duuid) = EXTMAP.unpack_from(data, 0)
    if n > EXTMAP_MAX:
        raise BadLength(what, f"{n} extents exceed {EXTMAP_MAX}", expected=f"<= {EXTMAP_MAX}", found=n)
    end = EXTMAP.size + n * EXTENT.size
    _check_crc(what, memoryview(data)[:end], struct.unpack_from("<I", data, end)[0])
    if hcopy != copy:
        raise BadIdentity(what, f"the block says it is copy {hcopy}", expected=copy, found=hcopy)
    ext = tuple(Extent(*EXTENT.unpack_from(data, EXTMAP.size + i * EXTENT.size)) for i in range(n))
    return _uuid_str(duuid), ext


# --------------------------------------------------------------------------------------------------------------
# File-system markers (v2): what the file system on the data disk changes on every mount and write, read from its
# own superblock. Saved in the record header at detach and at every backup commit; compared at the next attach of
# a cleanly detached record, so a mount of the raw disk (not /dev/baton/NAME) while nobody tracked it is noticed.

FS_PROBE_BYTES = BLOCK  # the ext2/3/4 superblock is at byte 1024, the xfs one at byte 0: both in the first block
EXT_SB_OFFSET = 1024
EXT_MAGIC = 0xEF53
XFS_MAGIC = b"XFSB"
EXT_MARKERS = struct.Struct(
    "<"
    "I"  # s_mtime           last mount time (low 32 bits)
    "I"  # s_wtime           last superblock write time (low 32 bits)
    "H"  # s_mnt_count       mounts since the last fsck
    "Q"  # s_kbytes_written  lifetime KiB written
    "B"  # s_mtime_hi
    "B"  # s_wtime_hi
    "16s"  # s_uuid
)
XFS_MARKERS = struct.Struct(
    "<"
    "Q"  # sb_lsn       log sequence number of the last superblock write (v5 superblocks; 0 for v4)
    "Q"  # sb_icount    allocated inodes
    "Q"  # sb_ifree     free inodes
    "Q"  # sb_fdblocks  free data blocks
    "8s"  # sb_uuid     first 8 bytes
)


def parse_fs_markers(block: bytes) -> tuple[int, bytes]:
    """(FS_EXT4 | FS_XFS | FS_NONE, markers) from the first FS_PROBE_BYTES of a data area. Pure; never raises
    for foreign data (no ext/xfs superblock is FS_NONE). An unmount rewrites these fields on both file
    systems (ext4: s_wtime, s_kbytes_written; a mount bumps s_mnt_count and s_mtime. xfs: sb_lsn moves on every
    mount/unmount cycle, and the counters move with allocations)."""
    if len(block) < FS_PROBE_BYTES:
        raise ValueError(f"need {FS_PROBE_BYTES} bytes, got {len(block)}")
    if block[:4] == XFS_MAGIC:
        (versionnum,) = struct.unpack_from(">H", block, 100)
        lsn = struct.unpack_from(">Q", block, 240)[0] if versionnum & 0xF == 5 else 0
        icount, ifree, fdblocks = struct.unpack_from(">QQQ", block, 128)
        return FS_XFS, XFS_MARKERS.pack(lsn, icount, ifree, fdblocks, block[32:40]).ljust(FS_MARKERS_SIZE, b"\0")
    sb = block[EXT_SB_OFFSET : EXT_SB_OFFSET + 1024]
    if struct.unpack_from("<H", sb, 0x38)[0] == EXT_MAGIC:
        mtime, wtime, mnt_count = struct.unpack_from("<IIH", sb, 0x2C)
        (kbytes,) = struct.unpack_from("<Q", sb, 0x178)
        return FS_EXT4, EXT_MARKERS.pack(mtime, wtime, mnt_count, kbytes, sb[0x275], sb[0x274],
                                         sb[0x68:0x78]).ljust(FS_MARKERS_SIZE, b"\0")
    return FS_NONE, b""


def describe_fs_markers(kind: int, markers: bytes) -> dict[str, int | str]:
    """The markers as named fields (for status and for the reason of a full backup)."""
    if kind == FS_EXT4 and len(markers) >= EXT_MARKERS.size:
        mt, wt, mc, kb, mth, wth, _ = EXT_MARKERS.unpack_from(markers, 0)
        return {"fs": "ext4", "s_mtime": mth << 32 | mt, "s_wtime": wth << 32 | wt, "s_mnt_count": mc,
                "s_kbytes_written": kb}
    if kind == FS_XFS and len(markers) >= XFS_MARKERS.size:
        lsn, ic, fr, fd, _ = XFS_MARKERS.unpack_from(markers, 0)
        return {"fs": "xfs", "sb_lsn": lsn, "sb_icount": ic, "sb_ifree": fr, "sb_fdblocks": fd}
    return {"fs": FS_KIND_NAMES.get(kind, "?")}
