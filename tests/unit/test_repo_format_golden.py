"""Known-answer tests that pin repository format v1 byte for byte (docs/format.md, part 2).

If one of these fails, the on-disk format changed: bump the version, keep reading v1, and add a row to the
version history instead of editing the expected bytes.
"""

from __future__ import annotations

import blake3

from baton.format.repo_envelope import MAGIC_PAGE, seal, unseal
from baton.format.repo_index import ZERO_ID, IndexEntry, decode_page, encode_index, encode_page
from baton.format.repo_pack import (
    PACK_TAIL,
    PackEntry,
    check_pack_head,
    pack_footer,
    pack_head,
    parse_pack_table,
    parse_pack_tail,
)
from baton.repo.crypto import chunk_id
from baton.repo.keys import derive_keys

PAGE_ENVELOPE_V1 = bytes.fromhex(
    "42544e495041474501000000480000000001000002000000"
    + "01" * 32 + "00" * 32
    + "7ac5fdeaac7f42bfbc2db5d68e90a265df9655dd31d7cd984f3bd56cbcf1a3fd")
PACK_V1 = bytes.fromhex(
    "42544e5041434b000100000000000000" "626c6f62"
    + "07" * 32 + "100000000000000004000000040000000000000042544e504b454e440100000001000000"
    "140000000000000034000000fac36921")


def test_page_envelope_v1() -> None:
    assert seal(MAGIC_PAGE, encode_page(0, [bytes([1]) * 32, ZERO_ID])) == PAGE_ENVELOPE_V1
    assert decode_page(unseal(PAGE_ENVELOPE_V1, MAGIC_PAGE), "golden") == (0, [bytes([1]) * 32, ZERO_ID])


def test_pack_v1() -> None:
    entries = [PackEntry(bytes([7]) * 32, 16, 4, 4, 0)]
    assert pack_head(False) + b"blob" + pack_footer(entries, 20, None) == PACK_V1
    assert check_pack_head(PACK_V1, "golden") == 0
    tail = PACK_V1[-PACK_TAIL.size:]
    _f, count, off, length = parse_pack_tail(tail, len(PACK_V1), "golden")
    assert (count, off, length) == (1, 20, 52)
    assert parse_pack_table(PACK_V1[off:off + length], tail, "golden", None) == entries
    assert PACK_V1[16:20] == b"blob"


def test_index_v1() -> None:
    body = encode_index([(bytes([2]) * 32, IndexEntry(bytes([3]) * 32, 16, 4, 4, 1))])
    assert blake3.blake3(body).hexdigest() == "39b114c173e9e3f5e4d71f4a9df63eb9a990e47b1f7419ec6443f214183de235"


def test_key_derivation_and_chunk_id_v1() -> None:
    keys = derive_keys(bytes(range(32)), bytes(16), False)
    assert keys.id_key.hex() == "19093fab66813c605be8bc0d4cfc262c1765379ea7e11d4be8cb8319fc848ebc"
    assert chunk_id(keys, b"hello").hex() == "bec0b9e711445b1a4717b09bf497b90939091024b8e2c9e328407d352d6bac2f"
