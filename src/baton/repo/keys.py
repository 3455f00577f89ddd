"""Repository configuration and keys.

The ``config`` object (envelope magic BTNCONFG, never encrypted, JSON body) names the repository and its
algorithms. Every repository has a random 32-byte *master key*; the chunk-id key and the data key are derived
from it with BLAKE3's key-derivation mode, so there is one secret to protect:

* ``encryption = "none"``: the master key is stored in ``config`` in the clear. Chunk ids are still keyed
  (they deduplicate within the repository only), but anyone who can read the store can read the data.
* ``encryption = "aes-256-gcm"``: the master key is stored wrapped with AES-256-GCM under a key-encryption key
  derived from the user's key file (32 random bytes, kept outside the repository). A wrong key file fails the
  GCM tag and gives :class:`~baton.errors.KeyError_`.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from baton.errors import KeyError_, RepoCorrupt, UsageError
from baton.format.repo_envelope import MAGIC_CONFIG, seal, unseal

CONFIG_VERSION = 1
ENCRYPTIONS = ("none", "aes-256-gcm")
CTX_WRAP = "baton 2026-11-24 key file wraps the repository master key"
CTX_CHUNK_ID = "baton 2026-11-24 chunk id key"
CTX_DATA = "baton 2026-11-24 aes-256-gcm data key"
KEY_LEN = 32


@dataclass(frozen=True)
class RepoKeys:
    """The derived secrets of an open repository."""

    repo_id: bytes               # 16 random bytes, public
    id_key: bytes                # keyed BLAKE3 for chunk ids and page ids
    data_key: bytes | None       # AES-256-GCM key for blobs and metadata; None when not encrypted

    @property
    def encrypted(self) -> bool:
        return self.data_key is not None


@dataclass(frozen=True)
class RepoConfig:
    """The decoded ``config`` object."""

    version: int
    repo_id: bytes
    encryption: str
    chunk_id: str                # "blake3-keyed"
    compression: str             # "zstd-1"
    pack_target: int             # bytes
    master_key: bytes | None     # only when encryption == "none"
    wrapped_master: bytes | None  # nonce || AES-GCM(master) when encrypted

    def encode(self) -> bytes:
        doc = {"version": self.version, "repo_id": self.repo_id.hex(), "encryption": self.encryption,
               "chunk_id": self.chunk_id, "compression": self.compression, "pack_target": self.pack_target}
        if self.master_key is not None:
            doc["master_key"] = self.master_key.hex()
        if self.wrapped_master is not None:
            doc["wrapped_master"] = self.wrapped_master.hex()
        return seal(MAGIC_CONFIG, json.dumps(doc, sort_keys=True).encode())

    @classmethod
    def decode(cls, data: bytes) -> RepoConfig:
        body = unseal(data, MAGIC_CONFIG, name="config")
        try:
            doc = json.loads(body)
            cfg = cls(int(doc["version"]), bytes.fromhex(doc["repo_id"]), str(doc["encryption"]),
                      str(doc["chunk_id"]), str(doc["compression"]), int(doc["pack_target"]),
                      bytes.fromhex(doc["master_key"]) if "master_key" in doc else None,
                      bytes.fromhex(doc["wrapped_master"]) if "wrapped_master" in doc else None)
        except (ValueError, KeyError, TypeError) as e:
            raise RepoCorrupt(f"config: malformed ({e})") from e
        if cfg.version != CONFIG_VERSION:
            raise RepoCorrupt(f"config: version {cfg.version}, this Baton reads {CONFIG_VERSION}")
        if cfg.encryption not in ENCRYPTIONS or cfg.chunk_id != "blake3-keyed":
            raise RepoCorrupt(f"config: unsupported encryption {cfg.encryption!r} or chunk id {cfg.chunk_id!r}")
        return cfg


def derive_keys(master: bytes, repo_id: bytes, encrypted: bool) -> RepoKeys:
    id_key = blake3.blake3(master, derive_key_context=CTX_CHUNK_ID).digest()
    data_key = blake3.blake3(master, derive_key_context=CTX_DATA).digest() if encrypted else None
    return RepoKeys(repo_id, id_key, data_key)


def _kek(key_file_secret: bytes) -> bytes:
    return blake3.blake3(key_file_secret, derive_key_context=CTX_WRAP).digest()


def new_config(encryption: str, key_secret: bytes | None, pack_target: int) -> tuple[RepoConfig, RepoKeys]:
    """A fresh config with a random repo id and master key."""
    if encryption not in ENCRYPTIONS:
        raise UsageError(f"unknown encryption {encryption!r}; choose one of {', '.join(ENCRYPTIONS)}")
    repo_id, master = os.urandom(16), os.urandom(KEY_LEN)
    if encryption == "none":
        cfg = RepoConfig(CONFIG_VERSION, repo_id, encryption, "blake3-keyed", "zstd-1", pack_target, master, None)
    else:
        if key_secret is None:
            raise UsageError("--encryption aes-256-gcm needs --key-file FILE")
        nonce = os.urandom(12)
        wrapped = nonce + AESGCM(_kek(key_secret)).encrypt(nonce, master, repo_id)
        cfg = RepoConfig(CONFIG_VERSION, repo_id, encryption, "blake3-keyed", "zstd-1", pack_target, None, wrapped)
    return cfg, derive_keys(master, repo_id, encryption != "none")


def unlock(cfg: RepoConfig, key_secret: bytes | None) -> RepoKeys:
    """The derived keys, or KeyError_ when the key is missing or wrong."""
    if cfg.encryption == "none":
        assert cfg.master_key is not None
        return derive_keys(cfg.master_key, cfg.repo_id, False)
    if key_secret is None:
        raise KeyError_("the repository is encrypted and no key file was given",
                        hint="pass --key-file FILE or set BATON_KEY_FILE")
    assert cfg.wrapped_master is not None
    try:
        master = AESGCM(_kek(key_secret)).decrypt(cfg.wrapped_master[:12], cfg.wrapped_master[12:], cfg.repo_id)
    except InvalidTag as e:
        raise KeyError_("the key file does not unlock this repository (wrong key file?)") from e
    return derive_keys(master, cfg.repo_id, True)


def read_key_file(path: str) -> bytes:
    """The 32-byte secret in ``path`` (64 hex digits, optionally followed by a newline, or 32 raw bytes).

    Refuses (KeyError_) a missing or unreadable file, one readable or writable by group/others, and one
    whose content is not a key.
    """
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read(1024)
    except OSError as e:
        raise KeyError_(f"cannot read key file {path}: {e.strerror or e}") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyError_(f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                        hint=f"chmod 600 {path}")
    text = raw.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    if len(raw) == KEY_LEN:
        return raw
    raise KeyError_(f"key file {path} does not hold a key (expected 64 hex digits)")


def create_key_file(path: str) -> bytes:
    """Write a new random key to ``path`` with mode 0600 (refuses to overwrite). Returns the secret."""
    secret = os.urandom(KEY_LEN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as e:
        raise KeyError_(f"key file {path} already exists") from e
    except OSError as e:
        raise KeyError_(f"cannot create key file {path}: {e.strerror or e}") from e
    try:
        os.write(fd, (secret.hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret
