"""NBD wire codecs: round trips (Hypothesis), golden bytes from the spec, and rejection of malformed input."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from baton.format import nbd_proto as P
from baton.frontends.nbd import dirty_descriptors

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)


def test_golden_bytes() -> None:
    assert P.HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT, 3) == b"NBDMAGICIHAVEOPT\x00\x03"
    assert P.Request(1, P.Cmd.WRITE, 7, 4096, 512).pack() == bytes.fromhex(
        "25609513" "0001" "0001" "0000000000000007" "0000000000001000" "00000200"
    )
    assert P.SimpleReply(5, 9).pack() == bytes.fromhex("67446698" "00000005" "0000000000000009")
    assert P.ChunkHeader(1, P.ReplyType.OFFSET_DATA, 2, 12).pack() == bytes.fromhex(
        "668e33ef" "0001" "0001" "0000000000000002" "0000000c"
    )
    assert P.OptionReply(P.Opt.GO, P.Rep.ERR_UNKNOWN, b"x").pack() == bytes.fromhex(
        "0003e889045565a9" "00000007" "80000006" "00000001"
    ) + b"x"
    assert P.pack_info_export(1 << 30, 0x10D) == bytes.fromhex("0000" "0000000040000000" "010d")
    assert P.pack_export_name_reply(512, 1, no_zeroes=False) == bytes.fromhex("0000000000000200" "0001") + bytes(124)
    assert P.pack_export_name_reply(512, 1, no_zeroes=True) == bytes.fromhex("0000000000000200" "0001")


@given(u16, u16, u64, u64, u32)
def test_request_roundtrip(flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
    r = P.Request(flags, cmd, cookie, offset, length)
    assert P.Request.unpack(r.pack()) == r


@given(u32, u64)
def test_simple_reply_roundtrip(error: int, cookie: int) -> None:
    assert P.SimpleReply.unpack(P.SimpleReply(error, cookie).pack()) == P.SimpleReply(error, cookie)


@given(u16, u16, u64, u32)
def test_chunk_header_roundtrip(flags: int, rtype: int, cookie: int, length: int) -> None:
    h = P.ChunkHeader(flags, rtype, cookie, length)
    assert P.ChunkHeader.unpack(h.pack()) == h


@given(u32, u32)
def test_option_header_roundtrip(option: int, length: int) -> None:
    h = P.OptionHeader(option, length)
    assert P.OptionHeader.unpack(h.pack()) == h


@given(names, st.lists(u16, max_size=5))
def test_info_request_roundtrip(name: str, reqs: list[int]) -> None:
    r = P.InfoRequest(name, tuple(reqs))
    assert P.InfoRequest.unpack(r.pack()) == r


@given(names, st.lists(names.map(lambda s: "ns:" + s), max_size=5))
def test_meta_context_request_roundtrip(name: str, queries: list[str]) -> None:
    r = P.MetaContextRequest(name, tuple(queries))
    assert P.MetaContextRequest.unpack(r.pack()) == r


@given(st.integers(1, 2**32 - 1), names)
def test_error_chunk_roundtrip(error: int, message: str) -> None:
    e = P.ErrorChunk(error, message)
    assert P.ErrorChunk.unpack(e.pack()) == e


@given(u32, st.lists(st.tuples(st.integers(1, 2**32 - 1), u32), min_size=1, max_size=20))
def test_block_status_roundtrip(ctx: int, extents: list[tuple[int, int]]) -> None:
    b = P.BlockStatusChunk(ctx, tuple(extents))
    assert P.BlockStatusChunk.unpack(b.pack()) == b


@given(names, st.binary(max_size=64))
def test_truncated_or_padded_option_data_is_rejected(name: str, junk: bytes) -> None:
    good = P.InfoRequest(name, (1, 3)).pack()
    for bad in (good[:-1], good + b"\0", good[:3]):
        with pytest.raises(ValueError):
            P.InfoRequest.unpack(bad)
    good = P.MetaContextRequest(name, ("base:allocation",)).pack()
    for bad in (good[:-1], good + b"\0"):
        with pytest.raises(ValueError):
            P.MetaContextRequest.unpack(bad)
    # Arbitrary bytes either parse to something that packs back identically, or raise ValueError.
    for cls in (P.InfoRequest, P.MetaContextRequest):
        try:
            parsed = cls.unpack(junk)
        except ValueError:
            continue
        assert parsed.pack() == junk


def test_bad_magics_and_strings_are_rejected() -> None:
    with pytest.raises(ValueError, match="magic"):
        P.Request.unpack(struct.pack(">IHHQQI", 0x12560953, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="magic"):
        P.OptionHeader.unpack(struct.pack(">QII", P.NBDMAGIC, 1, 0))
    with pytest.raises(ValueError, match="magic"):
        P.OptionReply.unpack_header(struct.pack(">QIII", 1, 1, 1, 0))
    with pytest.raises(ValueError, match="NUL"):
        P.decode_string(b"a\0b", "name")
    with pytest.raises(ValueError, match="UTF-8"):
        P.decode_string(b"\xff", "name")
    with pytest.raises(ValueError):
        P.encode_string("x" * (P.MAX_STRING + 1))
    with pytest.raises(ValueError):
        P.ErrorChunk(0, "no").pack()
    with pytest.raises(ValueError):
        P.BlockStatusChunk(1, ((0, 0),)).pack()
    with pytest.raises(ValueError):
        P.BlockStatusChunk.unpack(b"\0" * 4)


runs_strategy = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 60), st.booleans()), max_size=8)


@given(runs_strategy, st.integers(0, 100), st.integers(1, 150))
def test_dirty_descriptors_never_under_report(runs: list[tuple[int, int, bool]], offset: int, length: int) -> None:
    """The descriptors tile [offset, offset+length) exactly, adjacent ones differ, and a byte is reported clean
    exactly when some run covers it and every covering run says clean (a dirty claim always wins)."""
    out = dirty_descriptors(runs, offset, length)
    assert sum(n for n, _ in out) == length and all(n > 0 for n, _ in out)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(out))
    pos = offset
    for n, flags in out:
        for b in range(pos, pos + n):
            covering = [d for s, ln, d in runs if s <= b < s + ln]
            clean = bool(covering) and not any(covering)
            assert (flags == 0) == clean, f"byte {b}: flags {flags}, covering runs {covering}"
        pos += n


@given(runs_strategy, st.integers(0, 100), st.integers(1, 150))
def test_dirty_descriptors_req_one(runs: list[tuple[int, int, bool]], offset: int, length: int) -> None:
    one = dirty_descriptors(runs, offset, length, req_one=True)
    assert len(one) == 1 and 0 < one[0][0] <= length
    assert one[0] == dirty_descriptors(runs, offset, length)[0]
