"""Checksummed file workload for the cluster test. Standard library only: it runs inside a node's namespaces
with the system python3.

``write DIR --prefix P --seed S [--count N] [--pause SECONDS]``
    Writes files ``DIR/P-NNNNN`` with seeded pseudo-random contents (1 KiB..192 KiB). For each file it fsyncs
    the file and then its directory, and only then prints ``DURABLE <name> <sha256> <size>`` on stdout
    (flushed). A printed line is therefore a promise that the file survives any crash of this node. Runs until
    ``--count`` files are written or it is killed. A failed write is reported as ``ERROR ...`` and ends it.

``verify DIR MANIFEST``
    MANIFEST is a JSON object {name: sha256}. Prints a JSON report {"checked", "ok", "missing", "mismatched",
    "extra"} and exits 0 only when every listed file is present with the right checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time


def write(d: str, prefix: str, seed: int, count: int, pause: float) -> int:
    os.makedirs(d, exist_ok=True)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    rng = random.Random(seed)
    i = 0
    try:
        while count <= 0 or i < count:
            name = f"{prefix}-{i:05d}"
            size = rng.randint(1, 192) * 1024 - rng.randint(0, 1023)
            data = rng.randbytes(size)
            path = os.path.join(d, name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.fsync(dfd)  # the directory entry is durable too
            except OSError as e:
                print(f"ERROR {name} {e}", flush=True)
                return 1
            print(f"DURABLE {name} {hashlib.sha256(data).hexdigest()} {size}", flush=True)
            i += 1
            if pause:
                time.sleep(pause)
    finally:
        os.close(dfd)
    return 0


def verify(d: str, manifest_path: str) -> int:
    with open(manifest_path) as f:
        manifest: dict[str, str] = json.load(f)
    missing: list[str] = []
    mismatched: list[str] = []
    ok = 0
    for name, digest in sorted(manifest.items()):
        try:
            with open(os.path.join(d, name), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            missing.append(name)
            continue
        if got == digest:
            ok += 1
        else:
            mismatched.append(name)
    present = set(os.listdir(d)) if os.path.isdir(d) else set()
    extra = len(present - set(manifest))
    print(json.dumps({"checked": len(manifest), "ok": ok, "missing": missing, "mismatched": mismatched,
                      "extra": extra}))
    return 0 if not missing and not mismatched else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "write":
        args = argv[2:]

        def opt(k: str, default: str) -> str:
            return args[args.index(k) + 1] if k in args else default

        return write(argv[1], opt("--prefix", "f"), int(opt("--seed", "0")), int(opt("--count", "0")),
                     float(opt("--pause", "0")))
    if len(argv) == 3 and argv[0] == "verify":
        return verify(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
