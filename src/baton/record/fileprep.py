"""Create the pinned record file inside a file system (file placement). Run in a private mount namespace:

    unshare --mount --propagation private python -m baton.record.fileprep DEVICE SIZE

1. mount DEVICE (loop for an image file) on a temporary directory, private to this namespace;
2. create ``/.baton/record`` preallocated to SIZE and write it through once (no unwritten extents remain);
3. map its extents with FIEMAP, then mark it immutable (``chattr +i``) so the file system never moves or frees it;
4. unmount, and print the extents as JSON on stdout.

From then on Baton reads and writes the record raw, through the extents, never through a mounted file system.
Errors go to stderr with exit status 1.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import tempfile

RECORD_DIR = ".baton"
RECORD_FILE = ".baton/record"
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
# Extents Baton cannot write raw: data not at a stable, aligned, exclusively owned physical place.
BAD_FLAGS = {0x2: "unknown location", 0x4: "delayed allocation", 0x8: "encoded", 0x80: "encrypted",
             0x100: "not aligned", 0x200: "inline", 0x400: "tail-packed", 0x800: "unwritten", 0x2000: "shared"}


def fiemap(fd: int, size: int) -> list[tuple[int, int, int, int]]:
    """(logical, physical, length, flags) of every extent covering [0, size)."""
    out: list[tuple[int, int, int, int]] = []
    start = 0
    count = 256
    while start < size:
        req = struct.pack("<QQIIII", start, size - start, FIEMAP_FLAG_SYNC, 0, count, 0) + bytes(56 * count)
        buf = bytearray(req)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = struct.unpack_from("<I", buf, 20)[0]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            lo, ph, ln, _, _, fl = struct.unpack_from("<QQQQQI", buf, 32 + 56 * i)
            out.append((lo, ph, ln, fl))
            start = lo + ln
            last = bool(fl & FIEMAP_EXTENT_LAST)
        if last:
            break
    return out


def main(argv: list[str]) -> int:
    dev, size = argv[0], int(argv[1])
    mnt = tempfile.mkdtemp(prefix="baton-fileprep-")
    loop = ""
    if os.path.isfile(dev):
        # An explicit loop device, not `mount -o loop`: libmount then scans every loop device's backing file
        # for reuse, and hangs on one backed by an unresponsive FUSE file (e.g. a stopped Baton daemon).
        r = subprocess.run(["losetup", "--find", "--show", dev], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            print(f"cannot set up a loop device for {dev}: {r.stderr.strip()}", file=sys.stderr)
            os.rmdir(mnt)
            return 1
        loop = r.stdout.strip()
    r = subprocess.run(["mount", loop or dev, mnt], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"cannot mount {dev}: {r.stderr.strip()}", file=sys.stderr)
        os.rmdir(mnt)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
        return 1
    try:
        d = os.path.join(mnt, RECORD_DIR)
        path = os.path.join(mnt, RECORD_FILE)
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            subprocess.run(["chattr", "-i", path], check=False, capture_output=True)
            os.unlink(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                print(f"cannot preallocate {size} bytes on {dev}: {e.strerror}", file=sys.stderr)
                return 1
            zeros = bytes(1 << 20)
            pos = 0
            while pos < size:  # write through once: no extent stays "unwritten"
                n = min(len(zeros), size - pos)
                os.pwrite(fd, zeros[:n], pos)
                pos += n
            os.fsync(fd)
            extents = fiemap(fd, size)
        finally:
            os.close(fd)
        bad = [(e, [n for f, n in BAD_FLAGS.items() if e[3] & f]) for e in extents if e[3] & sum(BAD_FLAGS)]
        if bad:
            print(f"the record file has extents Baton cannot write raw: {bad[:3]}", file=sys.stderr)
            return 1
        if sum(e[2] for e in extents) < size:
            print("FIEMAP did not map the whole record file", file=sys.stderr)
            return 1
        r = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"cannot mark the record file immutable: {r.stderr.strip()}", file=sys.stderr)
            return 1
        json.dump({"extents": [[lo, ph, ln] for lo, ph, ln, _ in extents]}, sys.stdout)
        return 0
    finally:
        subprocess.run(["umount", mnt], check=False, capture_output=True)
        os.rmdir(mnt)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
