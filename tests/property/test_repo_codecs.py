"""Property tests: repository codecs round-trip and reject damage; index trees match a list model."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.errors import KeyError_, RepoCorrupt
from baton.format.repo_envelope import MAGIC_PAGE, seal, unseal
from baton.format.repo_index import (
    PAGE_FANOUT,
    ZERO_ID,
    IndexEntry,
    decode_index,
    decode_page,
    encode_index,
    encode_page,
)
from baton.format.repo_pack import (
    PACK_TAIL,
    PackEntry,
    check_pack_head,
    pack_footer,
    pack_head,
    parse_pack_table,
    parse_pack_tail,
)
from baton.repo import BackupWriter, DiskIdentity, Repository
from baton.repo.crypto import decode_blob, encode_blob
from baton.repo.keys import derive_keys

ids = st.binary(min_size=32, max_size=32)
keys = st.one_of(st.none(), st.binary(min_size=32, max_size=32))


@given(body=st.binary(max_size=5000), compress=st.booleans(), key=keys)
def test_envelope_round_trip(body: bytes, compress: bool, key: bytes | None) -> None:
    data = seal(MAGIC_PAGE, body, compress=compress, key=key)
    assert unseal(data, MAGIC_PAGE, key=key) == body


@given(body=st.binary(min_size=1, max_size=500), key=keys, pos=st.integers(min_value=0), bit=st.integers(0, 7))
def test_envelope_detects_any_bit_flip(body: bytes, key: bytes | None, pos: int, bit: int) -> None:
    data = bytearray(seal(MAGIC_PAGE, body, compress=True, key=key))
    data[pos % len(data)] ^= 1 << bit
    with pytest.raises(RepoCorrupt):
        unseal(bytes(data), MAGIC_PAGE, key=key)


@given(body=st.binary(max_size=200))
def test_envelope_wrong_key_is_key_error(body: bytes) -> None:
    data = seal(MAGIC_PAGE, body, key=os.urandom(32))
    with pytest.raises(KeyError_):
        unseal(data, MAGIC_PAGE, key=os.urandom(32))


@given(entries=st.lists(st.tuples(ids, ids, st.integers(0, 2**40), st.integers(0, 2**31), st.integers(0, 2**31),
                                  st.integers(0, 3)), max_size=50))
def test_index_round_trip(entries: list[tuple[bytes, bytes, int, int, int, int]]) -> None:
    model = [(c, IndexEntry(p, o, s, r, f)) for c, p, o, s, r, f in entries]
    assert decode_index(encode_index(model), "x") == model


@given(level=st.integers(0, 5), page=st.lists(ids, min_size=1, max_size=64))
def test_page_round_trip(level: int, page: list[bytes]) -> None:
    assert decode_page(encode_page(level, page), "x") == (level, page)


@given(blobs=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20), key=keys)
def test_pack_table_round_trip(blobs: list[bytes], key: bytes | None) -> None:
    buf = bytearray(pack_head(key is not None))
    entries = []
    for i, b in enumerate(blobs):
        entries.append(PackEntry(bytes([i]) * 32, len(buf), len(b), len(b) + 1, i % 4))
        buf += b
    table_off = len(buf)
    buf += pack_footer(entries, table_off, key)
    data = bytes(buf)
    check_pack_head(data, "p")
    tail = data[-PACK_TAIL.size:]
    _flags, count, off, length = parse_pack_tail(tail, len(data), "p")
    assert (count, off) == (len(blobs), table_off)
    assert parse_pack_table(data[off:off + length], tail, "p", key) == entries


@given(data=st.binary(min_size=1, max_size=20000), encrypted=st.booleans())
def test_blob_round_trip(data: bytes, encrypted: bool) -> None:
    k = derive_keys(b"m" * 32, b"r" * 16, encrypted)
    from baton.repo.crypto import chunk_id

    cid = chunk_id(k, data)
    stored, flags = encode_blob(k, cid, data)
    assert decode_blob(k, cid, stored, flags, len(data)) == data
    if encrypted:
        with pytest.raises(RepoCorrupt):                  # a blob is bound to its chunk id
            decode_blob(k, bytes(32), stored, flags, len(data))


CS = 4096


@settings(max_examples=25, deadline=None)
@given(chunks=st.integers(1, PAGE_FANOUT * 2 + 5),
       rounds=st.lists(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 3)), max_size=12),
                       min_size=1, max_size=4))
def test_tree_matches_list_model(chunks: int, rounds: list[list[tuple[int, int]]]) -> None:
    """Successive incrementals writing random chunks (some zero) read back exactly like a plain list."""
    repo = Repository.init(f"memory://prop-{uuid.uuid4().hex}")
    disk = DiskIdentity("d", chunks * CS, CS)
    contents = [bytes([v]) * CS if v else bytes(CS) for v in range(4)]
    model = [0] * chunks
    parent = None
    for writes in rounds:
        w = BackupWriter(repo, disk, parent=parent, node="n", mode="incremental" if parent else "full",
                              reason="", lineage="L")
        for pos, v in writes:
            i = pos % chunks
            w.put(i, contents[v])
            model[i] = v
        parent = w.commit({})
        r = repo.snapshot_reader(parent)
        expect = {i for i, v in enumerate(model) if v}
        got = {i for i, cid in enumerate(r.iter_ids()) if cid != ZERO_ID}
        assert got == expect
        for i in list(expect)[:5]:
            assert r.read(i) == contents[model[i]]
