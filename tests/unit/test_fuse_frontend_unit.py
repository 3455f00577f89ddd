"""FUSE frontend pieces that need no root and no mount: request handlers over a fake tracker, the state file,
mountinfo parsing, the busy report, and the FakeTracker test double itself."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from baton.errors import DeviceError, Fenced, UsageError
from baton.frontends import FailureKind, loopdev
from baton.frontends.fuse import FuseFrontend, State, fuse_conn_id, load_state, process_start_time
from baton.testing.fake_tracker import FakeTracker

MiB = 1 << 20


class Recorder(FakeTracker):
    """FakeTracker that also logs the calls the frontend makes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 4 * MiB, 64 * 1024)
        self.calls: list[tuple[object, ...]] = []

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False) -> None:
        self.calls.append(("write_zeroes", offset, length, may_trim))
        super().write_zeroes(offset, length, may_trim)

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))
        super().discard(offset, length)


@pytest.fixture
def fe(tmp_path: Path) -> FuseFrontend:
    return FuseFrontend(Recorder(tmp_path / "b.img"), "u", tmp_path / "run", tmp_path / "dev")


def test_write_read_fsync_go_to_the_tracker(fe: FuseFrontend) -> None:
    t = fe.tracker
    assert isinstance(t, FakeTracker)
    assert fe._write(65536 * 3 + 100, b"abc") == 3
    assert fe._read(65536 * 3 + 100, 3) == b"abc"
    assert fe._read(4 * MiB - 2, 100) == b"\0\0"  # clamped at the end of the device
    assert fe._read(4 * MiB, 10) == b""
    assert fe._fsync() == 0
    s = fe.statistics()
    assert (s["writes"], s["reads"], s["fsyncs"], s["bytes_written"]) == (1, 2, 1, 3)
    assert t.statistics()["flushes"] == 1
    assert t.dirty_chunks() == [3]


def test_write_beyond_end_is_refused_without_touching_the_tracker(fe: FuseFrontend) -> None:
    with pytest.raises(OSError) as ei:
        fe._write(4 * MiB - 1, b"ab")
    assert ei.value.errno == errno.ENOSPC
    assert fe.tracker.statistics()["writes"] == 0


def test_fallocate_modes_map_to_write_zeroes(fe: FuseFrontend) -> None:
    t = fe.tracker
    assert isinstance(t, Recorder)
    fe._fallocate(0x02 | 0x01, 0, 131072)  # PUNCH_HOLE | KEEP_SIZE: discard, or zeroes that may unmap
    fe._fallocate(0x10 | 0x01, 262144, 4096)  # ZERO_RANGE | KEEP_SIZE: zeroes, no unmap
    fe._fallocate(0x01, 0, 4096)  # plain preallocation: content unchanged, nothing to track
    assert t.calls == [("write_zeroes", 0, 131072, True), ("write_zeroes", 262144, 4096, False)]
    assert t.dirty_chunks() == [0, 1, 4]
    with pytest.raises(OSError) as ei:
        fe._fallocate(0x08, 0, 65536)  # COLLAPSE_RANGE
    assert ei.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as ei:
        fe._fallocate(0x02 | 0x01, 4 * MiB - 4096, 8192)
    assert ei.value.errno == errno.EINVAL


def test_tracker_error_is_eio_for_that_request_only(fe: FuseFrontend) -> None:
    t = fe.tracker
    assert isinstance(t, FakeTracker)
    t.fail("write", OSError(errno.EIO, "injected failure in write"))
    with pytest.raises(OSError) as ei:
        fe._write(0, b"x" * 512)
    assert ei.value.errno == errno.EIO
    fe._write(0, b"y" * 512)  # the next request is served again
    s = fe.statistics()
    assert (s["errors"], s["writes"], s["fenced"]) == (1, 1, 0)
    assert not fe.wait(0)


def test_fenced_is_eio_and_stops_the_frontend(tmp_path: Path) -> None:
    t = FakeTracker(tmp_path / "b.img", 4 * MiB, fence_after_writes=2)
    fe = FuseFrontend(t, "f", tmp_path / "run", tmp_path / "dev")
    fe._write(0, b"a" * 512)
    fe._write(512, b"a" * 512)
    with pytest.raises(OSError) as ei:
        fe._write(1024, b"a" * 512)
    assert ei.value.errno == errno.EIO
    assert fe.wait(5) and fe.failure is not None and fe.failure.kind is FailureKind.FENCED
    assert isinstance(fe.failure.error(), Fenced) and "fenced" in str(fe.failure)
    # Every later request fails without reaching the tracker (never retried).
    calls = t.statistics()["reads"] + t.statistics()["errors"]
    with pytest.raises(OSError):
        fe._read(0, 512)
    assert t.statistics()["reads"] + t.statistics()["errors"] == calls
    assert fe.statistics()["fenced"] == 1
    fe.stop()  # idempotent after a fence


def test_constructor_checks_name_and_size(tmp_path: Path) -> None:
    t = FakeTracker(tmp_path / "b.img", 4 * MiB)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(UsageError):
            FuseFrontend(t, bad, tmp_path, tmp_path)
    odd = FakeTracker(tmp_path / "c.img", 4 * MiB + 100)
    with pytest.raises(DeviceError, match="multiple of 512"):
        FuseFrontend(odd, "ok", tmp_path, tmp_path)


