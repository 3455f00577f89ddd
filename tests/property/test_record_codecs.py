"""Property tests for the record codecs: every structure round-trips, and any single flipped byte in the checked
part of a structure is detected (never silently decoded into different values)."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from baton.format import record as r

uuids = st.uuids().filter(lambda u: u.int != 0).map(str)  # the nil UUID encodes "none"
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
names = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)
hex16 = st.binary(min_size=16, max_size=16).filter(any).map(bytes.hex)  # all-zero encodes "none"


@st.composite
def headers(draw: st.DrawFn) -> r.RecordHeader:
    return r.RecordHeader(
        placement=draw(st.sampled_from([1, 2, 3])), nslots=draw(st.integers(2, 64)),
        chunk_size=1 << draw(st.integers(12, 22)), disk_uuid=draw(uuids), lineage=draw(uuids),
        disk_size=draw(u64), data_size=draw(u64), record_offset=draw(u64), record_size=draw(u64),
        pages_per_slot=draw(u32), seq=draw(u64), copy=draw(st.sampled_from([0, 1])), flags=draw(st.integers(0, 7)),
        fs_uuid=draw(st.one_of(st.just(""), uuids)), last_backup=draw(st.one_of(st.just(""), hex16)),
        epoch=draw(u64), owner=draw(names), created_ns=draw(u64), updated_ns=draw(u64), backup_seq=draw(u64),
        hw_id=draw(names), nextents=draw(st.integers(0, 169)), extents_crc=draw(u32),
    )


@given(headers())
def test_header_roundtrip(h: r.RecordHeader) -> None:  # the default version: v3 with no era region
    assert r.RecordHeader.unpack(h.pack(), copy=h.copy, record_offset=h.record_offset) == h


@given(headers(), st.integers(0, r.HEADER.size + 3), st.integers(1, 255))
def test_header_detects_any_flipped_byte(h: r.RecordHeader, pos: int, x: int) -> None:
    b = bytearray(h.pack())
    b[pos] ^= x
    try:
        got = r.RecordHeader.unpack(bytes(b), copy=h.copy, record_offset=h.record_offset)
    except r.FormatError:
        return
    raise AssertionError(f"a flipped byte at {pos} decoded as {got}")


@given(st.integers(0, 64), st.integers(1, 3000), u64, u64, st.sampled_from([0, 1]), uuids, names,
       st.one_of(st.just(""), hex16), st.data())
def test_slot_header_roundtrip(region: int, npages: int, seq: int, gen: int, copy: int, disk: str, node: str,
                               bid: str, data: st.DataObject) -> None:
    pm = data.draw(st.binary(min_size=(npages + 7) // 8, max_size=(npages + 7) // 8))
    if npages % 8:
        pm = pm[:-1] + bytes([pm[-1] & ((1 << (npages % 8)) - 1)])
    s = r.SlotHeader(region=region, kind=1, disk_uuid=disk, npages=npages, seq=seq, copy=copy, generation=gen,
                     epoch=seq // 2, node=node, backup_id=bid, page_map=pm)
    assert r.SlotHeader.unpack(s.pack(), region=region, copy=copy, disk_uuid=disk) == s


@given(st.integers(0, 64), st.integers(0, 10000), st.sampled_from([0, 1]), u32, u32, uuids,
       st.binary(min_size=r.PAGE_BYTES, max_size=r.PAGE_BYTES), st.integers(0, r.BLOCK - 1), st.integers(1, 255))
def test_page_sectors_detect_damage_and_localise_it(region: int, page: int, copy: int, gen: int, ctr: int,
                                                    disk: str, bits: bytes, pos: int, x: int) -> None:
    seq = gen << 32 | ctr
    blk = r.pack_page(region=region, page=page, copy=copy, seq=seq, epoch=1, disk_uuid=disk, bits=bits)
    ok = r.parse_page(blk, region=region, page=page, copy=copy, disk_uuid=disk, generation=gen)
    assert ok.complete and ok.bits == bits and ok.seq == seq
    b = bytearray(blk)
    b[pos] ^= x
    bad = r.parse_page(bytes(b), region=region, page=page, copy=copy, disk_uuid=disk, generation=gen)
    assert not bad.complete
    assert bad.damaged == (pos // r.SECTOR,)
    other = r.parse_page(blk, region=region, page=page + 1, copy=copy, disk_uuid=disk, generation=gen)
    assert other.damaged  # a page read from the wrong place never passes
    stale = r.parse_page(blk, region=region, page=page, copy=copy, disk_uuid=disk, generation=gen + 1)
    assert stale.seq is None and not stale.damaged  # an older generation is stale, not damage


@given(st.integers(0, 63), u64, hex16, uuids, names, u64, u64, st.sampled_from(["full", "incremental"]),
       st.sampled_from(["ok", "failed", "aborted"]), st.text(max_size=30), st.binary(min_size=32, max_size=32))
def test_history_roundtrip(slot: int, seq: int, sid: str, lin: str, node: str, a: int, b: int, mode: str,
                           result: str, reason: str, digest: bytes) -> None:
    e = r.HistoryEntry(seq=seq, snapshot_id=sid, lineage=lin, node=node, start_ns=a, end_ns=b, chunks_read=a,
                       bytes_read=b, chunks_stored=a, bytes_stored=b, bytes_deduped=a, mode=mode, result=result,
                       reason=reason, digest=digest.hex(), epoch=seq, slot=slot)
    got = r.HistoryEntry.unpack(e.pack(), slot=slot)
    if len(reason.encode()) <= 96 and "\0" not in reason:
        assert got == e
    else:  # the reason is cut to its 96-byte field; everything else survives
        assert got.snapshot_id == sid and got.digest == e.digest and got.seq == seq


@given(st.lists(st.tuples(u64, u64, u64), max_size=r.EXTMAP_MAX), st.sampled_from([0, 1]), uuids)
def test_extent_map_roundtrip(raw: list[tuple[int, int, int]], copy: int, disk: str) -> None:
    ext = tuple(r.Extent(*t) for t in raw)
    assert r.unpack_extmap(r.pack_extmap(ext, copy=copy, disk_uuid=disk), copy=copy) == (disk, ext)


@given(uuids, u64, u64, u64, st.sampled_from([0, 1]))
def test_anchor_roundtrip(disk: str, size: int, off: int, rsize: int, copy: int) -> None:
    a = r.Anchor(disk_uuid=disk, disk_size=size, record_offset=off, record_size=rsize, copy=copy)
    assert r.Anchor.unpack(a.pack(), copy=copy, disk_size=size) == a


def test_unsupported_version_is_its_own_error() -> None:
    h = r.RecordHeader(placement=1, nslots=4, chunk_size=65536, disk_uuid=str(uuid.uuid4()), lineage="",
                       disk_size=1, data_size=1, record_offset=0, record_size=1, pages_per_slot=1, version=2)
    b = bytearray(h.pack())
    b[8:10] = (4).to_bytes(2, "little")  # a version from the future, with a valid checksum
    end = r.header_length(2) - 4
    b[end : end + 4] = r.crc32c(bytes(b[:end])).to_bytes(4, "little")
    try:
        r.RecordHeader.unpack(bytes(b))
    except r.BadVersion as e:
        assert "version 4" in str(e) and "1..3" in str(e)
    else:
        raise AssertionError("version 4 decoded")


# ------------------------------------------------------------------------------------------------ format v2


@st.composite
def v2_headers(draw: st.DrawFn) -> r.RecordHeader:
    kind = draw(st.sampled_from([r.FS_UNSAVED, r.FS_EXT4, r.FS_XFS, r.FS_NONE]))
    markers = draw(st.binary(min_size=r.FS_MARKERS_SIZE, max_size=r.FS_MARKERS_SIZE)) if kind in (
        r.FS_EXT4, r.FS_XFS) else b""
    from dataclasses import replace

    return replace(draw(headers()), version=2, nrepos=draw(st.integers(0, 64)), fs_kind=kind, fs_markers=markers,
                   markers_ns=draw(u64), flags=draw(st.integers(0, 15)))


@st.composite
def v3_headers(draw: st.DrawFn) -> r.RecordHeader:
    from dataclasses import replace

    region = draw(st.booleans())
    return replace(
        draw(v2_headers()), version=3, flags=draw(st.integers(0, 63)),
        frontend=draw(st.sampled_from(sorted(r.FRONTEND_CODES))),
        era_offset=draw(st.integers(r.REGIONS_START, 2**40)) * r.BLOCK if region else 0,
        era_size=draw(st.integers(1, 2**40)) * r.BLOCK if region else 0, era_folded=draw(u64),
        distrust_reason=draw(st.text(st.characters(min_codepoint=1, max_codepoint=0x2FFF), max_size=40)))


@given(v2_headers())
def test_v2_header_roundtrip(h: r.RecordHeader) -> None:
    assert len(h.pack()) == r.BLOCK and r.header_length(2) <= r.SECTOR  # one sector: never torn
    assert r.RecordHeader.unpack(h.pack(), copy=h.copy, record_offset=h.record_offset) == h


@given(v2_headers(), st.integers(0, r.HEADER.size + r.HEADER_V2.size + 3), st.integers(1, 255))
def test_v2_header_detects_any_flipped_byte(h: r.RecordHeader, pos: int, x: int) -> None:
    b = bytearray(h.pack())
    b[pos] ^= x
    try:
        got = r.RecordHeader.unpack(bytes(b), copy=h.copy, record_offset=h.record_offset)
    except r.FormatError:
        return
    raise AssertionError(f"a flipped byte at {pos} decoded as {got}")


@given(headers())
def test_v1_header_still_writes_and_reads_as_v1(h: r.RecordHeader) -> None:
    from dataclasses import replace

    v1 = replace(h, version=1)
    raw = v1.pack()
    assert int.from_bytes(raw[8:10], "little") == 1 and int.from_bytes(raw[10:12], "little") == 286
    assert r.RecordHeader.unpack(raw, copy=v1.copy, record_offset=v1.record_offset) == v1


@st.composite
def v2_slots(draw: st.DrawFn) -> r.SlotHeader:
    npages = draw(st.integers(1, 3000))
    pm = draw(st.binary(min_size=(npages + 7) // 8, max_size=(npages + 7) // 8))
    if npages % 8:
        pm = pm[:-1] + bytes([pm[-1] & ((1 << (npages % 8)) - 1)])
    kind = draw(st.sampled_from([r.REGION_NODE, r.REGION_FROZEN, r.REGION_REPO]))
    return r.SlotHeader(region=draw(st.integers(0, 200)), kind=kind, disk_uuid=draw(uuids), npages=npages,
                        seq=draw(u64), copy=draw(st.sampled_from([0, 1])), generation=draw(u64), epoch=draw(u64),
                        node=draw(names), backup_id=draw(st.one_of(st.just(""), hex16)), page_map=pm, version=2,
                        repo_id=draw(st.one_of(st.just(""), hex16)), last_backup=draw(st.one_of(st.just(""), hex16)),
                        lineage=draw(st.one_of(st.just(""), uuids)), used_seq=draw(u64),
                        repo_flags=draw(st.integers(0, 15)))


@given(v2_slots())
def test_v2_slot_header_roundtrip(s: r.SlotHeader) -> None:
    assert r.SlotHeader.unpack(s.pack(), region=s.region, copy=s.copy, disk_uuid=s.disk_uuid) == s


@given(v2_slots(), st.data(), st.integers(1, 255))
def test_v2_slot_header_detects_any_flipped_byte(s: r.SlotHeader, data: st.DataObject, x: int) -> None:
    raw = s.pack()
    pos = data.draw(st.integers(0, r.slot_fixed_size(2) + (s.npages + 7) // 8 + 3))
    b = bytearray(raw)
    b[pos] ^= x
    try:
        got = r.SlotHeader.unpack(bytes(b), region=s.region, copy=s.copy, disk_uuid=s.disk_uuid)
    except r.FormatError:
        return
    raise AssertionError(f"a flipped byte at {pos} decoded as {got}")


def test_repo_region_kind_needs_v2() -> None:
    s = r.SlotHeader(region=5, kind=r.REGION_REPO, disk_uuid=str(uuid.uuid4()), npages=1, version=1)
    try:
        r.SlotHeader.unpack(s.pack(), region=5, copy=0, disk_uuid=s.disk_uuid)
    except r.FormatError as e:
        assert "region kind" in str(e)
    else:
        raise AssertionError("a v1 slot header of a repository region decoded")


@given(st.sampled_from([1, 2]), st.integers(0, 64), st.integers(0, 10000), st.sampled_from([0, 1]), u32, u32, uuids,
       st.binary(min_size=r.PAGE_BYTES, max_size=r.PAGE_BYTES))
def test_page_keeps_its_record_version(version: int, region: int, page: int, copy: int, gen: int, ctr: int,
                                       disk: str, bits: bytes) -> None:
    blk = r.pack_page(region=region, page=page, copy=copy, seq=gen << 32 | ctr, epoch=1, disk_uuid=disk, bits=bits,
                      version=version)
    assert int.from_bytes(blk[8:10], "little") == version
    assert r.parse_page(blk, region=region, page=page, copy=copy, disk_uuid=disk, generation=gen).complete


@given(st.binary(min_size=64, max_size=64), u32, u32, st.integers(0, 65535), u64, uuids)
def test_fs_markers_parse_ext4_and_xfs_superblocks(seed: bytes, mtime: int, wtime: int, mnt: int, kb: int,
                                                   fsu: str) -> None:
    import struct

    noise = seed * (r.BLOCK // len(seed))
    ext = bytearray(noise)
    ext[0:4] = b"\0\0\0\0"  # not xfs
    sb = 1024
    struct.pack_into("<IIH", ext, sb + 0x2C, mtime, wtime, mnt)
    struct.pack_into("<H", ext, sb + 0x38, 0xEF53)
    struct.pack_into("<Q", ext, sb + 0x178, kb)
    ext[sb + 0x68 : sb + 0x78] = uuid.UUID(fsu).bytes
    kind, m = r.parse_fs_markers(bytes(ext))
    d = r.describe_fs_markers(kind, m)
    assert kind == r.FS_EXT4 and len(m) == r.FS_MARKERS_SIZE
    assert (d["s_mnt_count"], d["s_kbytes_written"]) == (mnt, kb)
    assert d["s_mtime"] & 0xFFFFFFFF == mtime and d["s_wtime"] & 0xFFFFFFFF == wtime
    bumped = bytearray(ext)
    struct.pack_into("<Q", bumped, sb + 0x178, (kb + 1) % 2**64)
    assert r.parse_fs_markers(bytes(bumped)) != (kind, m)  # any write moves the lifetime counter
    xfs = bytearray(noise)
    xfs[0:4] = b"XFSB"
    struct.pack_into(">H", xfs, 100, 0xB4A5)  # a v5 superblock
    struct.pack_into(">Q", xfs, 240, kb)
    kind, m = r.parse_fs_markers(bytes(xfs))
    assert kind == r.FS_XFS and r.describe_fs_markers(kind, m)["sb_lsn"] == kb
    blank = bytes(r.BLOCK)
    assert r.parse_fs_markers(blank) == (r.FS_NONE, b"")


# ------------------------------------------------------------------------------------------------ format v3


@given(v3_headers())
def test_v3_header_roundtrip(h: r.RecordHeader) -> None:
    raw = h.pack()
    assert int.from_bytes(raw[10:12], "little") == r.header_length(3) == 492 <= r.SECTOR  # one sector: never torn
    assert r.RecordHeader.unpack(raw, copy=h.copy, record_offset=h.record_offset) == h


@given(v3_headers(), st.data(), st.integers(1, 255))
def test_v3_header_detects_any_flipped_byte(h: r.RecordHeader, data: st.DataObject, x: int) -> None:
    pos = data.draw(st.integers(0, r.header_length(3) - 1))
    b = bytearray(h.pack())
    b[pos] ^= x
    try:
        got = r.RecordHeader.unpack(bytes(b), copy=h.copy, record_offset=h.record_offset)
    except r.FormatError:
        return
    raise AssertionError(f"a flipped byte at {pos} decoded as {got}")


@given(v3_headers())
def test_v3_fields_sit_where_format_md_says(h: r.RecordHeader) -> None:
    """The byte offsets of docs/format.md's v3 table."""
    import struct

    raw = h.pack()
    assert raw[334] == r.FRONTEND_CODES[h.frontend] and raw[335] == 0
    assert struct.unpack_from("<QQQ", raw, 336) == (h.era_offset, h.era_size, h.era_folded)
    assert raw[360:488].rstrip(b"\0").decode() == h.distrust_reason
    assert struct.unpack_from("<I", raw, 488)[0] == r.crc32c(raw[:488])
    assert not any(raw[492:])


