"""Device-mapper, as the dm-era frontend needs it: ``dmsetup``, ``era_invalidate``, and what this kernel can do.

Everything here runs a tool and parses its answer; nothing keeps state. The tables are built here too, so the
one place that knows a table's syntax is the one that parses ``dmsetup table`` back:

* ``linear``: one line per extent, ``START LEN linear MAJ:MIN OFFSET`` (sectors);
* ``era``: ``0 LEN era META ORIGIN BLOCK_SECTORS`` (docs.kernel.org admin-guide/device-mapper/era.html);
* ``snapshot-origin ERA`` and ``snapshot ERA COW N CHUNK_SECTORS`` (a transient exception store);
* ``error``: every I/O fails with EIO (a fenced owner's top device).

Devices are named by device number (``MAJ:MIN``) in every table, which is also how the kernel prints them, so
an existing stack can be compared with the one Baton would build (:func:`same_table`).

Facts this module relies on (measured in TCG guests, ../notes: kernel-tracking.md, qemu-dm-era.md):

* ``dmsetup status`` of an era device: ``0 LEN era MD_BLOCK_SECTORS USED/TOTAL CURRENT_ERA HELD_ROOT|-`` or
  ``Error`` when its metadata failed; ``take_metadata_snap`` and every table load move the era on.
* A message to a *suspended* era device waits until it is resumed: the frontend suspends the device above
  era (the top device), never era itself.
* ``era_invalidate`` 0.9.0 reads the live superblock even with ``--metadata-snapshot`` (thin-provisioning-tools
  issue #192, fixed in 1.0 by PR #193). Baton only ever asks it while no write can reach the era device (the top
  device suspended or not created yet, so no metadata commit runs during the read), where the live superblock and
  the snapshot list the same blocks; it reads with O_DIRECT, so no page cache is in the way.
* Without udev (QEMU test guests) ``dmsetup`` must create the /dev/mapper nodes itself: ``DM_DISABLE_UDEV=1``
  is set whenever no udev daemon runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from baton.errors import DeviceError

SECTOR = 512
MAPPER_DIR = "/dev/mapper"
CONTROL = "/dev/mapper/control"
TIMEOUT = 60.0  # seconds for one dmsetup call; they take 5 ms here and 0.1-0.3 s in a TCG guest
REQUIRED_TARGETS = ("era", "snapshot-origin", "snapshot")
MODULES = ("dm-mod", "dm-era", "dm-snapshot")


# ------------------------------------------------------------------------------------------------ running tools


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if not os.path.exists("/run/udev/control"):  # no udev daemon: dmsetup makes the /dev/mapper nodes itself
        env["DM_DISABLE_UDEV"] = "1"
    env["LC_ALL"] = "C"
    return env


def run(args: list[str], *, stdin: str | None = None, timeout: float = TIMEOUT) -> str:
    """Run a device-mapper tool; its stdout. A failure is DeviceError with the tool's own words."""
    try:
        res = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
                             env=_env())
    except subprocess.TimeoutExpired as e:
        raise DeviceError(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from e
    except OSError as e:
        raise DeviceError(f"cannot run {args[0]}: {e.strerror or e}",
                          hint="install dmsetup (package dmsetup) and thin-provisioning-tools") from e
    if res.returncode != 0:
        why = " ".join(res.stderr.split()) or f"exit status {res.returncode}"
        raise DeviceError(f"`{' '.join(args)}` failed: {why}")
    return res.stdout


def dmsetup(*args: str, table: str | None = None) -> str:
    return run(["dmsetup", *args], stdin=table)


# ------------------------------------------------------------------------------------------------ capability


def _control_ok() -> str:
    """'' when /dev/mapper/control opens, else why not."""
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if not os.path.exists(CONTROL):
            return f"{CONTROL} is missing"
        return f"{CONTROL} cannot be opened ({e.strerror})"
    os.close(fd)
    return ""


def loaded_targets() -> set[str]:
    """Names of the device-mapper targets the kernel has loaded now (``dmsetup targets``)."""
    return {ln.split()[0] for ln in dmsetup("targets").splitlines() if ln.strip()}


_SUPPORTED: tuple[bool, str] | None = None  # a positive answer, kept for the life of the process


def _probe() -> tuple[bool, str]:
    if shutil.which("dmsetup") is None:
        return False, "dmsetup is not installed (package dmsetup)"
    why = _control_ok()
    if why:
        return False, f"this kernel has no device-mapper: {why}"
    try:
        have = loaded_targets()
    except DeviceError as e:
        return False, f"this kernel's device-mapper does not answer: {e}"
    missing = [t for t in REQUIRED_TARGETS if t not in have]
    if missing:
        return False, (f"this kernel's device-mapper lacks the {', '.join(missing)} target"
                       f"{'s' if len(missing) > 1 else ''} (modules dm-era, dm-snapshot)")
    for tool, pkg in (("era_invalidate", "thin-provisioning-tools"), ("losetup", "util-linux")):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed (package {pkg})"
    return True, "device-mapper with the era, snapshot-origin and snapshot targets"


def dm_support() -> tuple[bool, str]:
    """Whether this node can run the dm-era frontend, and a sentence saying why (or why not).

    Needs /dev/mapper/control, the ``era``, ``snapshot-origin`` and ``snapshot`` targets (when they are not
    loaded yet, ``modprobe dm-mod dm-era dm-snapshot`` is tried, quietly, and the kernel asked again), and the
    tools ``dmsetup``, ``era_invalidate`` and ``losetup``. A positive answer is kept for the process's life.
    """
    global _SUPPORTED
    if _SUPPORTED is not None:
        return _SUPPORTED
    got = _probe()
    modprobe = shutil.which("modprobe")
    if not got[0] and modprobe and "not installed" not in got[1]:
        for m in MODULES:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([modprobe, "-q", m], capture_output=True, timeout=30, check=False)
        got = _probe()
    if got[0]:
        _SUPPORTED = got
    return got


# ------------------------------------------------------------------------------------------------ devices


@dataclass(frozen=True)
class DmDevice:
    """One mapped device as ``dmsetup info -c`` lists it."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    suspended: bool

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def path(self) -> str:
        return path(self.name)


def path(name: str) -> str:
    return f"{MAPPER_DIR}/{name}"


def parse_info(text: str) -> list[DmDevice]:
    """``dmsetup info -c --noheadings --separator '|' -o name,uuid,major,minor,open,suspended`` -> devices."""
    out: list[DmDevice] = []
    for ln in text.splitlines():
        if not ln.strip() or ln.startswith("No devices found"):
            continue
        f = ln.split("|")
        if len(f) != 6:
            raise DeviceError(f"unexpected `dmsetup info` line: {ln!r}")
        out.append(DmDevice(name=f[0], uuid=f[1], major=int(f[2]), minor=int(f[3]), open_count=int(f[4] or 0),
                            suspended=f[5].strip().lower() == "suspended"))
    return out


_INFO_ARGS = ("info", "-c", "--noheadings", "--separator", "|", "-o", "name,uuid,major,minor,open,suspended")


def devices() -> list[DmDevice]:
    """Every mapped device on this node."""
    return parse_info(dmsetup(*_INFO_ARGS))


def info(name: str) -> DmDevice | None:
    """The device called ``name``, None when there is none."""
    try:
        got = parse_info(dmsetup(*_INFO_ARGS, name))
    except DeviceError as e:
        if any(w in str(e) for w in ("does not exist", "No such device", "not found")):
            return None
        raise
    return got[0] if got else None


def create(name: str, table: str, *, uuid: str = "", readonly: bool = False) -> str:
    """Create and resume ``name`` with ``table`` (lines); its device number ``MAJ:MIN``."""
    args = ["create", name]
    if uuid:
        args += ["--uuid", uuid]
    if readonly:
        args.append("--readonly")
    dmsetup(*args, table=table)
    try:  # dmsetup made the node itself (no udev) or waited for udev to make it
        rdev = os.stat(path(name)).st_rdev
    except OSError as e:
        raise DeviceError(f"dmsetup create {name} succeeded but {path(name)} is missing ({e.strerror})") from e
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def load(name: str, table: str) -> None:
    """Load ``table`` into the inactive slot of ``name`` (live after the next resume)."""
    dmsetup("load", name, table=table)


def suspend(name: str, *, flush: bool = True) -> None:
    """Suspend ``name``: in-flight I/O completes (``flush``) or is held back to be resubmitted (``flush=False``);
    new I/O waits. Never freezes a file system on it (``--nolockfs``): a backup's freeze point is crash
    consistent, and ``backup --freeze`` asks for file-system consistency."""
    dmsetup("suspend", "--nolockfs", *(() if flush else ("--noflush",)), name)


def resume(name: str, *, flush: bool = True) -> None:
    """Resume ``name`` (swapping in a loaded table: an implicit suspend first, without lockfs)."""
    dmsetup("resume", "--nolockfs", *(() if flush else ("--noflush",)), name)


def remove(name: str) -> None:
    """Remove ``name`` (``--retry``: udev's probe may hold it open for a moment)."""
    dmsetup("remove", "--retry", name)


def message(name: str, msg: str) -> None:
    dmsetup("message", name, "0", msg)


def status(name: str) -> str:
    return dmsetup("status", name)


def table(name: str) -> str:
    return dmsetup("table", name)


# ------------------------------------------------------------------------------------------------ tables


def sectors(nbytes: int, what: str) -> int:
    if nbytes % SECTOR:
        raise DeviceError(f"{what}: {nbytes} bytes is not a whole number of {SECTOR}-byte sectors")
    return nbytes // SECTOR


def linear_table(devno: str, extents: Iterable[tuple[int, int]]) -> str:
    """A dm-linear table concatenating ``extents`` (byte offset, byte length) of device ``devno``."""
    lines: list[str] = []
    start = 0
    for off, length in extents:
        if length <= 0:
            continue
        n = sectors(length, f"extent {off}+{length}")
        lines.append(f"{start} {n} linear {devno} {sectors(off, f'extent {off}+{length}')}")
        start += n
    if not lines:
        raise DeviceError("a linear table needs at least one extent")
    return "\n".join(lines) + "\n"


def era_table(meta: str, origin: str, nsectors: int, block_sectors: int) -> str:
    return f"0 {nsectors} era {meta} {origin} {block_sectors}\n"


def origin_table(era: str, nsectors: int) -> str:
    return f"0 {nsectors} snapshot-origin {era}\n"


def snapshot_table(era: str, cow: str, nsectors: int, chunk_sectors: int) -> str:
    return f"0 {nsectors} snapshot {era} {cow} N {chunk_sectors}\n"


def error_table(nsectors: int) -> str:
    return f"0 {nsectors} error\n"


def table_sectors(text: str) -> int:
    """Length in sectors of a table (the end of its last line)."""
    end = 0
    for ln in text.splitlines():
        f = ln.split()
        if len(f) >= 2:
            end = max(end, int(f[0]) + int(f[1]))
    return end


def _norm(text: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if ln.strip()]


def same_table(live: str, wanted: str) -> bool:
    """Whether ``dmsetup table`` output ``live`` is the table ``wanted`` (whitespace and the kernel's own
    spelling aside: a transient snapshot prints its store type as ``N``, era has no extra words)."""
    a, b = _norm(live), _norm(wanted)
    return a == b


def target_of(text: str) -> str:
    """The target type of a single-target table ("linear", "era", "snapshot-origin", "error", ...)."""
    rows = _norm(text)
    return rows[0][2] if rows and len(rows[0]) > 2 else ""


# ------------------------------------------------------------------------------------------------ status


@dataclass(frozen=True)
class EraStatus:
    """``dmsetup status`` of an era device."""

    era: int  # the current era
    held_root: int | None  # the metadata snapshot's root block while one is held
    used: int  # metadata blocks used
    total: int  # metadata blocks in all
    failed: bool = False  # the target reported "Error": its metadata could not be read or committed

    @classmethod
    def parse(cls, text: str) -> EraStatus:
        f = text.split()
        if len(f) >= 4 and f[2] == "era" and f[3] in ("Error", "Fail"):
            return cls(era=0, held_root=None, used=0, total=0, failed=True)
        if len(f) < 7 or f[2] != "era" or "/" not in f[4]:
            raise DeviceError(f"unexpected era status {text.strip()!r}")
        used, total = (int(x) for x in f[4].split("/"))
        return cls(era=int(f[5]), held_root=None if f[6] == "-" else int(f[6]), used=used, total=total)


@dataclass(frozen=True)
class SnapshotStatus:
    """``dmsetup status`` of a snapshot device."""

    valid: bool
    state: str  # "ok", "Invalid", "Overflow", "Merge failed", "Unknown"
    allocated: int = 0  # sectors of the exception store in use
    total: int = 0  # sectors of the exception store

    @classmethod
    def parse(cls, text: str) -> SnapshotStatus:
        f = text.split()
        if len(f) < 4 or f[2] != "snapshot":
            raise DeviceError(f"unexpected snapshot status {text.strip()!r}")
        rest = " ".join(f[3:])
        m = re.match(r"(\d+)/(\d+)", f[3])
        if m:
            return cls(valid=True, state="ok", allocated=int(m.group(1)), total=int(m.group(2)))
        return cls(valid=False, state=rest)


def era_status(name: str) -> EraStatus:
    return EraStatus.parse(status(name))


def snapshot_status(name: str) -> SnapshotStatus:
    return SnapshotStatus.parse(status(name))


# ------------------------------------------------------------------------------------------------ era_invalidate


def parse_blocks(xml: str) -> Iterator[int]:
    """The blocks an ``era_invalidate`` listing names: ``<blocks><block block="N"/><range begin="A" end="B"/>``
    (``end`` exclusive; thin-provisioning-tools 0.9 prints ``end = "B"`` with spaces, which XML allows).
    Raises DeviceError for anything else: a listing that cannot be read is never "nothing changed"."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DeviceError(f"era_invalidate printed something that is not its XML listing ({e}): "
                          f"{xml[:200]!r}") from e
    if root.tag != "blocks":
        raise DeviceError(f"era_invalidate printed <{root.tag}>, expected <blocks>")
    for el in root:
        try:
            if el.tag == "block":
                yield int(el.attrib["block"])
            elif el.tag == "range":
                lo, hi = int(el.attrib["begin"]), int(el.attrib["end"])
                if hi < lo:
                    raise ValueError(f"range {lo}..{hi}")
                yield from range(lo, hi)
            else:
                raise ValueError(f"unknown element <{el.tag}>")
        except (KeyError, ValueError) as e:
            raise DeviceError(f"era_invalidate listing: bad element {ET.tostring(el, encoding='unicode')!r}: "
                              f"{e}") from e


def era_invalidate(metadata: str, since: int) -> list[int]:
    """Blocks written in eras >= ``since``, read through the metadata snapshot the era target holds (see the
    module docstring for when that is safe with thin-provisioning-tools 0.9)."""
    out = run(["era_invalidate", "--written-since", str(since), "--metadata-snapshot", metadata])
    return list(parse_blocks(out))


class EraTarget:
    """A loaded era device, as :func:`baton.tracker.era.fold` uses it (an ``EraSource``): metadata snapshots
    taken and dropped by message, blocks listed by ``era_invalidate`` on the metadata device ``metadata``."""

    def __init__(self, name: str, metadata: str) -> None:
        self.name = name
        self.metadata = metadata
        self.era = 0  # the current era, as the last status or snapshot left it

    def status(self) -> EraStatus:
        st = era_status(self.name)
        if st.failed:
            raise DeviceError(f"the era target {self.name} reports an error: its metadata can no longer be "
                              "read or committed", hint="see the kernel log (dmesg); the disk's next backup is "
                              "full if the metadata was lost")
        self.era = st.era
        return st

    def take_snapshot(self) -> int:
        """take_metadata_snap; the era current after it. The message moves the era on by exactly one, so once
        a status has told this object the era, no further status is asked (a backup's freeze window is a few
        process spawns shorter). Should anything else move the era meanwhile, the era returned is too low, and
        the next fold lists those eras again: an over-report, never an under-report."""
        known = self.era
        try:
            message(self.name, "take_metadata_snap")
        except DeviceError:
            if self.status().held_root is None:
                raise
            message(self.name, "drop_metadata_snap")  # left by a backup that died: one is held at a time
            message(self.name, "take_metadata_snap")
            known = self.era
        if known:
            self.era = known + 1
            return self.era
        return self.status().era

    def written_since(self, era: int) -> list[int]:
        return era_invalidate(self.metadata, era)

    def drop_snapshot(self) -> None:
        message(self.name, "drop_metadata_snap")


def holder_name(kernel_name: str) -> str:
    """The device-mapper name of a holder such as ``dm-3`` ('' when it is not a mapped device)."""
    try:
        with open(f"/sys/block/{kernel_name}/dm/name") as f:
            return f.read().strip()
    except OSError:
        return ""


def name_of_devno(devno: str) -> str:
    """The device-mapper name of device ``MAJ:MIN`` ('' when there is none)."""
    try:
        with open(f"/sys/dev/block/{devno}/dm/name") as f:
            return f.read().strip()
    except OSError:
        return ""


def io_counters(devno: str) -> dict[str, int]:
    """Reads and writes completed, and bytes moved, by block device ``MAJ:MIN`` (/sys/dev/block/.../stat)."""
    try:
        with open(f"/sys/dev/block/{devno}/stat") as f:
            v = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return {}
    return {"reads": v[0], "bytes_read": v[2] * SECTOR, "writes": v[4], "bytes_written": v[6] * SECTOR,
            "in_flight": v[8]}


class KernelLog:
    """The kernel log from now on: open before a device-mapper call, :meth:`lines` after it fails says what the
    kernel said about it (the table load's own error is only "Invalid argument"). Quietly empty when /dev/kmsg
    cannot be read."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = -1

    def lines(self, match: str) -> list[str]:
        """New lines containing ``match``, without their "device-mapper: " prefix."""
        found: list[str] = []
        while self.fd >= 0:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # a record was overwritten while reading; the next one follows
                continue
            except OSError:
                break
            if not rec:
                break
            text = rec.decode(errors="replace").partition(";")[2].splitlines()
            if text and match in text[0]:
                found.append(text[0].removeprefix("device-mapper: "))
        return found

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