def test_state_roundtrip_and_bad_state(tmp_path: Path) -> None:
    st = State(name="d", frontend="fuse", pid=1, pid_start=2, pid_ns="pid:[1]", loop="/dev/loop3", loop_diskseq=9,
               link="/dev/baton/d", mountpoint="/run/baton/d/fuse", fuse_dev=(0, 51), fuse_ino=2, fuse_conn=51,
               size=4096, started_at=1.5)
    p = tmp_path / "state.json"
    p.write_text(st.to_json())
    assert load_state(p) == st
    assert load_state(tmp_path / "missing.json") is None
    p.write_text("{not json")
    with pytest.raises(DeviceError, match="not a valid Baton state file"):
        load_state(p)


def test_process_start_time_and_conn_id() -> None:
    assert process_start_time(os.getpid()) is not None
    assert process_start_time(2**22 + 12345) is None  # above pid_max
    assert fuse_conn_id(os.makedev(0, 51)) == 51
    assert fuse_conn_id(os.makedev(1, 2)) == (1 << 20) | 2


def test_parse_mountinfo_unescapes_and_skips_garbage() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt\\040with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "garbage line\n"
        "40 36 0:51 / /run/baton/d/fuse rw,nosuid,nodev shared:5 - fuse.baton baton:d rw,user_id=0\n"
    )
    es = loopdev.parse_mountinfo(text)
    assert [(e.dev, e.mountpoint, e.fstype, e.source) for e in es] == [
        ((98, 0), "/mnt with space", "ext3", "/dev/root"),
        ((0, 51), "/run/baton/d/fuse", "fuse.baton", "baton:d"),
    ]


def test_users_describe_names_who() -> None:
    u = loopdev.Users("/dev/loop7", mounts=[loopdev.MountUse("/srv", os.getpid()),
                                            loopdev.MountUse("/data", 4242)], openers=[os.getpid()])
    d = u.describe()
    assert u.busy
    assert "mounted at /srv," in d and "mounted at /data (mount namespace of pid 4242)" in d
    assert f"opened by pid {os.getpid()}" in d
    assert not loopdev.Users("/dev/loop7").busy


def test_fake_tracker_extents_and_marks(tmp_path: Path) -> None:
    t = FakeTracker(tmp_path / "b.img", 1 * MiB, chunk_size=4096)
    t.write(4096, b"z" * 8192)
    t.write(4096, b"z" * 10)  # same chunk again: no new mark
    t.discard(65536, 4096)
    assert t.statistics()["first_touch_marks"] == 3
    assert t.dirty_extents(0, 81920) == [(0, 4096, False), (4096, 8192, True), (12288, 53248, False),
                                         (65536, 4096, True), (69632, 12288, False)]
    assert t.read(65536, 4) == b"\0\0\0\0"
    t2 = FakeTracker(tmp_path / "c.img", 1 * MiB, fence_after_writes=0)
    with pytest.raises(Fenced):
        t2.write(0, b"a")


_LOAD = ("import os; from baton.frontends.fuse import load_mfusepy\n"
         "from baton.errors import DeviceError\n"
         "try:\n    m = load_mfusepy(); print(m.fuse_version_major, 'FUSE_LIBRARY_PATH' in os.environ)\n"
         "except DeviceError as e:\n    print('refused', e)\n")


def _load_in_subprocess(env_extra: dict[str, str]) -> str:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSE_LIBRARY")}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, env=env, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_load_mfusepy_binds_libfuse3_without_leaking_the_variable() -> None:
    import ctypes.util

    if ctypes.util.find_library("fuse3") is None:
        pytest.skip("needs libfuse3")
    assert _load_in_subprocess({}) == "3 False"


def test_load_mfusepy_refuses_libfuse2() -> None:
    import ctypes.util

    lib2 = ctypes.util.find_library("fuse")
    if lib2 is None:
        pytest.skip("needs libfuse2 installed to check the refusal")
    out = _load_in_subprocess({"FUSE_LIBRARY_PATH": lib2})
    assert out.startswith("refused") and "libfuse 2.x" in out, out


def test_operations_refuse_truncation_and_resizing(fe: FuseFrontend) -> None:
    import ctypes.util

    from baton.frontends.fuse import _make_operations, load_mfusepy

    if ctypes.util.find_library("fuse3") is None:
        pytest.skip("needs libfuse3")
    ops = _make_operations(load_mfusepy(), fe)
    with pytest.raises(OSError) as ei:
        ops.open("/disk", os.O_WRONLY | os.O_TRUNC)
    assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        ops.truncate("/disk", 0)
    assert ei.value.errno == errno.EPERM
    assert ops.truncate("/disk", 4 * MiB) == 0
    assert ops.getattr("/disk")["st_size"] == 4 * MiB
    with pytest.raises(OSError) as ei:
        ops.getattr("/other")
    assert ei.value.errno == errno.ENOENT
    assert ops.readdir("/", 0) == [".", "..", "disk"]
    assert fe.tracker.statistics()["writes"] == 0
