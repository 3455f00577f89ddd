"""Multi-guest failover scenarios for the VM tier: a seeded writer that runs in a guest, the host's shadow of
what the disk must hold, and host-side checks (disk against shadow, restore against shadow).

The writer (:data:`WRITER`, run in a guest with the checkout's Python) writes whole chunks of seeded data,
through a block device with O_DIRECT (``dev``: /dev/baton/NAME of the dm or fuse frontend) or through an NBD
export's unix socket (``nbd``), and syncs every ``sync_every`` writes (fdatasync, or NBD_CMD_FLUSH). It logs
to a file in the cluster's share: ``W i chunk`` before write ``i`` is issued, ``A i`` once a sync after it
returned (acknowledged: it must survive a power loss and be in the next backup), ``E i message`` when a
write or a sync failed (then it stops). The content of write ``i`` of tag ``T`` is
:func:`chunk_data` (``T``, ``i``), so the host rebuilds what was written from the log alone.

:class:`Shadow` is the data area as the acknowledged writes left it: acknowledged writes are applied in order;
a write issued but not acknowledged (the guest was killed, or fenced) is uncertain, and the disk may hold
either version of its chunk: :meth:`Shadow.settle` checks that it holds one of them and adopts it.

The host reads the shared disk image itself (O_DIRECT: the guests write it with ``cache=none``) and restores
snapshots with this checkout's ``baton restore`` from the repository in the share: no guest time is spent on
either.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm.harness import VENV_BIN, Guest, Job, VmCluster

CHUNK = 64 << 10
SEED = int(os.environ.get("BATON_SEED", "20261124"))

WRITER = r'''
import mmap, os, random, socket, struct, sys, time
mode, target, tag, lo, hi, count, log, sync_every, pause = sys.argv[1:10]
lo, hi, count, sync_every, pause = int(lo), int(hi), int(count), int(sync_every), float(pause)
CHUNK = 65536
pick = random.Random(f"{tag}/chunks")
logf = open(log, "a")
stop = log + ".stop"

def note(line):
    logf.write(line + "\n")
    logf.flush()

if mode == "dev":
    fd = os.open(target, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CHUNK)
    def write(off, data):
        buf[:] = data
        if os.pwrite(fd, buf, off) != CHUNK:
            raise OSError(5, "short write")
    def sync():
        os.fdatasync(fd)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(target)
    def recv(n):
        b = b""
        while len(b) < n:
            m = s.recv(n - len(b))
            if not m:
                raise OSError(107, "the NBD server closed the connection")
            b += m
        return b
    magic, opt, hflags = struct.unpack(">QQH", recv(18))
    assert magic == 0x4E42444D41474943 and opt == 0x49484156454F5054
    s.sendall(struct.pack(">I", 3 if hflags & 2 else 1))
    data = struct.pack(">I", 0) + struct.pack(">H", 0)  # NBD_OPT_GO, the default export, no info requests
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    while True:
        _, _, rtype, rlen = struct.unpack(">QIII", recv(20))
        recv(rlen)
        if rtype & (1 << 31):
            sys.exit("NBD_OPT_GO refused")
        if rtype == 1:
            break
    cookie = [0]
    def request(cmd, off, data):
        cookie[0] += 1
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie[0], off, len(data)) + data)
        magic, err, ck = struct.unpack(">IIQ", recv(16))
        if magic != 0x67446698 or ck != cookie[0]:
            raise OSError(71, "NBD protocol error")
        if err:
            raise OSError(err, os.strerror(err))
    def write(off, data):
        request(1, off, data)
    def sync():
        request(3, 0, b"")

pending = []
i = 0
try:
    while i != count and not (count < 0 and os.path.exists(stop)):
        c = pick.randrange(lo, hi)
        note(f"W {i} {c}")
        write(c * CHUNK, random.Random(f"{tag}/{i}").randbytes(CHUNK))
        pending.append(i)
        i += 1
        if len(pending) >= sync_every or i == count:
            sync()
            note("".join(f"A {j}\n" for j in pending).rstrip("\n"))
            pending = []
        if pause:
            time.sleep(pause)
    if pending:
        sync()
        note("".join(f"A {j}\n" for j in pending).rstrip("\n"))
except OSError as e:
    note(f"E {i} {e.strerror or e}")
    print(f"write or sync after write {i} failed: {e.strerror or e}", flush=True)
    sys.exit(3)
print(f"{i} writes acknowledged", flush=True)
'''


def chunk_data(tag: str, i: int) -> bytes:
    """The content of write ``i`` of the writer tagged ``tag`` (the same function the guest runs)."""
    return random.Random(f"{tag}/{i}").randbytes(CHUNK)


@dataclass
class Batch:
    """What a writer's log says: writes acknowledged (index, chunk), issued but unacknowledged, and the
    failure that stopped it (None if it ended normally or is still running)."""

    tag: str
    acked: list[tuple[int, int]] = field(default_factory=list)
    uncertain: list[tuple[int, int]] = field(default_factory=list)
    failed: str | None = None

    @property
    def chunks(self) -> set[int]:
        return {c for _, c in self.acked}

    @classmethod
    def read(cls, tag: str, log: Path) -> Batch:
        issued: dict[int, int] = {}
        acked: set[int] = set()
        failed = None
        with contextlib.suppress(FileNotFoundError):
            for line in log.read_text().splitlines():
                f = line.split(" ", 2)
                if f[0] == "W" and len(f) == 3:
                    issued[int(f[1])] = int(f[2])
                elif f[0] == "A" and len(f) == 2:
                    acked.add(int(f[1]))
                elif f[0] == "E":
                    failed = line
        return cls(tag, [(i, issued[i]) for i in sorted(acked)],
                   [(i, c) for i, c in sorted(issued.items()) if i not in acked], failed)


class Shadow:
    """The data area as every acknowledged write left it (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray(size)
        self.last: dict[int, str] = {}  # chunk -> who wrote it last (diagnostics)

    def apply(self, b: Batch) -> None:
        for i, c in b.acked:
            self.buf[c * CHUNK:(c + 1) * CHUNK] = chunk_data(b.tag, i)
            self.last[c] = f"{b.tag}#{i}"

    def settle(self, b: Batch, disk: bytes) -> None:
        """After a writer stopped without acknowledging ``b.uncertain``: the disk holds, for each of those
        chunks, either the shadow's content or one of the uncertain versions; adopt the disk's."""
        versions: dict[int, list[tuple[int, bytes]]] = {}
        for i, c in b.uncertain:
            versions.setdefault(c, []).append((i, chunk_data(b.tag, i)))
        for c, vs in versions.items():
            got = disk[c * CHUNK:(c + 1) * CHUNK]
            if got == self.buf[c * CHUNK:(c + 1) * CHUNK]:
                continue
            for i, v in vs:
                if got == v:
                    self.buf[c * CHUNK:(c + 1) * CHUNK] = v
                    self.last[c] = f"{b.tag}#{i} (unacknowledged, on disk)"
                    break
            else:
                raise AssertionError(f"chunk {c} on disk is neither its acknowledged content ({self.last.get(c)}) "
                                     f"nor any unacknowledged write of {b.tag}: {[i for i, _ in vs]}")

    def diff(self, image: bytes | mmap.mmap, what: str) -> list[str]:
        """Chunks where ``image`` differs from the shadow, described (empty: identical)."""
        out = []
        if len(image) != self.size:
            out.append(f"{what}: {len(image)} bytes, expected {self.size}")
        view = memoryview(self.buf)
        for c in range(min(len(image), self.size) // CHUNK):
            if image[c * CHUNK:(c + 1) * CHUNK] != view[c * CHUNK:(c + 1) * CHUNK]:
                got = image[c * CHUNK:(c + 1) * CHUNK]
                kind = "zeros" if got == bytes(CHUNK) else "other data"
                out.append(f"{what}: chunk {c} differs (holds {kind}; expected {self.last.get(c, 'zeros')})")
        return out


def read_direct(path: Path, size: int, offset: int = 0) -> bytes:
    """``size`` bytes of ``path`` from ``offset`` with O_DIRECT (the guests write the image with cache=none)."""
    out = bytearray()
    step = 8 << 20
    buf = mmap.mmap(-1, step)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        pos = offset
        while len(out) < size:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                raise OSError(f"{path}: short read at {pos}")
            take = min(n, size - len(out))
            out += buf[:take]
            pos += n
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


class Scenario:
    """One cluster's shared state across the failover tests: the shadow, the repository (in the share), who
    attached the disk last with which frontend, and the host-side checks."""

    NAME = "d"

    def __init__(self, cluster: VmCluster) -> None:
        self.c = cluster
        self.repo_host = cluster.share / "repo"
        self.repo = cluster.guest_path(cluster.share) + "/repo"
        (cluster.share / "writer.py").write_text(WRITER)
        self.writer = cluster.guest_path(cluster.share / "writer.py")
        self.logs = cluster.share / "logs"
        self.logs.mkdir(exist_ok=True)
        self.data_size = 0
        self.shadow = Shadow(0)
        self.owner: str | None = None
        self.frontend: str | None = None
        self.ok = False  # the previous test ended with the state it promised
        self._seq = 0
        self.timings: dict[str, float] = {}

    # -- the disk -------------------------------------------------------------------------------------------

    def data_size_of_record(self) -> int:
        """The tracked data area's size, read from the record on the host (read-only)."""
        from baton.record.placement import locate

        loc = locate(str(self.c.disk), writable=False)
        try:
            return int(loc.data_size)
        finally:
            loc.close()

    def era_extents(self) -> list[tuple[int, int]]:
        """Where the era metadata region is in the disk image: (offset, length) pieces."""
        from baton.record.placement import locate

        loc = locate(str(self.c.disk), writable=False)
        try:
            region = loc.record.era_region()
            assert region is not None, "this record has no era region"
            return list(region.extents)
        finally:
            loc.close()

    def watch_epoch(self) -> EpochWatch:
        """Start polling the record header's epoch on the host (see :class:`EpochWatch`)."""
        return EpochWatch(self.c.disk)

    def disk(self) -> bytes:
        return read_direct(self.c.disk, self.data_size)

    def check_disk(self, *settle: Batch) -> None:
        """The disk holds every acknowledged write (unacknowledged ones of ``settle``: either version)."""
        img = self.disk()
        for b in settle:
            self.shadow.settle(b, img)
        bad = self.shadow.diff(img, "disk")
        assert not bad, "\n".join(bad[:20])

    # -- writers --------------------------------------------------------------------------------------------

    def tag(self, label: str) -> str:
        self._seq += 1
        return f"{SEED}-{self._seq:02d}-" + "".join(ch if ch.isalnum() else "-" for ch in label)

    def writer_cmd(self, tag: str, *, count: int, target: str | None = None, mode: str = "dev", lo: int = 0,
                   hi: int | None = None, sync_every: int = 8, pause: float = 0.0) -> str:
        hi = hi if hi is not None else self.data_size // CHUNK
        target = target or f"/dev/baton/{self.NAME}"
        log = self.c.guest_path(self.logs / tag)
        return (f"{VENV_BIN}/python {self.writer} {mode} {target} {tag} {lo} {hi} {count} {log} {sync_every} "
                f"{pause}")

    def batch(self, tag: str) -> Batch:
        return Batch.read(tag, self.logs / tag)

    def write(self, g: Guest, label: str, count: int, **kw: Any) -> Batch:
        """Run a writer in ``g`` to its end; every write must be acknowledged; the shadow follows."""
        tag = self.tag(label)
        r = g.run(self.writer_cmd(tag, count=count, **kw), timeout=300, check=False)
        b = self.batch(tag)
        assert r.rc == 0 and len(b.acked) == count and not b.failed, (r, b.failed, len(b.acked))
        self.shadow.apply(b)
        print(f"{g.name}: {label}: {count} writes ({len(b.chunks)} chunks), tag {tag}")
        return b

    def start_writer(self, g: Guest, label: str, **kw: Any) -> tuple[str, Job]:
        tag = self.tag(label)
        return tag, g.run_bg(self.writer_cmd(tag, **kw), timeout=600)

    def wait_log(self, tag: str, pred: Any, timeout: float = 120) -> Batch:
        """Poll a writer's log (on the host) until ``pred(batch)``."""
        limit = time.monotonic() + timeout
        while True:
            b = self.batch(tag)
            if pred(b):
                return b
            assert time.monotonic() < limit, f"writer {tag}: condition not reached in {timeout:.0f} s: {b}"
            time.sleep(0.05)

    # -- baton ----------------------------------------------------------------------------------------------

    def attach(self, g: Guest, frontend: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        return self.attached(self.attach_bg(g, frontend, *extra, env=env))

    def attach_bg(self, g: Guest, frontend: str, *extra: str,
                  env: dict[str, str] | None = None) -> tuple[Job, str]:
        """Start ``baton attach`` of the disk as NAME in ``g``; :meth:`attached` waits for it."""
        argv = [str(VENV_BIN / "baton"), "attach", "/dev/vda", "--name", self.NAME, "--frontend", frontend, *extra,
                "--json"]
        return g.run_bg(argv, env=env, timeout=300), frontend

    def attached(self, pending: tuple[Job, str]) -> dict[str, Any]:
        job, frontend = pending
        r = job.wait()
        g = job.guest
        try:
            st: dict[str, Any] = json.loads(r.out)
        except ValueError:
            st = {}
        assert r.rc == 0 and st.get("frontend") == frontend, f"{g.name}: attach failed ({r.rc}): {r.out}{r.err}"
        self.owner, self.frontend = g.name, frontend
        print(f"{g.name}: attached with {frontend} in {time.monotonic() - job.started:.1f} s, epoch {st['epoch']}"
              + (f"; {st['era_settled']}" if st.get("era_settled") else ""))
        return st

    def backup(self, g: Guest, *extra: str, rc: int = 0) -> dict[str, Any]:
        t = time.monotonic()
        res: dict[str, Any] = g.baton("backup", self.NAME, "--repo", self.repo, *extra, json=True, rc=rc)
        if rc == 0:
            print(f"{g.name}: backup {res['mode']} ({res.get('reason')}): {res['chunks_read']} chunks read, "
                  f"{time.monotonic() - t:.1f} s")
        return res

    def restore_matches(self, snapshot: str) -> None:
        """Restore ``snapshot`` on the host and compare it with the shadow, byte for byte."""
        out = self.c.dir / "restore.img"
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        cp = subprocess.run([str(VENV_BIN / "baton"), "restore", snapshot, "--repo", str(self.repo_host),
                             "--to", str(out), "--json"], capture_output=True, text=True, timeout=300)
        assert cp.returncode == 0, f"host restore of {snapshot} failed ({cp.returncode}): {cp.stdout}{cp.stderr}"
        res = json.loads(cp.stdout)
        try:
            with open(out, "rb") as f:
                img = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if res["disk_size"] else b""
            try:
                bad = self.shadow.diff(img, f"restore of {snapshot}")
            finally:
                if isinstance(img, mmap.mmap):
                    img.close()
        finally:
            out.unlink()
        assert not bad, "\n".join(bad[:20])
        print(f"restore of {snapshot} on the host: {res['disk_size']} bytes, identical to the shadow")

    def power_loss_during_backup(self, g: Guest, *, checkpoints: int) -> None:
        """Start ``baton backup NAME`` in ``g`` and power ``g`` off once the backup's manifest was written
        ``checkpoints`` times (its daemon should run with a small BATON_BATCH_CHUNKS); fails if the backup
        ends first."""
        before = self.snapshots()
        job = g.run_bg(f"{VENV_BIN}/baton backup {self.NAME} --repo {self.repo} --json", timeout=600)
        limit = time.monotonic() + 300
        seen: list[tuple[int, int]] = []
        while len(seen) < checkpoints:
            assert not job.done(), f"the backup ended before its checkpoint {len(seen) + 1}: {job.wait()}"
            assert time.monotonic() < limit, f"no checkpoint {len(seen) + 1} of the backup after 300 s"
            new = sorted(self.snapshots() - before)
            if new:  # the backup's manifest, rewritten at every checkpoint
                with contextlib.suppress(FileNotFoundError):
                    st = (self.repo_host / "snapshots" / new[0]).stat()
                    if not seen or seen[-1] != (st.st_mtime_ns, st.st_size):
                        seen.append((st.st_mtime_ns, st.st_size))
                        continue
            time.sleep(0.05)
        assert not job.done(), f"the backup ended before the power loss: {job.wait()}"
        g.kill()

    def snapshots(self) -> set[str]:
        d = self.repo_host / "snapshots"
        return set(os.listdir(d)) if d.is_dir() else set()


class EpochWatch:
    """Polls the record header on the shared disk image from the host (read-only, O_DIRECT, every 20 ms) and
    notes the host's monotonic time when the epoch first moves past the one it started with: when a takeover
    became durable, on the same clock as the writer logs the host polls."""

    def __init__(self, disk: Path) -> None:
        from baton.record.placement import locate

        self.loc = locate(str(disk), writable=False)
        self.first = self._read()
        self.changed_at: float | None = None
        self.epoch = self.first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> int:
        from baton.record.core import Record

        return Record.read_header(self.loc.record.area, record_offset=self.loc.header.record_offset).epoch

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(Exception):  # a header read racing its write: the next poll decides
                e = self._read()
                if e != self.first:
                    self.epoch, self.changed_at = e, time.monotonic()
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.loc.close()


def distinct(batches: Iterable[Batch]) -> set[int]:
    out: set[int] = set()
    for b in batches:
        out |= b.chunks
    return out
