"""The boot image of the VM test tier: a Debian 12 kernel and a busybox initramfs, built once and cached.

:func:`ensure_image` returns an :class:`Image` (an uncompressed ``vmlinux`` booted directly through its PVH entry
point, and an uncompressed newc ``initramfs.cpio``), building it when the cache has none for the current inputs:

1. ``apt-get download`` the kernel that ``linux-image-amd64`` depends on (``linux-image-6.1.0-N-amd64``, the
   generic flavour, not -cloud: it has dm-era, dm-snapshot, loop, nbd, 9p) and ``busybox-static``;
2. ``dpkg-deb -x`` both, ``depmod -b`` the kernel tree (the .deb ships no modules.dep; its postinst makes one);
3. resolve the dependency closure of :data:`MODULES` with the host's ``modprobe --show-depends`` (kmod honours
   softdeps, busybox's modprobe does not, so the guest loads a precomputed ordered list with ``insmod``);
4. write the initramfs: busybox and its applet links, the modules, ``/init`` (guest-init.sh) and the load list;
5. pull the ELF ``vmlinux`` out of the bzImage (an XZ stream): PVH boot skips firmware and decompression
   (about 3 s per boot under TCG);
6. delete the unpacked kernel tree and the .debs; keep only ``vmlinux``, ``initramfs.cpio`` and
   ``manifest.json``.

Cache: ``$BATON_VM_CACHE`` (default ``/var/cache/baton-vm``)/``KEY``/ where KEY is the kernel ABI and package
version plus a hash of the build inputs (this file, guest-init.sh, the busybox version), so changing any of them
builds a new image; older entries are pruned after a successful build. A build runs under a lock file and is
published by rename, so concurrent test runs never see a half-built image. Idempotent: a complete entry is
reused without touching the network. Without network access an existing entry for the same inputs is still
used when apt can no longer resolve the package (the newest one is picked).

Run ``python -m tests.vm.image`` (or ``.venv/bin/python tests/vm/image.py``) to build or print the cached image.
Errors are :class:`ImageError` with a message that says what was missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_INIT = HERE / "guest-init.sh"
DEFAULT_CACHE = "/var/cache/baton-vm"
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"

# What the guest loads at boot, in this order (each with its dependency closure first). crc32c comes first
# because libcrc32c (dm-persistent-data, xfs) needs a crc32c provider and only a softdep says so.
MODULES = (
    "crc32c_generic", "crc32c-intel",
    "virtio_pci", "virtio_blk", "virtio_rng", "9pnet_virtio", "9p",
    "ext4", "loop", "fuse", "nbd",
    "dm-mod", "dm-bufio", "dm-persistent-data", "dm-era", "dm-snapshot", "dm-zero", "dm-flakey", "dm-delay",
)
# In the image but loaded on demand (`modprobe NAME` in a guest, or the kernel's own request, e.g. by
# `mount -t xfs`): xfs alone costs 0.7 s of boot under TCG.
ON_DEMAND = ("xfs", "dm-thin-pool", "dm-mirror", "dm-raid1", "dm-log-writes")
# Modules whose load may fail without making the guest useless (crc32c-intel needs SSE4.2 in the vCPU).
OPTIONAL_MODULES = ("crc32c-intel",)
# What a guest must offer for the tier to run at all (checked by the smoke tests).
REQUIRED_TARGETS = ("era", "snapshot-origin", "snapshot", "linear", "error")


class ImageError(RuntimeError):
    """The VM image could not be built or found; the message says what is missing and what to run."""


@dataclass(frozen=True)
class Image:
    """A built boot image: ``vmlinux`` (PVH), ``initramfs.cpio`` and what went into them."""

    dir: Path
    kernel_release: str      # e.g. 6.1.0-56-amd64
    kernel_version: str      # the Debian package version, e.g. 6.1.192-2
    modules: tuple[str, ...]  # .ko paths relative to lib/modules/RELEASE, in load order

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.dir / "initramfs.cpio"


def cache_root() -> Path:
    return Path(os.environ.get("BATON_VM_CACHE", DEFAULT_CACHE))


def _run(args: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        cp = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=os.environ | {"LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    except FileNotFoundError as e:
        raise ImageError(f"{args[0]} is not installed (scripts/setup.sh test installs it)") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"timed out after {timeout:.0f} s: {' '.join(args)}") from e
    if cp.returncode != 0:
        raise ImageError(f"{' '.join(args)} failed (exit {cp.returncode}): {(cp.stderr or cp.stdout).strip()[-2000:]}")
    return cp.stdout


def resolve_packages() -> tuple[str, str, str]:
    """(kernel package name, its version, busybox-static version) as apt sees them now (one apt-cache call)."""
    try:
        out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META, BUSYBOX], timeout=120)
    except ImageError as e:
        raise ImageError(f"apt does not know {KERNEL_META} or {BUSYBOX} (is this Debian 12 with its package "
                         f"lists? run `apt-get update`): {e}") from e
    fields: dict[str, dict[str, str]] = {}
    for para in out.split("\n\n"):
        f = dict(re.findall(r"^(Package|Version|Depends): (.*)$", para, re.M))
        if "Package" in f:
            fields[f["Package"]] = f
    m = re.search(r"(linux-image-\d\S*-amd64) \(= ([^)]+)\)", fields.get(KERNEL_META, {}).get("Depends", ""))
    bbver = fields.get(BUSYBOX, {}).get("Version")
    if m is None or bbver is None:
        raise ImageError(f"apt-cache show {KERNEL_META} {BUSYBOX} names no kernel package or no busybox version "
                         "(run `apt-get update`)")
    return m.group(1), m.group(2), bbver


def inputs_hash(busybox_version: str) -> str:
    h = hashlib.sha256()
    for p in (Path(__file__).resolve(), GUEST_INIT):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(busybox_version.encode())
    return h.hexdigest()[:12]


def _key(kpkg: str, kver: str, bbver: str) -> str:
    release = kpkg.removeprefix("linux-image-")
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{release}_{kver}_{inputs_hash(bbver)}")


def _load(entry: Path) -> Image | None:
    try:
        m = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    img = Image(entry, m["kernel_release"], m["kernel_version"], tuple(m["modules"]))
    return img if img.vmlinux.is_file() and img.initramfs.is_file() else None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_image(*, log: bool = True) -> Image:
    """The cached image for the current kernel package and build inputs, built first if missing."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(f"cannot create the VM image cache {root}: {e.strerror} (run as root, or set "
                         "BATON_VM_CACHE to a writable directory)") from e
    try:
        kpkg, kver, bbver = resolve_packages()
    except ImageError as e:
        # Offline: a complete entry built from these same inputs will do (the newest first).
        entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for p in entries:
            img = _load(p)
            with contextlib.suppress(OSError, ValueError, KeyError):
                m = json.loads((p / "manifest.json").read_text())
                if img is not None and m["inputs"] == inputs_hash(m["busybox_version"]):
                    return img
        raise ImageError(f"no VM image cached in {root} and none can be built: {e}") from e
    entry = root / _key(kpkg, kver, bbver)
    img = _load(entry)
    if img is not None:
        return img
    with _locked(root):
        img = _load(entry)  # built by someone else while we waited
        if img is not None:
            return img
        t0 = time.monotonic()
        if log:
            print(f"tests/vm: building the guest image {entry.name} in {root} ...", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build(tmp, kpkg, kver, bbver)
            out = tmp / "out"
            manifest = json.loads((out / "manifest.json").read_text())
            manifest["build_seconds"] = round(time.monotonic() - t0, 1)
            (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            out.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in root.iterdir():  # prune entries of older kernels or inputs, and dead build dirs
            if p.is_dir() and p != entry:
                shutil.rmtree(p, ignore_errors=True)
        img = _load(entry)
        if img is None:
            raise ImageError(f"the build in {entry} did not produce vmlinux and initramfs.cpio")
        if log:
            print(f"tests/vm: built {entry.name} in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        return img


def _build(tmp: Path, kpkg: str, kver: str, bbver: str) -> None:
    debs = tmp / "debs"
    debs.mkdir()
    # As root apt warns that it cannot drop to the _apt user for a download into a root-owned directory.
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{kpkg}={kver}", f"{BUSYBOX}={bbver}"],
         cwd=debs, timeout=900)
    kdeb = next(debs.glob(f"{kpkg}_*.deb"), None)
    bdeb = next(debs.glob(f"{BUSYBOX}_*.deb"), None)
    if kdeb is None or bdeb is None:
        raise ImageError(f"apt-get download left no {kpkg} or {BUSYBOX} .deb in {debs}")
    kroot, bbroot = tmp / "kroot", tmp / "bb"
    _run(["dpkg-deb", "-x", str(kdeb), str(kroot)])
    _run(["dpkg-deb", "-x", str(bdeb), str(bbroot)])
    release = kpkg.removeprefix("linux-image-")
    moddir = kroot / "lib/modules" / release
    if not moddir.is_dir():
        raise ImageError(f"{kdeb.name} has no lib/modules/{release}")
    _run(["depmod", "-b", str(kroot), release])
    order: list[str] = []
    for mod in (*MODULES, *ON_DEMAND):
        try:
            deps = _run(["modprobe", "-d", str(kroot), "-S", release, "--show-depends", mod])
        except ImageError as e:
            if mod in OPTIONAL_MODULES:
                continue
            raise ImageError(f"module {mod} is missing from {kpkg}: {e}") from e
        for line in deps.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                rel = str(Path(parts[1]).relative_to(moddir))
                if rel not in order:
                    order.append(rel)
        if mod == MODULES[-1]:
            boot_count = len(order)
    # The image's own module tree, with its own modules.dep and modules.alias (depmod over just these files).
    mods = tmp / "mods"
    mroot = mods / "lib/modules" / release
    for rel in order:
        (mroot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, mroot / rel)
    for f in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (moddir / f).exists():
            shutil.copy2(moddir / f, mroot / f)
    _run(["depmod", "-b", str(mods), release])
    config = next((kroot / "boot").glob("config-*")).read_text()
    for opt in ("CONFIG_PVH=y", "CONFIG_DM_ERA=m", "CONFIG_DM_SNAPSHOT=m"):
        if opt not in config:
            raise ImageError(f"{kpkg} lacks {opt}")
    vmlinuz = kroot / "boot" / f"vmlinuz-{release}"
    out = tmp / "out"
    out.mkdir()
    (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
    busybox = bbroot / "bin" / "busybox"
    applets = _run([str(busybox), "--list-full"]).split()
    cpio = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "mnt",
              "mnt/share", "host", "scratch", "etc", "etc/baton-vm", "lib", "lib/modules", "root", "var"):
        cpio.dir(d, 0o1777 if d == "tmp" else 0o755)
    cpio.chardev("dev/console", 5, 1, 0o600)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for a in applets:
        if a != "bin/busybox" and a.count("/") <= 2:
            cpio.symlink(a, "/bin/busybox")
    cpio.file("init", GUEST_INIT.read_bytes(), 0o755)
    for p in sorted(mroot.parent.rglob("*")):
        rel_p = str(p.relative_to(mods))
        if p.is_dir():
            cpio.dir(rel_p, 0o755)
        else:
            cpio.file(rel_p, p.read_bytes(), 0o644)
    optional = {r for r in order if any(Path(r).stem.replace("_", "-") == m.replace("_", "-")
                                        for m in OPTIONAL_MODULES)}
    cpio.file("etc/baton-vm/modules", "".join(f"{r} {'optional' if r in optional else 'required'}\n"
                                             for r in order[:boot_count]).encode(), 0o644)
    cpio.file("etc/baton-vm/release", f"{release}\n".encode(), 0o644)
    (out / "initramfs.cpio").write_bytes(cpio.finish())
    manifest = {"kernel_package": kpkg, "kernel_release": release, "kernel_version": kver,
                "busybox_version": bbver, "modules": order[:boot_count],
                "on_demand": order[boot_count:], "inputs": inputs_hash(bbver)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is an XZ stream (Debian's kernels)."""
    magic = b"\xfd7zXZ\x00"
    at = bzimage.find(magic)
    while at >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[at:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            return elf
        at = bzimage.find(magic, at + 1)
    raise ImageError("no XZ-compressed ELF kernel found in the bzImage (a kernel not built with CONFIG_KERNEL_XZ?)")


class Cpio:
    """An uncompressed newc archive written in memory (no host cpio needed; mtimes 0, so reproducible)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._parts.append(hdr + b"\0" * (-len(hdr) % 4))
        if data:
            self._parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int) -> None:
        self._entry(name, 0o040000 | perm)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def main() -> int:
    try:
        img = ensure_image()
    except ImageError as e:
        print(f"tests/vm: {e}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in img.dir.iterdir())
    print(f"{img.dir}\nkernel {img.kernel_release} ({img.kernel_version}), {len(img.modules)} modules, "
          f"{size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
