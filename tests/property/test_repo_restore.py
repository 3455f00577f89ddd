"""Property: for any image (sizes not aligned to the chunk, zero runs, repeats) and any chunk size,
backup then restore gives the same bytes and the same BLAKE3 digest, encrypted or not."""

from __future__ import annotations

import os
import tempfile
import uuid

import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.repo import BackupWriter, DiskIdentity, Repository
from baton.restore import restore

pieces = st.lists(st.one_of(st.binary(min_size=1, max_size=9000),
                            st.integers(1, 20000).map(bytes),            # zero runs
                            st.just(b"R" * 4096)), max_size=12)


@settings(max_examples=30, deadline=None)
@given(parts=pieces, chunk_shift=st.integers(12, 14), encrypted=st.booleans())
def test_backup_restore_identity(parts: list[bytes], chunk_shift: int, encrypted: bool) -> None:
    img = b"".join(parts) or b"\0"
    cs = 1 << chunk_shift
    with tempfile.TemporaryDirectory(prefix="repo-eng-prop-") as tmp:
        kf = os.path.join(tmp, "key")
        repo = Repository.init(f"memory://restore-{uuid.uuid4().hex}",
                               encryption="aes-256-gcm" if encrypted else "none",
                               key_file=kf if encrypted else None, pack_target=16 * 1024)
        disk = DiskIdentity("p", len(img), cs)
        w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
        for i in range(disk.chunk_count):
            w.put(i, img[i * cs:(i + 1) * cs])
        m = w.commit({})
        out = os.path.join(tmp, "out.img")
        res = restore(repo, m, out, digest=True)
        with open(out, "rb") as f:
            assert f.read() == img
        assert res.image_digest == blake3.blake3(img).hexdigest()
