"""Pack objects: chunk blobs followed by a table describing them and a fixed trailer.

Layout (docs/format.md, part 2, "Pack")::

    0        16   PACK_HEAD      magic b"BTNPACK\\0", version, flags, reserved
    16       ...  blobs          encoded chunks, back to back (see encode_blob in baton.repo.crypto)
    T        L    table          entry_count x PACK_ENTRY, or nonce || AES-GCM(entries) when PACK_ENCRYPTED
    T+L      32   PACK_TAIL      magic b"BTNPKEND", version, flags, entry_count, table_offset T, table_length L,
                                 CRC-32 of the table bytes

The table at the end lets a writer stream blobs without knowing the count, and lets anyone rebuild the chunk
index from packs alone (restic's layout). A pack's name is the unkeyed BLAKE3-256 of its whole content, so
its integrity can be checked without the key.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from baton.errors import KeyError_
from baton.format.errors import (
    RepoBadChecksum,
    RepoBadLength,
    RepoBadMagic,
    RepoBadValue,
    RepoBadVersion,
    RepoTruncated,
)

PACK_MAGIC = b"BTNPACK\0"
PACK_TAIL_MAGIC = b"BTNPKEND"
PACK_VERSION = 1
PACK_ENCRYPTED = 0x0001   # pack flag: blobs and table are AES-256-GCM encrypted

BLOB_ZSTD = 0x01          # blob flag: payload is zstd-compressed
BLOB_AES_GCM = 0x02       # blob flag: payload is nonce || AES-256-GCM(ciphertext || tag)

PACK_HEAD = struct.Struct(
    "<"
    "8s"  # magic          PACK_MAGIC
    "H"   # version        PACK_VERSION
    "H"   # flags          PACK_ENCRYPTED
    "I"   # reserved       0
)
PACK_ENTRY = struct.Struct(
    "<"
    "32s"  # chunk_id      keyed BLAKE3-256 of the plaintext chunk
    "Q"    # offset        of the blob from the start of the pack
    "I"    # stored_length bytes of the blob in the pack
    "I"    # raw_length    bytes of the plaintext chunk
    "B"    # flags         BLOB_ZSTD | BLOB_AES_GCM
    "3x"   # padding
)
PACK_TAIL = struct.Struct(
    "<"
    "8s"  # magic          PACK_TAIL_MAGIC
    "H"   # version        PACK_VERSION
    "H"   # flags          same as PACK_HEAD.flags
    "I"   # entry_count
    "Q"   # table_offset
    "I"   # table_length
    "I"   # table_crc32    zlib CRC-32 of the table bytes as stored
)
TABLE_AAD = b"baton pack table v1"
NONCE_LEN = 12


@dataclass(frozen=True)
class PackEntry:
    """One blob in a pack."""

    chunk_id: bytes
    offset: int
    stored_length: int
    raw_length: int
    flags: int


def pack_head(encrypted: bool) -> bytes:
    return PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION, PACK_ENCRYPTED if encrypted else 0, 0)


def pack_footer(entries: list[PackEntry], table_offset: int, key: bytes | None) -> bytes:
    """Table plus trailer for blobs already written; ``table_offset`` is where the table starts."""
    table = b"".join(PACK_ENTRY.pack(e.chunk_id, e.offset, e.stored_length, e.raw_length, e.flags)
                     for e in entries)
    flags = 0
    if key is not None:
        flags = PACK_ENCRYPTED
        nonce = os.urandom(NONCE_LEN)
        table = nonce + AESGCM(key).encrypt(nonce, table, TABLE_AAD)
    tail = PACK_TAIL.pack(PACK_TAIL_MAGIC, PACK_VERSION, flags, len(entries), table_offset, len(table),
                          zlib.crc32(table))
    return table + tail


def parse_pack_tail(tail: bytes, pack_size: int, name: str) -> tuple[int, int, int, int]:
    """(flags, entry_count, table_offset, table_length) from the last PACK_TAIL.size bytes, checked."""
    if len(tail) != PACK_TAIL.size:
        raise RepoTruncated(f"pack {name}", "truncated trailer", expected=PACK_TAIL.size, found=len(tail))
    magic, version, flags, count, offset, length, _crc = PACK_TAIL.unpack(tail)
    if magic != PACK_TAIL_MAGIC:
        raise RepoBadMagic(f"pack {name}", f"bad trailer magic {magic!r}, expected {PACK_TAIL_MAGIC!r}",
                           expected=PACK_TAIL_MAGIC, found=magic)
    if version != PACK_VERSION:
        raise RepoBadVersion(f"pack {name}", f"version {version}, this Baton reads {PACK_VERSION}",
                             expected=PACK_VERSION, found=version)
    if offset < PACK_HEAD.size or offset + length + PACK_TAIL.size != pack_size:
        raise RepoBadLength(f"pack {name}", f"table at {offset}+{length} does not fit a {pack_size}-byte pack",
                            expected=pack_size, found=offset + length + PACK_TAIL.size)
    return flags, count, offset, length


def parse_pack_table(table: bytes, tail: bytes, name: str, key: bytes | None) -> list[PackEntry]:
    """The entries of a pack from its table bytes and trailer; checks CRC, decrypts, bounds-checks."""
    _magic, _v, flags, count, table_offset, _length, crc = PACK_TAIL.unpack(tail)
    if zlib.crc32(table) != crc:
        raise RepoBadChecksum(f"pack {name}", "table CRC mismatch", expected=crc, found=zlib.crc32(table))
    if flags & PACK_ENCRYPTED:
        if key is None:
            raise KeyError_(f"pack {name} is encrypted and no key was given", hint="pass --key-file FILE")
        try:
            table = AESGCM(key).decrypt(table[:NONCE_LEN], table[NONCE_LEN:], TABLE_AAD)
        except InvalidTag as e:
            raise KeyError_(f"pack {name}: cannot decrypt its table (wrong key?)") from e
    if len(table) != count * PACK_ENTRY.size:
        raise RepoBadLength(f"pack {name}", f"table holds {len(table)} bytes for {count} entries",
                            expected=count * PACK_ENTRY.size, found=len(table))
    out: list[PackEntry] = []
    for i in range(count):
        cid, off, slen, rlen, bflags = PACK_ENTRY.unpack_from(table, i * PACK_ENTRY.size)
        if off < PACK_HEAD.size or off + slen > table_offset:
            raise RepoBadValue(f"pack {name}", f"entry {i} at {off}+{slen} lies outside the blob area",
                               expected=f"{PACK_HEAD.size}..{table_offset}", found=(off, off + slen))
        out.append(PackEntry(cid, off, slen, rlen, bflags))
    return out


def check_pack_head(head: bytes, name: str) -> int:
    """The pack flags from its first PACK_HEAD.size bytes, checked."""
    if len(head) < PACK_HEAD.size:
        raise RepoTruncated(f"pack {name}", "truncated header", expected=PACK_HEAD.size, found=len(head))
    magic, version, flags, _r = PACK_HEAD.unpack_from(head)
    if magic != PACK_MAGIC:
        raise RepoBadMagic(f"pack {name}", f"bad magic {magic!r}, expected {PACK_MAGIC!r}", expected=PACK_MAGIC,
                           found=magic)
    if version != PACK_VERSION:
        raise RepoBadVersion(f"pack {name}", f"version {version}, this Baton reads {PACK_VERSION}",
                             expected=PACK_VERSION, found=version)
    return int(flags)
