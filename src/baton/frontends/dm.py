"""The dm-era frontend: /dev/baton/NAME is a device-mapper stack, and the kernel tracks every write.

The stack, built by the per-disk daemon (``baton attach DISK --frontend dm``)::

    /dev/baton/NAME -> /dev/mapper/baton-NAME        top: linear over the era device (snapshot-origin during
                                                     a backup; error once fenced)
      baton-NAME:era      era META ORIGIN CHUNK      dm-era, block size = the record's chunk size
        baton-NAME:meta   linear over the record's era region (one line per extent: a tail slice, the pinned
                          record file's extents, or a slice of the record disk's slot)
        baton-NAME:origin linear [0, data size) of the disk (an image file gets a loop device first)
      baton-NAME:snap     snapshot ERA COWLOOP N CHUNK, only during a backup (the exception store is a sparse
                          file under BATON_SPILL_DIR on a loop device, unlinked at once)

Inner devices are named ``baton-NAME:ROLE``: a NAME has no ':' (see ``check_name``), so no attachment's top
device can be another one's inner device. Every device carries the dm UUID ``BATON-<disk uuid>-<role>``, so
the kernel refuses a second stack of the same disk, and a leftover stack is recognised as this disk's.

The era metadata is folded into Baton's record (:mod:`baton.tracker.era`), at attach (it takes over a crashed
dm owner's writes), at every backup freeze, and at a clean detach. Writes never pass through this process:
a killed daemon leaves the stack serving and tracking, and the next attach on this node adopts it. The
daemon's heartbeat still fences: :meth:`DmFrontend.stop` with ``force`` swaps the top table for ``error``
(EIO within about a second of the takeover on disk) and the metadata device's too, so this node's era target
can never commit into metadata that another owner now uses. STONITH or SCSI reservations stay the primary
fence (docs/operations.md).

Point in time (:meth:`DmFrontend.freeze`, called by ``Tracker.begin_backup``): suspend the top device (never
era: a message to a suspended era device waits for its resume), fold through a metadata snapshot, load the
top as ``snapshot-origin`` of the era device, create the transient snapshot, resume. The backup reads the
snapshot device; an exception store that overflows invalidates the snapshot (the backup fails, saying so) and
never the origin (the application's writes go on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from baton.device import BlockDev, DirectDev
from baton.errors import BatonError, DeviceBusy, DeviceError, Fenced, RecordError, UsageError
from baton.frontends import loopdev
from baton.frontends.base import Endpoint, FailureKind, Frontend, FrontendConfig, FrontendFailure, ServeLock
from baton.host import HOLDER, LOOP, Use, dm
from baton.host import users as host_users
from baton.host.attachments import check_name
from baton.record.core import Record, era_unsupported_reason
from baton.record.placement import parse_size
from baton.tracker import TrackerLike
from baton.tracker.core import Tracker, spill_dir_default
from baton.tracker.era import FoldResult, fold
from baton.util import pid_alive

log = logging.getLogger(__name__)

DEFAULT_COW_FRACTION = 0.10  # exception store: 10 % of the disk (a sparse file: only copied chunks use space)
MIN_COW_CHUNKS = 64  # and at least this many chunks
META_ZERO = 64 << 10  # bytes zeroed at the start of the era region: a zero superblock is fresh metadata
WATCH_INTERVAL = 1.0  # seconds between checks that the top device still exists
PENDING_NO_DM = ("the previous owner tracked this disk with dm-era and did not detach cleanly; this node has no "
                 "dm-era to read its changes")


def default_cow_size(size: int, chunk_size: int) -> int:
    """The exception store's size when none is given: DEFAULT_COW_FRACTION of the disk, at least
    MIN_COW_CHUNKS chunks, rounded up to a whole chunk."""
    want = max(int(size * DEFAULT_COW_FRACTION), MIN_COW_CHUNKS * chunk_size)
    return -(-want // chunk_size) * chunk_size


def cow_size_bytes(spec: str | None, size: int, chunk_size: int) -> int:
    """``--cow-size``: a size (``512M``, ``2G``) or a share of the disk (``15%``), rounded up to whole chunks;
    the default (None or empty) is :func:`default_cow_size`."""
    if not spec:
        return default_cow_size(size, chunk_size)
    text = spec.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise UsageError(f"--cow-size {spec!r}: a percentage must be in (0, 100]")
        want = int(size * pct / 100)
    else:
        want = parse_size(text)
    if want < chunk_size:
        raise UsageError(f"--cow-size {spec!r}: the exception store needs at least one chunk ({chunk_size} bytes)")
    return -(-want // chunk_size) * chunk_size


def _devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@dataclass(frozen=True)
class Names:
    """The device-mapper names of one stack (``base`` is ``baton-NAME``)."""

    base: str

    @property
    def top(self) -> str:
        return self.base

    def role(self, role: str) -> str:
        return f"{self.base}:{role}"

    @property
    def era(self) -> str:
        return self.role("era")

    @property
    def meta(self) -> str:
        return self.role("meta")

    @property
    def origin(self) -> str:
        return self.role("origin")

    @property
    def snap(self) -> str:
        return self.role("snap")

    def all(self) -> list[str]:
        """Every device name, in tear-down order (users before what they use)."""
        return [self.top, self.snap, self.era, self.meta, self.origin]

    def ours(self, name: str) -> bool:
        return name == self.top or name.startswith(f"{self.base}:")

    @classmethod
    def of(cls, name: str) -> Names:
        check_name(name)
        return cls(f"baton-{name}")


# ---- the stack --------------------------------------------------------------------------------------------


def detach_loops(recorded: list[dict[str, Any]]) -> list[str]:
    """Detach recorded loop devices, each only while it is still the recorded attachment (same disk sequence
    number) and nothing is stacked on it."""
    done: list[str] = []
    for lo in recorded:
        dev = str(lo.get("device", ""))
        li = loopdev.info(dev)
        if li is None or li.diskseq != lo.get("diskseq"):
            continue
        try:
            held = os.listdir(f"/sys/block/{Path(dev).name}/holders")
        except OSError:
            held = []
        if held:
            log.warning("%s is still held by %s; left attached", dev, ", ".join(held))
            continue
        loopdev.detach(dev)
        done.append(f"detached {dev}")
    return done


class Stack:
    """The devices of one era stack over ``disk`` for ``record``: loop devices for image files, the metadata
    and origin slices, the era target, and (owned by :class:`DmFrontend`) the top and snapshot devices.

    ``loops`` and ``cow`` are what a later process needs to clean up (written to dm.json by the frontend)."""

    def __init__(self, names: Names, record: Record, disk: str, size: int) -> None:
        self.names = names
        self.record = record
        self.disk = disk
        self.size = size
        self.nsect = dm.sectors(size, "the data area")
        self.chunk_sectors = record.header.chunk_size // dm.SECTOR
        self.uuid = f"BATON-{record.header.disk_uuid}"
        self.loops: list[dict[str, Any]] = []  # {"device", "file", "dev", "ino", "diskseq"}
        self.cow: dict[str, Any] | None = None  # the exception store's loop device while a backup runs
        self.devno: dict[str, str] = {}  # role -> MAJ:MIN of the devices built or adopted
        self.created: list[str] = []  # devices this process created, in order

    # -- block devices for files ---------------------------------------------------------------------------

    def block(self, path: str, *, attach: bool = True) -> str:
        """MAJ:MIN of a block device for ``path``: itself, or a loop device over an image file (attached now
        unless one of ``loops`` already serves that file; DeviceError without ``attach``)."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise DeviceError(f"{path}: {e.strerror}") from e
        if stat.S_ISBLK(st.st_mode):
            return _devno(st.st_rdev)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceError(f"{path} is neither a block device nor an image file")
        for lo in self.loops:
            if (lo["dev"], lo["ino"]) == (st.st_dev, st.st_ino):
                return str(lo["devno"])
        if not attach:
            raise DeviceError(f"no loop device of this stack serves {path}")
        try:
            dev = loopdev.attach(Path(path), direct_io=True)
        except DeviceError as e:  # e.g. tmpfs refuses O_DIRECT: a buffered loop still keeps every flush
            log.warning("%s: no direct I/O (%s); using a buffered loop device", path, e)
            dev = loopdev.attach(Path(path), direct_io=False)
        li = loopdev.info(dev)
        rdev = os.stat(dev).st_rdev
        self.loops.append({"device": dev, "file": os.path.realpath(path), "dev": st.st_dev, "ino": st.st_ino,
                           "diskseq": li.diskseq if li else 0, "devno": _devno(rdev)})
        return _devno(rdev)

    def adopt_loops(self, recorded: list[dict[str, Any]]) -> bool:
        """Take over the loop devices a dead process recorded, if each is still that attachment."""
        for lo in recorded:
            li = loopdev.info(str(lo.get("device", "")))
            if li is None or li.diskseq != lo.get("diskseq"):
                return False
        self.loops = [dict(lo) for lo in recorded]
        return True

    def detach_loops(self) -> list[str]:
        """Detach this stack's loop devices (see :func:`detach_loops`)."""
        done = detach_loops(self.loops)
        self.loops = []
        return done

    # -- the era target ------------------------------------------------------------------------------------

    def expected(self, *, attach: bool = True) -> dict[str, str]:
        """The tables of meta and origin as this stack builds them (``attach``: loop devices as needed)."""
        region = self.record.era_region()
        assert region is not None
        meta = dm.linear_table(self.block(region.device, attach=attach), region.extents)
        origin = dm.linear_table(self.block(self.disk, attach=attach), [(0, self.size)])
        return {"meta": meta, "origin": origin}

    def create(self, role: str, table: str, **kw: Any) -> str:
        name = self.names.role(role) if role != "top" else self.names.top
        devno = dm.create(name, table, uuid=f"{self.uuid}-{role}", **kw)
        self.created.append(name)
        self.devno[role] = devno
        return devno

    def load_era(self) -> dm.EraTarget:
        """Create meta, origin and era. Metadata the kernel refuses makes the next backup full with the reason
        (distrust), is zeroed and loaded fresh (era_folded 0)."""
        tables = self.expected()
        self.create("meta", tables["meta"])
        self.create("origin", tables["origin"])
        era_table = dm.era_table(self.devno["meta"], self.devno["origin"], self.nsect, self.chunk_sectors)
        klog = dm.KernelLog()
        try:
            self.create("era", era_table)
        except DeviceError as e:
            if "busy" in str(e).lower():
                raise
            self._remove_quietly(self.names.era)
            if self.names.era in self.created:
                self.created.remove(self.names.era)
            said = klog.lines("era:")
            log.error("%s: the kernel refused the era metadata (%s; %s); loading fresh metadata", self.names.era,
                      e, "; ".join(said) or "the kernel log says nothing")
            why = said[0].removeprefix("era: ") if said else str(e)
            self.record.distrust(f"era metadata failed its check: {why}")
            self.zero_metadata()
            try:
                self.create("era", era_table)
            except DeviceError as e2:
                raise DeviceError(f"the kernel refused even fresh era metadata for {self.disk}: {e2}",
                                  hint="see the kernel log (dmesg); attach with --frontend fuse meanwhile") from e2
            self.record.set_era_folded(0, pending=True)
        finally:
            klog.close()
        return dm.EraTarget(self.names.era, dm.path(self.names.meta))

    def zero_metadata(self) -> None:
        dev = DirectDev(dm.path(self.names.meta), writable=True)
        try:
            dev.pwrite(0, bytes(min(META_ZERO, dev.size)))
            dev.sync()
        finally:
            dev.close()

    def _remove_quietly(self, name: str) -> None:
        with contextlib.suppress(DeviceError):
            if dm.info(name) is not None:
                dm.remove(name)

    def remove_era(self, *, stale: bool) -> list[str]:
        """Remove era, meta and origin (not the top, not the snapshot). ``stale``: the era target may hold
        in-core state that no longer matches the metadata (fenced, or a dead process's stack): the metadata
        device is switched to ``error`` first, so tearing era down can commit nothing. Raises the first removal
        that failed (DeviceError) after trying every device."""
        n = self.names
        done = error_out_metadata(n) if stale else []
        first: DeviceError | None = None
        for name in (n.era, n.meta, n.origin):
            try:
                if dm.info(name) is not None:
                    dm.remove(name)
                    done.append(f"removed {dm.path(name)}")
            except DeviceError as e:
                first = first or e
        if first is not None:
            raise first
        return done


