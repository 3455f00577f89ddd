"""Chunk ids and blob encoding: keyed BLAKE3, zstd level 1, optional AES-256-GCM.

Thread safety: zstandard compressor objects must never be shared between threads (sharing one segfaulted the
interpreter in measurements), so each thread gets its own through a ``threading.local``. BLAKE3, zstd and
AES-GCM all release the GIL, which is what makes the encode pool worth having.
"""

from __future__ import annotations

import os
import threading

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from baton.errors import RepoCorrupt
from baton.format.repo_pack import BLOB_AES_GCM, BLOB_ZSTD
from baton.repo.keys import RepoKeys

NONCE_LEN = 12
ZSTD_LEVEL = 1

_tls = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "cctx", None)
    if c is None:
        c = _tls.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def chunk_id(keys: RepoKeys, data: bytes | memoryview) -> bytes:
    """Keyed BLAKE3-256 of the plaintext."""
    return blake3.blake3(data, key=keys.id_key).digest()


def blob_aad(keys: RepoKeys, cid: bytes, flags: int) -> bytes:
    # Binding repo id, chunk id and flags means a blob cannot be swapped for another chunk's blob or moved
    # between repositories without failing authentication.
    return keys.repo_id + cid + bytes([flags])


def encode_blob(keys: RepoKeys, cid: bytes, data: bytes | memoryview) -> tuple[bytes, int]:
    """(stored bytes, BLOB_* flags). Compressed only when that saves at least 1/8 of the size. A view is
    compressed as it is; only a chunk stored raw is copied (the caller's read buffer is not kept)."""
    flags = 0
    packed = _compressor().compress(data)
    if len(packed) <= len(data) - len(data) // 8:
        payload, flags = packed, BLOB_ZSTD
    else:
        payload = data if isinstance(data, bytes) else bytes(data)
    if keys.data_key is not None:
        flags |= BLOB_AES_GCM
        nonce = os.urandom(NONCE_LEN)
        payload = nonce + AESGCM(keys.data_key).encrypt(nonce, payload, blob_aad(keys, cid, flags))
    return payload, flags


def decode_blob(keys: RepoKeys, cid: bytes, stored: bytes | memoryview, flags: int, raw_length: int, *,
                verify: bool = True) -> bytes | memoryview:
    """The plaintext chunk, checked against ``cid``. RepoCorrupt names the chunk on any failure. A blob stored
    raw and unencrypted comes back as ``stored`` itself (a view stays a view: no copy)."""
    name = cid.hex()
    payload: bytes | memoryview = stored
    if flags & BLOB_AES_GCM:
        if keys.data_key is None:
            raise RepoCorrupt(f"chunk {name}: encrypted blob in an unencrypted repository")
        try:
            payload = AESGCM(keys.data_key).decrypt(stored[:NONCE_LEN], stored[NONCE_LEN:],
                                                    blob_aad(keys, cid, flags))
        except InvalidTag as e:
            raise RepoCorrupt(f"chunk {name}: authentication failed (corrupt blob)") from e
    if flags & BLOB_ZSTD:
        try:
            payload = _decompressor().decompress(payload, max_output_size=raw_length)
        except zstandard.ZstdError as e:
            raise RepoCorrupt(f"chunk {name}: cannot decompress ({e})") from e
    if len(payload) != raw_length:
        raise RepoCorrupt(f"chunk {name}: {len(payload)} bytes, index says {raw_length}")
    if verify and chunk_id(keys, payload) != cid:
        raise RepoCorrupt(f"chunk {name}: content does not match its id (corrupt data)")
    return payload
