"""The one valid-copy picker (baton.format.copies) and the format error tree (baton.format.errors): kinds are
told apart by type, never by message text."""

from __future__ import annotations

import pytest

from baton.errors import RepoCorrupt, exit_code
from baton.format import errors as fe
from baton.format.copies import pick_newest, split_blocks
from baton.format.record import BLOCK, Anchor, RecordDiskSuper, RecordHeader, geometry_for
from baton.format.repo_envelope import MAGIC_PAGE, seal, unseal
from baton.format.repo_pack import parse_pack_tail

UUID = "12345678-1234-5678-1234-567812345678"


def _header(seq: int, copy: int) -> bytes:
    g = geometry_for(1 << 20, 65536, 2)
    return RecordHeader(placement=1, nslots=2, chunk_size=65536, disk_uuid=UUID, lineage=UUID, disk_size=1 << 21,
                        data_size=1 << 20, record_offset=0, record_size=g.size, pages_per_slot=g.pages_per_slot,
                        seq=seq, copy=copy).pack()


def _pick(raw: list[bytes]):  # type: ignore[no-untyped-def]
    return pick_newest(raw, lambda c, b: RecordHeader.unpack(b, copy=c), seq=lambda h: h.seq)


def test_the_valid_copy_with_the_highest_seq_wins() -> None:
    assert _pick([_header(4, 0), _header(5, 1)]).best.seq == 5  # type: ignore[union-attr]
    assert _pick([_header(6, 0), _header(5, 1)]).best.seq == 6  # type: ignore[union-attr]
    damaged = bytearray(_header(9, 1))
    damaged[40] ^= 1
    got = _pick([_header(4, 0), bytes(damaged)])
    assert got.best.seq == 4  # type: ignore[union-attr]
    assert [type(e) for e in got.problems] == [fe.BadChecksum]
    assert got.damaged == got.problems


def test_blank_and_foreign_copies_are_told_apart_by_type() -> None:
    got = _pick([bytes(BLOCK), bytes(BLOCK)])
    assert got.best is None and got.all_blank and got.all_foreign and not got.damaged
    got = _pick([bytes(BLOCK), b"NOTBATON" + bytes(BLOCK - 8)])
    assert not got.all_blank and got.all_foreign
    assert isinstance(got.problems[1], fe.BadMagic) and not isinstance(got.problems[1], fe.Blank)
    assert got.problems[1].expected == b"BATONREC" and got.problems[1].found == b"NOTBATON"


def test_a_copy_read_from_the_wrong_place_is_a_bad_identity() -> None:
    got = _pick([_header(1, 1), _header(2, 0)])  # the copies swapped
    assert got.best is None
    assert all(isinstance(e, fe.BadIdentity) for e in got.problems)
    assert (got.problems[0].expected, got.problems[0].found) == (0, 1)


def test_an_anchor_of_another_disk_size_is_its_own_kind() -> None:
    raw = Anchor(UUID, 1 << 30, 0, 1 << 20, copy=0).pack()
    with pytest.raises(fe.OtherDiskSize) as ei:
        Anchor.unpack(raw, copy=0, disk_size=1 << 31)
    assert (ei.value.expected, ei.value.found) == (1 << 31, 1 << 30)


def test_written_once_structures_take_the_first_valid_copy() -> None:
    raw = RecordDiskSuper(UUID, 1 << 20, (), seq=3, copy=1).pack()
    got = pick_newest(split_blocks(bytes(BLOCK) + raw, 2, BLOCK), lambda c, b: RecordDiskSuper.unpack(b, copy=c))
    assert got.best is not None and got.best.seq == 3 and isinstance(got.problems[0], fe.Blank)


def test_repository_objects_raise_kinds_that_are_also_repo_corrupt() -> None:
    sealed = bytearray(seal(MAGIC_PAGE, b"body"))
    sealed[-1] ^= 1
    with pytest.raises(fe.BadChecksum) as ei:
        unseal(bytes(sealed), MAGIC_PAGE, name="pages/x")
    assert isinstance(ei.value, RepoCorrupt) and exit_code(ei.value) == 7
    assert str(ei.value) == "pages/x: checksum mismatch (the object is damaged)"
    with pytest.raises(RepoCorrupt) as ej:
        parse_pack_tail(b"short", 100, "p1")
    assert isinstance(ej.value, fe.Truncated) and ej.value.what == "pack p1"


def test_every_codec_error_is_a_format_error_and_a_value_error() -> None:
    for name in dir(fe):
        obj = getattr(fe, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == fe.__name__:
            assert issubclass(obj, fe.FormatError) and issubclass(obj, ValueError), name


def test_a_codec_error_travels_as_its_public_class() -> None:
    """--json errors and the daemon's control protocol carry the nearest baton.errors class, so the receiver
    rebuilds RepoCorrupt (exit 7), not an unknown name (which would become a DaemonError, exit 8)."""
    from baton.daemon.protocol import error_reply, raise_reply
    from baton.errors import Fenced, public_name

    err = fe.RepoBadChecksum("pack p", "table CRC mismatch")
    assert public_name(err) == "RepoCorrupt" and public_name(Fenced("x")) == "Fenced"
    reply = error_reply(err)
    assert reply["error"] == "RepoCorrupt"
    with pytest.raises(RepoCorrupt) as ei:
        raise_reply(reply)
    assert exit_code(ei.value) == 7 and str(ei.value) == "pack p: table CRC mismatch"