def error_out_metadata(names: Names) -> list[str]:
    """Switch the metadata device of ``names`` to ``error``: the era target above it can no longer commit
    (a removal's archive, a write's mark) into metadata that may belong to another owner now."""
    if dm.info(names.meta) is None:
        return []
    dm.load(names.meta, dm.error_table(dm.table_sectors(dm.table(names.meta))))
    dm.resume(names.meta, flush=False)
    return [f"{dm.path(names.meta)} switched to error (the era target commits nothing more)"]


# ---- the frontend -------------------------------------------------------------------------------------------


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(p.read_text())
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DeviceError(f"{p} is not a valid Baton dm state file: {e}",
                          hint="inspect it; remove it by hand if nothing it names exists") from e


def _write_json(p: Path, data: dict[str, Any]) -> None:
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, p)


def _busy(path: str, count: int) -> str:
    try:
        found = host_users(path)
    except OSError:
        found = []
    who = "; ".join(map(str, found)) or f"open {count} time{'s' if count != 1 else ''} (by a mount or a process)"
    return f"{path} is in use: {who}"


class DmFrontend(Frontend):
    """Serve a disk as the device-mapper stack /dev/baton/NAME (see the module docstring).

    Failures: ``FENCED`` (the record was taken over: the heartbeat's forced stop), ``DIED`` (the top device was
    removed from outside). Statistics: the top device's I/O counters (from sysfs), folds, chunks folded,
    backups frozen, the last freeze window."""

    kind = "dm"
    folds_era: ClassVar[bool] = True

    def __init__(self, tracker: Tracker, config: FrontendConfig) -> None:
        check_name(config.name)
        if not config.disk:
            raise UsageError("the dm frontend needs the data disk's path (FrontendConfig.disk)")
        self.tracker = tracker
        self.record: Record = tracker.record
        self.name = config.name
        self.names = Names.of(config.name)
        self.disk = config.disk
        self.size = tracker.size
        self.chunk_size = tracker.chunk_size
        self.cow_size = config.cow_size or default_cow_size(self.size, self.chunk_size)
        self.fence_wait = config.fence_wait
        if self.cow_size < self.chunk_size:
            raise UsageError(f"--cow-size {self.cow_size}: at least one chunk ({self.chunk_size} bytes)")
        self.state_dir = Path(config.run_dir).absolute() / config.name
        self.state_path = self.state_dir / "dm.json"
        self.link = Path(config.dev_dir).absolute() / config.name
        self.stack = Stack(self.names, self.record, self.disk, self.size)
        self.era: dm.EraTarget | None = None
        self.adopted = False
        self._ops = threading.RLock()  # one stack operation at a time: start, freeze, thaw, stop
        self._lock = threading.Lock()
        self._phase = "new"  # new -> starting -> running -> stopping -> stopped
        self._stopped = threading.Event()
        self._failure: FrontendFailure | None = None
        self._endpoint: Endpoint | None = None
        self._lock_file: ServeLock | None = None
        self._snap: DirectDev | None = None
        self._stats = {"folds": 0, "chunks_folded": 0, "backups_frozen": 0, "freeze_ms": 0, "freeze_ms_max": 0,
                       "cow_size": self.cow_size, "adopted": 0, "thaw_failures": 0}

    @classmethod
    def create(cls, tracker: TrackerLike, config: FrontendConfig) -> DmFrontend:
        if not isinstance(tracker, Tracker):
            raise UsageError("the dm frontend serves a baton.tracker.core.Tracker (it folds into its record)")
        return cls(tracker, config)

    # -- state -------------------------------------------------------------------------------------------

    def _save(self) -> None:
        h = self.record.header
        _write_json(self.state_path, {
            "name": self.name, "frontend": "dm", "pid": os.getpid(), "node": h.owner, "epoch": h.epoch,
            "disk": self.disk, "disk_uuid": h.disk_uuid, "size": self.size, "base": self.names.base,
            "loops": self.stack.loops, "cow": self.stack.cow, "link": str(self.link), "started": time.time()})

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> Endpoint:
        """Build (or adopt) the stack, fold, publish /dev/baton/NAME. On failure nothing new is left behind
        (an adopted stack that still serves the application is left serving)."""
        with self._lock:
            if self._phase != "new":
                raise DeviceError(f"{self.name}: this frontend was already started (one start per instance)")
            self._phase = "starting"
        with self._ops:
            try:
                self._start()
            except BaseException:
                self._failed_start()
                raise
        self.tracker.pit = self
        with self._lock:
            self._phase = "running"
        threading.Thread(target=self._watch, name=f"baton-dm-watch-{self.name}", daemon=True).start()
        self._endpoint = Endpoint(device=str(self.link))
        return self._endpoint

    def _start(self) -> None:
        ok, why = dm.dm_support()
        if not ok:
            raise DeviceError(f"--frontend dm: {why}", hint="attach with --frontend fuse (or auto, which picks it)")
        if self.record.era_region() is None:
            raise RecordError(era_unsupported_reason(self.record) or "this record has no era metadata region")
        self._lock_file = ServeLock(self.state_dir)
        if not self._lock_file.try_acquire():
            self._lock_file.release()
            self._lock_file = None
            raise DeviceBusy(f"{self.name} is being attached or served by another live process",
                             hint=f"detach it with `baton detach {self.name}` first")
        self._refuse_foreign_stacks()
        prev = _read_json(self.state_path)
        if self._adoptable(prev):
            assert prev is not None
            self._adopt(prev)
        else:
            self._clear_leftovers(prev)
            self._build()
        self._save()
        self._publish()
        log.info("%s: serving %s over %s (era %s, %s)", self.name, self.link, self.disk,
                 self.record.header.era_folded, "adopted" if self.adopted else "built")

    def _refuse_foreign_stacks(self) -> None:
        """Another NAME's stack of this very disk (its dm UUIDs name the disk): refuse, say which."""
        mine = f"{self.stack.uuid}-"
        for d in dm.devices():
            if d.uuid.startswith(mine) and not self.names.ours(d.name):
                raise DeviceBusy(f"{self.disk} is already served by the device-mapper device {d.name}",
                                 hint=f"detach that attachment first ({d.name}: `baton detach NAME`)")

    def _present(self) -> dict[str, dm.DmDevice]:
        return {d.name: d for d in dm.devices() if self.names.ours(d.name)}

    def _adoptable(self, prev: dict[str, Any] | None) -> bool:
        """A dead daemon of this node left a stack of this disk, and nobody attached the disk since (its epoch
        is the one before ours): the era target's in-core state still matches the metadata, so it is adopted
        as it is (the application may be writing through it right now)."""
        h = self.record.header
        pid = int((prev or {}).get("pid", 0))
        if prev is None or (pid_alive(pid) and pid != os.getpid()):
            return False
        if (prev.get("disk_uuid"), prev.get("node"), prev.get("epoch"), prev.get("size")) != (
                h.disk_uuid, h.owner, h.epoch - 1, self.size):
            return False
        present = self._present()
        n = self.names
        if not all(x in present for x in (n.top, n.era, n.meta, n.origin)):
            return False
        if not self.stack.adopt_loops(list(prev.get("loops") or [])):
            return False
        try:
            want = self.stack.expected(attach=False)
            era = dm.era_table(present[n.meta].devno, present[n.origin].devno, self.stack.nsect,
                               self.stack.chunk_sectors)
            top = dm.table(n.top)
            if not (dm.same_table(dm.table(n.meta), want["meta"]) and dm.same_table(dm.table(n.origin),
                                                                                    want["origin"])
                    and dm.same_table(dm.table(n.era), era)
                    and dm.target_of(top) in ("linear", "snapshot-origin") and present[n.era].devno in top.split()
                    and not dm.era_status(n.era).failed):
                self.stack.loops = []
                return False
        except DeviceError as e:
            log.warning("%s: the leftover stack cannot be adopted: %s", self.name, e)
            self.stack.loops = []
            return False
        for role in ("top", "era", "meta", "origin"):
            self.stack.devno[role] = present[self.names.top if role == "top" else self.names.role(role)].devno
        return True

    def _adopt(self, prev: dict[str, Any]) -> None:
        n = self.names
        self.adopted = True
        self._stats["adopted"] = 1
        self.stack.cow = prev.get("cow")
        self.record.begin_era()
        self.era = dm.EraTarget(n.era, dm.path(n.meta))
        with contextlib.suppress(DeviceError):  # a table a dead freeze loaded and never swapped in
            dm.dmsetup("clear", n.top)
        if dm.target_of(dm.table(n.top)) != "linear":  # a backup died with its snapshot in place
            dm.load(n.top, dm.linear_table(self.stack.devno["era"], [(0, self.size)]))
            dm.resume(n.top)
        if dm.info(n.snap) is not None:
            dm.remove(n.snap)
        if self.stack.cow:
            detach_loops([self.stack.cow])
            self.stack.cow = None
        self._fold_quiesced(pending=True)  # a dead backup's held metadata snapshot is dropped by the take

    def _clear_leftovers(self, prev: dict[str, Any] | None) -> None:
        """Tear down a stack that cannot be adopted (a dead process's, of another epoch): never let its era
        target commit again (its metadata device goes to error first); refuse while its top is in use."""
        present = self._present()
        if not present and prev is None:
            return
        done = _teardown_stale(self.names, present, prev)
        for d in done:
            log.warning("%s: leftovers of a dead daemon: %s", self.name, d)
        self.state_path.unlink(missing_ok=True)

    def _build(self) -> None:
        self.record.begin_era()
        if self.fence_wait:  # see FrontendConfig.fence_wait
            log.info("%s: waiting %.1f s for the previous dm owner to fence itself", self.name, self.fence_wait)
            time.sleep(self.fence_wait)
        self.era = self.stack.load_era()
        self._save()
        self._fold(pending=True)  # nothing writes yet: the top device does not exist
        self.stack.create("top", dm.linear_table(self.stack.devno["era"], [(0, self.size)]))

    def _publish(self) -> None:
        self.link.parent.mkdir(parents=True, exist_ok=True)
        target = dm.path(self.names.top)
        if self.link.is_symlink() or self.link.exists():
            cur = os.readlink(self.link) if self.link.is_symlink() else None
            if cur != target and (cur is None or Path(cur).exists()):
                raise DeviceBusy(f"{self.link} already exists and is not Baton's link for {self.name}",
                                 hint="remove it if nothing uses it")
        tmp = self.link.with_name(f".{self.name}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, self.link)

    def _failed_start(self) -> None:
        """Remove only what this start created (an adopted stack keeps serving; a live process's is never
        touched), in reverse order; a fenced record's era target first loses its metadata device."""
        if self._lock_file is not None:
            try:
                if isinstance(self.record.broken(), Fenced) and self.names.era in self.stack.created:
                    error_out_metadata(self.names)
                for name in reversed(self.stack.created):
                    got = dm.info(name)
                    if got is not None and not got.open_count:
                        dm.remove(name)
                self.stack.created = []
                self.stack.detach_loops()
                if not self._present():
                    self.state_path.unlink(missing_ok=True)
            except BaseException as e:
                log.error("%s: cleaning up after a failed start: %s", self.name, e)
            self._lock_file.release()
            self._lock_file = None
        with self._lock:
            self._phase = "stopped"
        self._stopped.set()

    # -- folding -----------------------------------------------------------------------------------------

    def _fold(self, *, pending: bool, keep_snapshot: bool = False) -> FoldResult:
        assert self.era is not None
        res = fold(self.record, self.era, pending=pending, keep_snapshot=keep_snapshot)
        self._stats["folds"] += 1
        self._stats["chunks_folded"] += res.chunks
        log.info("%s: folded %d chunks written in eras %d..%d into the record", self.name, res.chunks,
                 res.since, res.era - 1)
        return res

    def _fold_quiesced(self, *, pending: bool) -> FoldResult:
        """Fold while the top device is suspended (no write reaches era: no metadata commit during the read)."""
        dm.suspend(self.names.top)
        try:
            return self._fold(pending=pending)
        finally:
            dm.resume(self.names.top)

    # -- point in time (Tracker.pit) -------------------------------------------------------------------------

    def freeze(self) -> tuple[BlockDev, int]:
        """The freeze point of a backup: the snapshot device (O_DIRECT, read-only) and the era the fold closed
        (every write of an earlier era is in the backup: the history entry's ``era``).
        The application's writes wait only while the top device is suspended (measured in ``freeze_ms``)."""
        with self._ops:
            if not self.ready:
                raise DeviceError(f"{self.name}: the dm frontend is not serving")
            n, st, era = self.names, self.stack, self.era
            assert era is not None
            if dm.info(n.snap) is not None:
                raise DeviceBusy(f"{dm.path(n.snap)} already exists: another backup's snapshot")
            spill = Path(spill_dir_default())
            cow_path = spill / f"baton-cow-{self.name}-{os.getpid()}-{time.monotonic_ns()}"
            fd = os.open(cow_path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.cow_size)
            finally:
                os.close(fd)
            try:
                cow_dev = loopdev.attach(cow_path, direct_io=False)
            finally:
                cow_path.unlink(missing_ok=True)  # the loop device keeps it; nothing is left after a crash
            li = loopdev.info(cow_dev)
            cow_devno = _devno(os.stat(cow_dev).st_rdev)
            st.cow = {"device": cow_dev, "file": str(cow_path), "diskseq": li.diskseq if li else 0,
                      "devno": cow_devno}
            self._save()
            era_dev = st.devno["era"]
            # Everything that can happen before the writes stop does: the exception store above, and the top's
            # next table (snapshot-origin: it only opens the era device) loaded into its inactive slot. While
            # the top is suspended: the metadata snapshot (the freeze point: it closes the era), the listing
            # (era_invalidate 0.9 reads live metadata: only while no write reaches era), the marks, the
            # snapshot device; then resume. The metadata snapshot is dropped after the resume.
            dm.load(n.top, dm.origin_table(era_dev, st.nsect))
            t0 = time.monotonic()
            made = False
            try:
                dm.suspend(n.top)
                try:
                    res = self._fold(pending=True, keep_snapshot=True)
                    dm.create(n.snap, dm.snapshot_table(era_dev, cow_devno, st.nsect, st.chunk_sectors),
                              uuid=f"{st.uuid}-snap", readonly=True)
                    made = True
                finally:
                    if not made:  # the resume keeps the linear table that is live
                        dm.dmsetup("clear", n.top)
                    dm.resume(n.top)
            except BaseException:
                with contextlib.suppress(BaseException):
                    dm.dmsetup("clear", n.top)  # an inactive table left by a failed suspend
                with contextlib.suppress(BaseException):
                    self._drop_snapshot_devices()
                with contextlib.suppress(BaseException):
                    if era.status().held_root is not None:
                        era.drop_snapshot()
                raise
            ms = int((time.monotonic() - t0) * 1000)
            with contextlib.suppress(DeviceError):
                era.drop_snapshot()  # a leftover is dropped by the next snapshot's take anyway
            self._stats["freeze_ms"] = ms
            self._stats["freeze_ms_max"] = max(ms, self._stats["freeze_ms_max"])
            self._stats["backups_frozen"] += 1
            log.info("%s: frozen at era %d (writes held for %d ms); exception store %d bytes on %s", self.name,
                     res.era - 1, ms, self.cow_size, cow_dev)
            self._snap = DirectDev(dm.path(n.snap), writable=False)
            return self._snap, res.era

    def check(self) -> None:
        """Raise the reason once the snapshot can no longer be trusted (its exception store overflowed). A
        read issued after the invalidation fails, so a probe read after a run's read proves that run valid."""
        snap = self._snap
        if snap is None:
            raise DeviceError(f"{self.name}: no backup snapshot is in place")
        try:
            snap.pread(0, 4096)
        except OSError as e:
            st = None
            with contextlib.suppress(DeviceError):
                st = dm.snapshot_status(self.names.snap)
            if st is not None and not st.valid:
                raise DeviceError(
                    f"the backup's snapshot of {self.name} was dropped by the kernel ({st.state}): the "
                    f"application rewrote more than its exception store holds ({self.cow_size >> 20} MiB under "
                    f"{spill_dir_default()}) before the backup read those chunks; the application's writes "
                    "were not affected, and no backup was taken",
                    hint="attach with a larger --cow-size, or back up when fewer writes happen") from e
            raise DeviceError(f"reading the backup's snapshot {dm.path(self.names.snap)} failed: "
                              f"{e.strerror or e}") from e

    def thaw(self) -> None:
        """End the point in time: the top back to linear, the snapshot and its exception store removed. Never
        raises (the backup's data is read by then); a failure is logged, counted, and retried at stop."""
        with self._ops:
            if self._snap is not None:
                with contextlib.suppress(OSError):
                    self._snap.close()
                self._snap = None
            try:
                self._drop_snapshot_devices()
            except BatonError as e:
                self._stats["thaw_failures"] += 1
                log.error("%s: ending the backup's snapshot failed: %s (retried at detach)", self.name, e)

    def _drop_snapshot_devices(self) -> None:
        n, st = self.names, self.stack
        if dm.info(n.top) is not None and dm.target_of(dm.table(n.top)) == "snapshot-origin":
            dm.load(n.top, dm.linear_table(st.devno["era"], [(0, self.size)]))
            dm.resume(n.top)
        if dm.info(n.snap) is not None:
            dm.remove(n.snap)
        if st.cow is not None:
            detach_loops([st.cow])
            st.cow = None
            with contextlib.suppress(OSError):
                self._save()

    # -- serving -----------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint | None:
        return self._endpoint

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._phase == "running" and self._failure is None

    @property
    def failure(self) -> FrontendFailure | None:
        return self._failure

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _watch(self) -> None:
        devno = self.stack.devno.get("top", "")
        while not self._stopped.wait(WATCH_INTERVAL):
            if dm.name_of_devno(devno) != self.names.top:
                with self._lock:
                    if self._phase != "running":
                        return
                    self._failure = FrontendFailure(FailureKind.DIED, f"{dm.path(self.names.top)} was removed "
                                                    "from outside Baton")
                    self._phase = "failed"  # stop(force=True) still takes down the rest
                log.error("%s: %s", self.name, self._failure)
                self._stopped.set()
                return

    def stop(self, force: bool = False) -> None:
        """Detach: refused (DeviceBusy, nothing changed) while /dev/baton/NAME is mounted or open; else the top
        device goes, the era metadata is folded with FLAG_ERA_PENDING cleared, and the stack is removed.

        ``force`` (a fence, or a daemon ending on an error): the top device's table becomes ``error`` at once
        (every later I/O fails with EIO), and when the record was fenced the metadata device's too; then
        whatever is not in use is removed. A top device that is still mounted stays (``error``) until
        ``baton detach NAME`` cleans it up after the unmount."""
        with self._lock:
            phase = self._phase
            if phase in ("new", "stopped"):
                return
            self._phase = "stopping"
        if phase == "stopping":  # another stop is under way
            self._stopped.wait(120)
            return
        try:
            with self._ops:
                if force:
                    self._stop_forced()
                else:
                    self._stop_clean()
        except BaseException:
            if not force:
                with self._lock:
                    self._phase = phase
            raise
        self.tracker.pit = None
        if self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None
        with self._lock:
            self._phase = "stopped"
        self._stopped.set()

    def _stop_clean(self) -> None:
        n = self.names
        top = dm.info(n.top)
        if top is not None and top.open_count:
            raise DeviceBusy(_busy(dm.path(n.top), top.open_count) + f" (detach of {self.name} refused)",
                             hint="unmount it / stop what uses it, then detach again")
        self._close_snapshot()
        self._drop_snapshot_devices()
        if top is not None:
            dm.remove(n.top)  # no write can reach era from here on
        self._unpublish()
        fold_error: BaseException | None = None
        try:
            self._fold(pending=False)
        except BaseException as e:
            fold_error = e
        self.stack.remove_era(stale=isinstance(self.record.broken(), Fenced))
        self.stack.detach_loops()
        self.state_path.unlink(missing_ok=True)
        if fold_error is not None:
            if isinstance(fold_error, BatonError):
                raise fold_error
            raise DeviceError(f"{self.name}: the last fold of the era metadata failed: {fold_error}; the record "
                              "keeps FLAG_ERA_PENDING, so the next attach folds again") from fold_error

    def _stop_forced(self) -> None:
        """Errors are logged, never raised: a forced stop takes down what it can."""
        n = self.names
        broken = self.record.broken()
        fenced = isinstance(broken, Fenced)
        if fenced and self._failure is None:
            self._failure = FrontendFailure(FailureKind.FENCED, str(broken), broken)

        def step(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except BaseException as e:
                log.error("%s: %s failed: %s", self.name, what, e)

        def error_top() -> None:
            if dm.info(n.top) is not None:
                dm.load(n.top, dm.error_table(self.stack.nsect))
                dm.resume(n.top, flush=False)  # held-back I/O is resubmitted to the error table: EIO
                log.error("%s: %s fails every I/O from now on (%s)", self.name, dm.path(n.top),
                          "fenced" if fenced else "the daemon stops on an error")

        if fenced:  # first: from here the era target commits nothing into metadata the new owner loads
            step("switching the metadata device to error", lambda: error_out_metadata(n))
        step("switching the top device to error", error_top)
        self._close_snapshot()
        step("removing the backup's snapshot", self._drop_snapshot_devices)
        if not fenced:
            step("the last fold", lambda: self._fold(pending=False))  # still the owner: hand over era's writes
        step("removing the era stack", lambda: self.stack.remove_era(stale=fenced))
        step("detaching loop devices", self.stack.detach_loops)
        top = dm.info(n.top)
        if top is not None and top.open_count == 0:
            step("removing the top device", lambda: dm.remove(n.top))
        if dm.info(n.top) is None:
            self._unpublish()
            self.state_path.unlink(missing_ok=True)
        else:
            step("saving dm.json", self._save)

    def _close_snapshot(self) -> None:
        if self._snap is not None:
            with contextlib.suppress(OSError):
                self._snap.close()
            self._snap = None

    def _unpublish(self) -> None:
        if self.link.is_symlink() and os.readlink(self.link) == dm.path(self.names.top):
            self.link.unlink()

    def statistics(self) -> dict[str, int]:
        out = dict(self._stats)
        out.update(dm.io_counters(self.stack.devno.get("top", "")))
        return out

    # -- leftovers -----------------------------------------------------------------------------------------

    @classmethod
    def cleanup_stale(cls, config: FrontendConfig) -> list[str]:
        """Remove a dead process's stack of NAME: crash-equivalent (the metadata device goes to ``error`` before
        era is removed, so nothing is committed into metadata another owner may use now; the record keeps
        FLAG_ERA_PENDING and the next attach folds). Refuses (DeviceBusy) while the top device is in use or a
        live process serves NAME."""
        names = Names.of(config.name)
        state_dir = Path(config.run_dir).absolute() / config.name
        state_path = state_dir / "dm.json"
        prev = _read_json(state_path)
        try:
            present = {d.name: d for d in dm.devices() if names.ours(d.name)}
        except DeviceError:
            present = {}
        if prev is None and not present:
            return []
        lock = ServeLock(state_dir)
        try:
            if not lock.try_acquire():
                raise DeviceBusy(f"{config.name} is served by a live process", hint=f"baton detach {config.name}")
            done = _teardown_stale(names, present, prev)
            link = Path(config.dev_dir).absolute() / config.name
            if link.is_symlink() and os.readlink(link) == dm.path(names.top):
                link.unlink()
                done.append(f"removed {link}")
            state_path.unlink(missing_ok=True)
            return done
        finally:
            lock.release()


def _teardown_stale(names: Names, present: dict[str, dm.DmDevice], prev: dict[str, Any] | None) -> list[str]:
    """Remove a dead process's devices of ``names`` (and its recorded loop devices). Raises DeviceBusy, before
    changing anything, while the top device is open or mounted."""
    done: list[str] = []
    top = present.get(names.top)
    if top is not None and top.open_count:
        raise DeviceBusy(_busy(top.path, top.open_count) + " (a dead daemon's device)",
                         hint="unmount it / stop what uses it: nothing may write through a stack nobody fences")
    if top is not None:
        dm.remove(names.top)
        done.append(f"removed {top.path}")
    if names.snap in present:
        dm.remove(names.snap)
        done.append(f"removed {dm.path(names.snap)}")
    if names.era in present:
        done += error_out_metadata(names)
    for nm in (names.era, names.meta, names.origin):
        if nm in present:
            dm.remove(nm)
            done.append(f"removed {dm.path(nm)}")
    for other in sorted(set(present) - set(names.all())):  # a killed temporary fold's devices
        try:
            dm.remove(other)
            done.append(f"removed {dm.path(other)}")
        except DeviceError as e:
            log.warning("cannot remove %s: %s", other, e)
    if prev is not None:
        done += detach_loops(list(prev.get("loops") or []) + ([prev["cow"]] if prev.get("cow") else []))
    return done


def has_leftovers(config: FrontendConfig) -> bool:
    """Whether a dead process left a dm stack of NAME behind (its RUN_DIR/NAME/dm.json is there)."""
    return (Path(config.run_dir) / config.name / "dm.json").exists()


def own_stack_use(name: str) -> Callable[[Use], bool]:
    """For ``check_not_in_use``: accept the uses of a disk that are NAME's own (dead daemon's) dm stack, so a
    re-attach can adopt it: holders named ``baton-NAME:*`` and loop devices that only they hold."""
    names = Names.of(name)

    def allow(u: Use) -> bool:
        if u.kind == HOLDER:
            return names.ours(dm.holder_name(u.what))
        if u.kind == LOOP:
            try:
                held = os.listdir(f"/sys/block/{Path(u.what).name}/holders")
            except OSError:
                return False
            return bool(held) and all(names.ours(dm.holder_name(h)) for h in held)
        return False

    return allow


# ---- folding for a userspace owner --------------------------------------------------------------------------


def settle_era(record: Record, disk: str, *, name: str, size: int, fence_wait: float = 0.0) -> str | None:
    """Before a userspace frontend (or an offline backup) uses a record whose last dm owner did not detach
    cleanly (FLAG_ERA_PENDING): fold its era metadata through a temporarily loaded era target, or, on a node
    without dm-era, distrust the record (the next backup is full, with the reason). Returns what was done
    (None: nothing pending). The record must be attached by this node."""
    if not record.era_pending:
        return None
    ok, why = dm.dm_support()
    if not ok or record.era_region() is None:
        record.distrust(PENDING_NO_DM if ok else f"{PENDING_NO_DM} ({why})")
        record.set_era_folded(record.header.era_folded, pending=False)
        return f"distrusted: {PENDING_NO_DM}"
    names = Names(f"baton-{name}:fold{os.getpid()}")
    stack = Stack(names, record, disk, size)
    if fence_wait:
        log.info("%s: waiting %.1f s for the previous dm owner to fence itself", name, fence_wait)
        time.sleep(fence_wait)
    try:
        era = stack.load_era()
        res = fold(record, era, pending=False)
    except DeviceError as e:
        # dm-era is here but this fold failed (the tools, a device in the way): the disk stays usable, the next
        # backup is full with the reason (a fold's marks that did land only over-report)
        log.error("%s: folding the previous dm owner's era metadata failed: %s", name, e)
        reason = f"{PENDING_NO_DM.split(';')[0]}; its era metadata could not be folded here ({e})"
        record.distrust(reason)
        record.set_era_folded(record.header.era_folded, pending=False)
        return f"distrusted: {reason}"
    finally:
        with contextlib.suppress(BatonError):
            stack.remove_era(stale=isinstance(record.broken(), Fenced))
        with contextlib.suppress(BatonError):
            stack.detach_loops()
    return f"folded {res.chunks} chunks the previous dm owner wrote (eras {res.since}..{res.era - 1})"


FRONTEND = DmFrontend