def test_v3_header_refuses_bad_values() -> None:
    from dataclasses import replace

    h = r.RecordHeader(placement=1, nslots=4, chunk_size=65536, disk_uuid=str(uuid.uuid4()), lineage="",
                       disk_size=1, data_size=1, record_offset=0, record_size=1, pages_per_slot=1, version=3)
    for bad, what in ((replace(h, era_offset=r.BLOCK * r.REGIONS_START + 512, era_size=r.BLOCK), "era region"),
                      (replace(h, era_offset=r.BLOCK, era_size=r.BLOCK), "era region")):
        try:
            r.RecordHeader.unpack(bad.pack())
        except r.FormatError as e:
            assert what in str(e)
        else:
            raise AssertionError(f"{bad} decoded")
    raw = bytearray(h.pack())
    raw[334] = 9  # an unknown frontend, with a valid checksum
    raw[488:492] = r.crc32c(bytes(raw[:488])).to_bytes(4, "little")
    try:
        r.RecordHeader.unpack(bytes(raw))
    except r.FormatError as e:
        assert "frontend" in str(e)
    else:
        raise AssertionError("frontend 9 decoded")
    try:
        replace(h, frontend="iscsi").pack()
    except ValueError as e:
        assert "frontend" in str(e)
    else:
        raise AssertionError("frontend 'iscsi' packed")


