"""Baton's NBD server against real NBD clients: qemu-img, qemu-io, nbdcopy, nbdinfo and fio's nbd engine.

The server runs in this process over the file-backed fake tracker; the clients are the Debian tools
(qemu-utils, libnbd-bin, fio). Each test is skipped with a reason when its tool is missing.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.frontends.nbd import NBDServer
from baton.testing.fake_tracker import FakeTracker
from conftest import need_tool

pytestmark = pytest.mark.integration

SIZE = 32 << 20
CHUNK = 64 << 10
TOOL_TIMEOUT = 120


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[FakeTracker]:
    t = FakeTracker(tmp_path / "backing.img", SIZE, chunk_size=CHUNK)
    yield t
    t.close()


@pytest.fixture
def server(tracker: FakeTracker, tmp_path: Path) -> Iterator[NBDServer]:
    s = NBDServer(tracker, "disk1", unix_path=tmp_path / "disk1.sock", description="baton test export")
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=30)


def uri(server: NBDServer, name: str = "disk1") -> str:
    return f"nbd+unix:///{name}?socket={server.unix_path}"


def run(*cmd: str, cwd: Path | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, cwd=cwd)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def random_image(path: Path, seed: int, size: int = SIZE) -> bytes:
    """Random data in about half of the chunks, zeroes elsewhere (so sparse-aware copies get exercised)."""
    print(f"random_image seed={seed}")
    rng = random.Random(seed)
    buf = bytearray(size)
    for c in range(size // CHUNK):
        if rng.random() < 0.5:
            buf[c * CHUNK : (c + 1) * CHUNK] = rng.randbytes(CHUNK)
    path.write_bytes(buf)
    return bytes(buf)


def nonzero_chunks(data: bytes) -> set[int]:
    zero = bytes(CHUNK)
    return {c for c in range(len(data) // CHUNK) if data[c * CHUNK : (c + 1) * CHUNK] != zero}


def test_qemu_img_info(server: NBDServer) -> None:
    need_tool("qemu-img")
    info = json.loads(run("qemu-img", "info", "--output=json", uri(server)))
    assert info["virtual-size"] == SIZE and info["format"] == "raw"


def test_qemu_img_convert_in_and_out(server: NBDServer, tracker: FakeTracker, tmp_path: Path) -> None:
    need_tool("qemu-img")
    src = random_image(tmp_path / "src.img", seed=3101)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(tmp_path / "src.img"), uri(server))
    assert tracker.path.read_bytes() == src
    assert nonzero_chunks(src) <= set(tracker.dirty_chunks())  # every chunk with data was marked
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(server), str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == src


def test_qemu_io_patterns_fua_flush(server: NBDServer, tracker: FakeTracker) -> None:
    need_tool("qemu-io")
    out = run(
        "qemu-io", "-f", "raw", "-t", "writeback",  # writeback: only "write -f" carries FUA
        "-c", "write -P 0xab 0 64k",
        "-c", "write -f -P 0xcd 64k 4k",
        "-c", "flush",
        "-c", "read -P 0xab 0 64k",
        "-c", "read -P 0xcd 64k 4k",
        uri(server),
    )  # fmt: skip
    assert "Pattern verification failed" not in out
    st = tracker.statistics()
    assert st["writes"] == 2 and st["fua_writes"] == 1 and st["flushes"] >= 1
    assert tracker.dirty_chunks() == [0, 1]
    data = tracker.path.read_bytes()
    assert data[: 64 << 10] == b"\xab" * (64 << 10) and data[64 << 10 : 68 << 10] == b"\xcd" * 4096


def test_nbdcopy_both_directions(server: NBDServer, tracker: FakeTracker, tmp_path: Path) -> None:
    need_tool("nbdcopy")
    src = random_image(tmp_path / "src.img", seed=3102)
    run("nbdcopy", "--flush", str(tmp_path / "src.img"), uri(server))  # multi-conn: 4 connections
    assert tracker.path.read_bytes() == src
    run("nbdcopy", uri(server), str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == src
    assert server.statistics()["connections_total"] >= 2


def test_nbdinfo_list(server: NBDServer) -> None:
    need_tool("nbdinfo")
    info = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={server.unix_path}"))
    (export,) = info["exports"]
    assert export["export-name"] == "disk1"
    assert export["export-size"] == SIZE
    assert set(export["contexts"]) == {"base:allocation", "baton:dirty"}
    assert export["can_multi_conn"] is True and export["can_fua"] is True


def test_nbdinfo_map_dirty_shows_exactly_the_written_chunks(server: NBDServer, tracker: FakeTracker) -> None:
    need_tool("nbdinfo", "qemu-io")
    run("qemu-io", "-f", "raw", "-c", f"write -P 1 0 {CHUNK}", uri(server))  # some earlier history ...
    tracker.clear_dirty()  # ... that a backup has since committed
    writes = [(5 * CHUNK + 100, 1), (17 * CHUNK - 100, 200), (40 * CHUNK, 3 * CHUNK)]
    expect = {5, 16, 17, 40, 41, 42}
    run("qemu-io", "-f", "raw", *(a for off, n in writes for a in ("-c", f"write -P 7 {off} {n}")), uri(server))
    extents = json.loads(run("nbdinfo", "--map=baton:dirty", "--json", uri(server)))
    pos, dirty = 0, set()
    for e in extents:
        assert e["offset"] == pos
        if e["type"] & 1:
            dirty |= set(range(e["offset"] // CHUNK, (e["offset"] + e["length"]) // CHUNK))
        pos += e["length"]
    assert pos == SIZE
    assert dirty == expect
    alloc = json.loads(run("nbdinfo", "--map", "--json", uri(server)))
    assert [(e["offset"], e["length"], e["type"]) for e in alloc] == [(0, SIZE, 0)]


def test_fio_nbd_engine_verify(server: NBDServer, tracker: FakeTracker, tmp_path: Path) -> None:
    need_tool("fio")
    out = run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={server.unix_path}",
        "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=16", "--randseed=3103",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
        "--output-format=json", cwd=tmp_path,  # fio drops state files into its working directory
    )  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 << 20 and job["read"]["io_bytes"] == 8 << 20  # verify read it back
    assert tracker.statistics()["dirty_chunks"] == (8 << 20) // CHUNK


def test_tcp_on_loopback_when_asked(tracker: FakeTracker) -> None:
    need_tool("nbdinfo", "qemu-io")
    with NBDServer(tracker, "disk1", tcp=("127.0.0.1", 0)) as s:
        assert s.tcp_address is not None and s.unix_path is None
        host, port = s.tcp_address
        url = f"nbd://{host}:{port}/disk1"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 128k 4k", "-c", "read -P 0x5a 128k 4k", url)
        info = json.loads(run("nbdinfo", "--json", url))
        assert info["exports"][0]["export-size"] == SIZE
    assert tracker.dirty_chunks() == [2]
