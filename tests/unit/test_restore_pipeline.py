"""The restore pipeline's batching: aligned buffers reused across many batches (zero chunks after data in a
reused buffer, a chunk repeated inside a batch), a disk whose size is not a multiple of the 4 KiB O_DIRECT
alignment, and a target file system that refuses O_DIRECT. Every restore is compared byte for byte."""

from __future__ import annotations

import os
import random

import blake3
import pytest

import baton.restore as restore_mod
from baton.device import ALIGN, AlignedWriter, aligned_buffer
from baton.repo import BackupWriter, DiskIdentity, Repository
from baton.restore import restore

CS = 4096


def _image(seed: int, chunks: int, tail: int) -> bytes:
    """Data, zero runs and repeats at chunk granularity, plus a short last chunk."""
    rng = random.Random(seed)
    blocks = []
    same = rng.randbytes(CS)
    for i in range(chunks):
        kind = rng.choice(("data", "zero", "zero", "same"))
        blocks.append(rng.randbytes(CS) if kind == "data" else bytes(CS) if kind == "zero" else same)
        if i % 7 == 0:
            blocks[-1] = bytes(CS)   # zero chunks land where an earlier batch left data in the buffer
    return b"".join(blocks) + rng.randbytes(tail)


def _backup(img: bytes, name: str) -> tuple[Repository, object]:
    repo = Repository.init(f"memory://{name}-{os.urandom(4).hex()}", pack_target=64 * 1024)
    disk = DiskIdentity("p", len(img), CS)
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    for i in range(disk.chunk_count):
        w.put(i, img[i * CS:(i + 1) * CS])
    return repo, w.commit({})


@pytest.mark.parametrize("digest", [True, False])
@pytest.mark.parametrize("tail", [0, 1000])
def test_many_small_batches_reuse_buffers(monkeypatch: pytest.MonkeyPatch, tmp_path, tail: int,  # type: ignore[no-untyped-def]
                                          digest: bool) -> None:
    # 3 chunks per batch and 8 buffers: each buffer is reused about 8 times over 200 chunks. Without the
    # digest, zero runs of a new file are not zero-filled in the buffer (they are holes): the bytes must
    # still be right.
    monkeypatch.setattr(restore_mod, "BATCH_BYTES", 3 * CS)
    img = _image(1, 200, tail)
    repo, m = _backup(img, "batches")
    out = tmp_path / "out.img"
    res = restore(repo, m, str(out), digest=digest)  # type: ignore[arg-type]
    assert out.read_bytes() == img
    assert res.image_digest == (blake3.blake3(img).hexdigest() if digest else None)
    assert res.bytes_written == sum(len(img[i:i + CS]) for i in range(0, len(img), CS)
                                    if img[i:i + CS] != bytes(len(img[i:i + CS])))


def test_aligned_writer_falls_back_to_buffered_on_einval(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A buffer O_DIRECT refuses (not page-aligned: a bytes object at an odd address) gets EINVAL from the
    # kernel; the writer then writes it buffered and stays buffered.
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = AlignedWriter(fd)
        if not w.enable_direct():
            pytest.skip("this file system refuses O_DIRECT altogether")
        data = b"\x01" + os.urandom(2 * ALIGN)
        w.pwrite(memoryview(data)[1:], 0)
        w.pwrite(memoryview(data)[1:ALIGN + 1], 2 * ALIGN)
        w.sync()
        w.close()
        assert not w.direct and w.direct_writes == 0 and w.buffered_writes == 2
        assert path.read_bytes() == data[1:] + data[1:ALIGN + 1]
    finally:
        os.close(fd)


def test_aligned_writer_splits_an_unaligned_tail(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = AlignedWriter(fd)
        direct = w.enable_direct()
        buf = aligned_buffer(3 * ALIGN)
        buf[:] = os.urandom(len(buf))
        w.pwrite(memoryview(buf)[:2 * ALIGN + 77], ALIGN)   # aligned part O_DIRECT, 77 bytes buffered
        w.sync()
        w.close()
        assert path.read_bytes() == bytes(ALIGN) + bytes(buf[:2 * ALIGN + 77])
        if direct:
            assert w.direct_writes == 1 and w.buffered_writes == 1
    finally:
        os.close(fd)
