"""The process keeps its native AIO contexts between users (baton.device.open_aio / AioLease): io_destroy cost
28-36 ms a backup here. A context handed back must carry nothing of its last user: its reads were waited for
(their buffers filled), a second close of the old lease leaves the new user alone, and a forked child never
uses its parent's contexts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from baton import device
from baton.device import DirectDev, open_aio

MiB = 1 << 20


@pytest.fixture
def dev(tmp_path: Path) -> DirectDev:
    p = tmp_path / "data.img"
    p.write_bytes(os.urandom(4 * MiB))
    d = DirectDev(str(p), writable=False)
    if not d.direct:
        pytest.skip("this file system refuses O_DIRECT")
    return d


@pytest.fixture(autouse=True)
def _aio() -> None:
    with device._AIO_LOCK:  # each test starts with no kept context (earlier tests' backups left some)
        for ctx in device._AIO_FREE:
            ctx.close()
        device._AIO_FREE.clear()
    lease = open_aio(8)
    if lease is None:
        pytest.skip("no native AIO here")
    lease.close()


def _read(dev: DirectDev, offset: int, length: int) -> device.DirectRead:
    r = dev.direct_read(offset, length)
    assert r is not None
    return r


def test_a_context_handed_back_is_the_next_users(dev: DirectDev) -> None:
    first = open_aio(8)
    assert first is not None
    ctx = first._held()
    first.close()
    second = open_aio(8)
    assert second is not None
    try:
        assert second._held() is ctx  # reused, not destroyed and made again
        r = _read(dev, MiB, 64 << 10)
        second.submit([("t", r)])
        [(tok, got, res)] = second.reap(1)
        assert tok == "t" and got is r and res == 64 << 10
        with open(dev.path, "rb") as f:
            f.seek(MiB)
            assert bytes(r.result(res)) == f.read(64 << 10)
    finally:
        second.close()


def test_close_waits_for_the_reads_in_flight_and_the_next_user_sees_none_of_them(dev: DirectDev) -> None:
    with open(dev.path, "rb") as f:
        want = f.read()
    lease = open_aio(64)
    assert lease is not None
    reads = [_read(dev, k * (64 << 10), 64 << 10) for k in range(32)]
    lease.submit([(k, r) for k, r in enumerate(reads)])
    lease.close()  # not reaped by the user: close waits for them
    for k, r in enumerate(reads):
        assert bytes(r.buf) == want[k * (64 << 10):(k + 1) * (64 << 10)], k
    nxt = open_aio(64)
    assert nxt is not None
    try:
        assert nxt.in_flight == 0
        r = _read(dev, 3 * MiB, 4096)
        nxt.submit([("new", r)])
        assert [tok for tok, _r, _res in nxt.reap(1)] == ["new"]
    finally:
        nxt.close()


def test_a_second_close_of_an_old_lease_leaves_the_new_user_alone(dev: DirectDev) -> None:
    old = open_aio(8)
    assert old is not None
    old.close()
    new = open_aio(8)
    assert new is not None
    try:
        r = _read(dev, 0, 4096)
        new.submit([("mine", r)])
        old.close()  # idempotent: must not reap the new user's read or hand its context back
        assert new.in_flight == 1 and not device._AIO_FREE.count(new._held())
        assert [tok for tok, _r, _res in new.reap(1)] == ["mine"]
        with pytest.raises(ValueError, match="closed"):
            old.submit([("late", _read(dev, 0, 4096))])
    finally:
        new.close()


def test_a_forked_child_makes_its_own_context(dev: DirectDev) -> None:
    lease = open_aio(8)
    assert lease is not None
    parents = lease._held()
    lease.close()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            mine = open_aio(8)
            if mine is not None and mine._held() is not parents:
                r = _read(dev, 0, 4096)
                mine.submit([("c", r)])
                code = 0 if [res for _t, _r, res in mine.reap(1)] == [4096] else 2
                mine.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert parents in device._AIO_FREE  # the parent's own stays for the parent