@given(v3_headers(), st.sampled_from([1, 2]))
def test_v1_v2_headers_never_carry_v3_fields(h: r.RecordHeader, version: int) -> None:
    from dataclasses import replace

    old = replace(h, version=version, era_offset=0, era_size=0, era_folded=0, frontend="", distrust_reason="",
                  flags=h.flags & 15, **({"nrepos": 0, "fs_kind": 0, "fs_markers": b"", "markers_ns": 0}
                                         if version == 1 else {}))
    raw = old.pack()
    assert int.from_bytes(raw[10:12], "little") == r.header_length(version) and not any(raw[r.header_length(version):])
    assert r.RecordHeader.unpack(raw, copy=old.copy, record_offset=old.record_offset) == old


@given(st.integers(0, 63), u64, hex16, uuids, names, st.sampled_from(["full", "incremental"]), u64,
       st.sampled_from([1, 2, 3]))
def test_history_era_is_kept_by_v3_only(slot: int, seq: int, sid: str, lin: str, node: str, mode: str, era: int,
                                        version: int) -> None:
    import struct

    e = r.HistoryEntry(seq=seq, snapshot_id=sid, lineage=lin, node=node, start_ns=1, end_ns=2, chunks_read=3,
                       bytes_read=4, chunks_stored=5, bytes_stored=6, bytes_deduped=7, mode=mode, result="ok",
                       reason="", digest="ab" * 32, epoch=seq, slot=slot, version=version, era=era)
    raw = e.pack()
    got = r.HistoryEntry.unpack(raw, slot=slot)
    assert len(raw) == r.HISTORY_ENTRY_SIZE
    if version >= 3:
        assert got == e and struct.unpack_from("<Q", raw, 320)[0] == era
    else:  # v1/v2 entries have no field for it: zeros, exactly as those versions wrote them
        assert got.era == 0 and not any(raw[320:508]) and got == r.HistoryEntry(**{**e.__dict__, "era": 0})


@given(st.integers(1, 2**47), st.sampled_from([1 << k for k in range(12, 23)]))
def test_era_region_size_follows_its_formula(data_size: int, chunk: int) -> None:
    size = r.era_region_size(data_size, chunk)
    n = -(-data_size // chunk)
    assert size % r.ERA_ALIGN == 0 and r.ERA_MIN_SIZE <= size <= r.ERA_MAX_SIZE
    # at least the era array twice (4 bytes per block) plus two writesets (1 bit per block), unless capped
    assert size >= min(r.ERA_MAX_SIZE, 2 * 4 * n + 2 * n // 8)
    assert r.era_region_size(data_size + chunk * 1018, chunk) >= size  # grows with the disk
    off = r.era_offset_at_end(r.area_for_era(12345, size), 12345, size)
    assert off is not None and off % r.ERA_ALIGN == 0 and off >= 12345 and off + size == r.area_for_era(12345, size)


def test_era_region_sizes_at_64k_chunks() -> None:
    """The figures docs/format.md and `baton init --help` state."""
    mib = 1 << 20
    assert [r.era_region_size(s, 65536) // mib for s in (4 << 30, 1 << 40, 16 << 40)] == [4, 155, 2464]
