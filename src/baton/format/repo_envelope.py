"""The envelope every small repository object travels in (config, lock, manifest, chunk-index file, index page).

Layout (docs/format.md, part 2, "Envelope")::

    offset size field
    0      8    magic         object type, e.g. b"BTNSNAP\\0"
    8      2    version       ENVELOPE_VERSION
    10     2    flags         ENV_ZSTD | ENV_AES_GCM
    12     4    body_length   bytes of body that follow
    16     n    body          plaintext, or nonce(12) || AES-256-GCM(ciphertext || tag(16)) with AAD = bytes 0..16
    16+n   32   checksum      unkeyed BLAKE3-256 of bytes 0..16+n

The outer checksum lets anyone (verify without a key, scrubbers) tell corruption from a wrong key: if the
checksum holds but AES-GCM fails, the key is wrong. Checks run in a fixed order: length, magic, checksum,
version, flags, body length, decryption, decompression.
"""

from __future__ import annotations

import os
import struct

import blake3
import zstandard
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

ENVELOPE = struct.Struct(
    "<"
    "8s"  # magic
    "H"   # version
    "H"   # flags
    "I"   # body_length
)
ENVELOPE_VERSION = 1
CHECKSUM_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16

ENV_ZSTD = 0x0001
ENV_AES_GCM = 0x0002
ENV_KNOWN_FLAGS = ENV_ZSTD | ENV_AES_GCM

MAGIC_CONFIG = b"BTNCONFG"
MAGIC_LOCK = b"BTNLOCK\0"
MAGIC_SNAPSHOT = b"BTNSNAP\0"
MAGIC_INDEX = b"BTNINDEX"
MAGIC_PAGE = b"BTNIPAGE"

# Decompressed bodies larger than this are refused (a corrupt or hostile length cannot exhaust memory).
MAX_BODY = 1 << 30


def seal(magic: bytes, body: bytes, *, compress: bool = False, key: bytes | None = None,
         level: int = 1) -> bytes:
    """Wrap ``body``: optionally zstd-compress it, optionally encrypt it with AES-256-GCM under ``key``."""
    flags = 0
    if compress:
        packed = zstandard.ZstdCompressor(level=level).compress(body)
        if len(packed) < len(body):
            body, flags = packed, flags | ENV_ZSTD
    if key is not None:
        flags |= ENV_AES_GCM
        head_len = len(body) + NONCE_LEN + TAG_LEN
        head = ENVELOPE.pack(magic, ENVELOPE_VERSION, flags, head_len)
        nonce = os.urandom(NONCE_LEN)
        body = nonce + AESGCM(key).encrypt(nonce, body, head)
    head = ENVELOPE.pack(magic, ENVELOPE_VERSION, flags, len(body))
    out = head + body
    return out + blake3.blake3(out).digest()


def is_encrypted(data: bytes) -> bool:
    """True if the (well-formed) envelope's body is encrypted."""
    return len(data) >= ENVELOPE.size and bool(ENVELOPE.unpack_from(data)[2] & ENV_AES_GCM)


def unseal(data: bytes, magic: bytes, *, key: bytes | None = None, name: str = "object") -> bytes:
    """The body of an envelope, checked. A RepoFormatError kind (a RepoCorrupt) names ``name``, what was expected
    and what was found;
    KeyError_ when the checksum holds but decryption fails (wrong key) or a key is needed and missing."""
    if len(data) < ENVELOPE.size + CHECKSUM_LEN:
        raise RepoTruncated(name, f"truncated ({len(data)} bytes, need at least {ENVELOPE.size + CHECKSUM_LEN})",
                            expected=ENVELOPE.size + CHECKSUM_LEN, found=len(data))
    got_magic, version, flags, body_len = ENVELOPE.unpack_from(data)
    if got_magic != magic:
        raise RepoBadMagic(name, f"bad magic {got_magic!r}, expected {magic!r}", expected=magic, found=got_magic)
    if blake3.blake3(data[:-CHECKSUM_LEN]).digest() != data[-CHECKSUM_LEN:]:
        raise RepoBadChecksum(name, "checksum mismatch (the object is damaged)")
    if version != ENVELOPE_VERSION:
        raise RepoBadVersion(name, f"envelope version {version}, this Baton reads {ENVELOPE_VERSION}",
                             expected=ENVELOPE_VERSION, found=version)
    if flags & ~ENV_KNOWN_FLAGS:
        raise RepoBadValue(name, f"unknown flags {flags:#06x}", expected=ENV_KNOWN_FLAGS, found=flags)
    if ENVELOPE.size + body_len + CHECKSUM_LEN != len(data):
        raise RepoBadLength(name, f"body length {body_len} does not match object size {len(data)}",
                            expected=len(data) - ENVELOPE.size - CHECKSUM_LEN, found=body_len)
    body = data[ENVELOPE.size:-CHECKSUM_LEN]
    if flags & ENV_AES_GCM:
        if key is None:
            raise KeyError_(f"{name} is encrypted and no key was given",
                            hint="pass --key-file FILE or set BATON_KEY_FILE")
        try:
            body = AESGCM(key).decrypt(body[:NONCE_LEN], body[NONCE_LEN:], data[:ENVELOPE.size])
        except InvalidTag as e:
            raise KeyError_(f"{name}: cannot decrypt with this key (wrong key file for this repository?)") from e
    if flags & ENV_ZSTD:
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY)
        except zstandard.ZstdError as e:
            raise RepoBadValue(name, f"cannot decompress ({e})") from e
    return body
