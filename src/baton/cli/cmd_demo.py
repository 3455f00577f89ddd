"""baton demo: Baton's main job end to end, on an embedded default, in under a minute.

A file-backed shared disk and a local repository are created in a work directory. Three nodes (each a separate
`baton attach` daemon process) take the disk over in turn while a writer process writes to /dev/baton/NAME;
every takeover follows a kill -9 of the previous owner in the middle of its writes. After each failover the new
owner backs the disk up; at the end the last snapshot is restored and compared byte for byte with the disk, and
the repository is verified. The table shows what each backup read against the disk size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from baton.errors import BatonError, DeviceError, VerifyFailed

WRITER = r"""
import os, random, sys
dev, seed, nwrites, chunk, size, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rng = random.Random(seed)
import mmap
buf = mmap.mmap(-1, chunk)
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
lf = open(log, "a")
nchunks = size // chunk
for i in range(nwrites):
    c = rng.randrange(nchunks)
    buf[:] = rng.randbytes(chunk)
    try:
        os.pwrite(fd, buf, c * chunk)
    except OSError as e:
        print(f"writer: write {i} failed: {e.strerror}", file=sys.stderr)
        sys.exit(3)
    lf.write(f"{c}\n"); lf.flush()
sys.exit(0)
"""


def _baton(*args: str, env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "baton", *args, "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0:
        raise BatonError(f"`baton {' '.join(args)}` failed (exit {r.returncode}): {r.stderr.strip()}")
    out: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
    return out


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to put the disk image and repository (default: a new directory under /var/tmp).")
@click.option("--size", default="1G", show_default=True, help="Size of the shared disk image.")
@click.option("--change", default=1.0, show_default=True, help="Percent of chunks each node rewrites.")
@click.option("--seed", default=20261124, show_default=True, envvar="BATON_SEED", help="Random seed (printed).")
@click.option("--frontend", type=click.Choice(["fuse"]), default="fuse", show_default=True)
@click.option("--keep", is_flag=True, help="Keep the work directory afterwards.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def command(workdir: str | None, size: str, change: float, seed: int, frontend: str, keep: bool,
            as_json: bool) -> None:
    """Run Baton's main job on a throw-away file-backed disk: 3 nodes, kill -9 failovers, incremental backups,
    restore and check. Needs root (FUSE and loop devices). Takes well under a minute."""
    from baton.record.placement import parse_size

    if os.geteuid() != 0:
        raise DeviceError("the demo drives FUSE and loop devices: run it as root (make demo)")
    disk_size = parse_size(size)
    chunk = 64 * 1024
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="baton-demo-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    img, repo, restored = base / "shared-disk.img", base / "repo", base / "restored.img"
    run = base / "run"
    env = dict(os.environ, BATON_RUN_DIR=str(run), BATON_DEV_DIR=str(base / "dev"))
    name = f"demo{os.getpid()}"
    dev = str(base / "dev" / name)
    rng = random.Random(seed)
    _say(f"baton demo: seed {seed}, work directory {base}")
    rows: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    attached = False
    t_start = time.time()
    try:
        for p in (img, restored):
            p.unlink(missing_ok=True)
        shutil.rmtree(repo, ignore_errors=True)
        with open(img, "wb") as f:
            f.truncate(disk_size)
        init = _baton("init", str(img), "--chunk-size", "64K", env=env)
        data_size = int(init["data_size"])
        nchunks = data_size // chunk
        _baton("repo", "init", str(repo), env=env)
        _say(f"  created a {_fmt_bytes(disk_size)} shared disk (record: {init['record']}) and a repository")
        per_node = max(1, int(nchunks * change / 100))

        def attach(node: str) -> dict[str, Any]:
            nonlocal attached
            res = _baton("attach", str(img), "--node", node, "--name", name, "--frontend", frontend, env=env)
            attached = True
            return res

        def write(nwrites: int, wseed: int, kill_owner_after: float | None) -> int:
            log = base / f"writes-{wseed}.log"
            w = subprocess.Popen([sys.executable, "-c", WRITER, dev, str(wseed), str(nwrites), str(chunk),
                                  str(data_size), str(log)], stderr=subprocess.DEVNULL)
            procs.append(w)
            if kill_owner_after is not None:
                time.sleep(kill_owner_after)
                pid = json.loads((run / name / "daemon.json").read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                _say(f"    kill -9 of the owner's daemon (pid {pid}) while the writer was writing")
            try:
                w.wait(timeout=120)
            finally:
                if w.poll() is None:
                    w.kill()
                    w.wait()
            return len(log.read_text().split()) if log.exists() else 0

        def backup(node: str, label: str) -> None:
            t0 = time.time()
            res = _baton("backup", name, "--repo", str(repo), env=env)
            res["wall_s"] = time.time() - t0
            res["label"] = label
            rows.append(res)
            _say(f"    {node}: backup {res['snapshot'][:12]} {res['mode']}"
                 + (f" ({res['reason']})" if res["reason"] else "")
                 + f", read {_fmt_bytes(res['bytes_read'])} in {res['duration_s']:.2f} s")

        # Node A: initial content, first (full) backup, then writes until it is killed.
        _say("  node-a takes the disk and writes initial data")
        attach("node-a")
        write(nchunks // 16, rng.randrange(1 << 30), None)
        backup("node-a", "node-a, first backup")
        for i, (old, new) in enumerate([("node-a", "node-b"), ("node-b", "node-c")]):
            _say(f"  {old} rewrites {change:g}% of the chunks and is killed mid-way; {new} takes over")
            acked = write(per_node * 4, rng.randrange(1 << 30), kill_owner_after=0.4 + 0.2 * i)
            attached = False
            attach(new)
            acked2 = write(per_node, rng.randrange(1 << 30), None)
            _say(f"    writes acknowledged: {acked} by {old} before the kill, {acked2} by {new}")
            backup(new, f"{new}, after failover {i + 1}")
        # Restore the last snapshot and compare with the disk (quiet now: no writer is running).
        last = rows[-1]["snapshot"]
        _say(f"  restoring {last[:12]} and comparing it with the disk, byte for byte")
        t0 = time.time()
        _baton("restore", last, "--repo", str(repo), "--to", str(restored), env=env)
        restore_s = time.time() - t0
        same = _same(dev, str(restored), data_size)
        ver = subprocess.run([sys.executable, "-m", "baton", "verify", "--repo", str(repo), "--json"],
                             capture_output=True, text=True, env=env, timeout=300)
        _baton("detach", name, env=env)
        attached = False
    finally:
        for w in procs:
            if w.poll() is None:
                w.kill()
                w.wait()
        if attached:
            subprocess.run([sys.executable, "-m", "baton", "detach", name], env=env, capture_output=True,
                           timeout=120)
    full_rate = rows[0]["bytes_read"] / max(rows[0]["duration_s"], 1e-6)
    result = {"seed": seed, "workdir": str(base), "disk_size": data_size, "backups": rows,
              "restored_matches_disk": same, "restore_s": round(restore_s, 3), "verify_ok": ver.returncode == 0,
              "total_s": round(time.time() - t_start, 1)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(_table(rows, data_size, full_rate))
        click.echo(f"\nrestore of {last[:12]}: {'identical to the disk' if same else 'DIFFERS from the disk'} "
                   f"({restore_s:.2f} s); verify: {'ok' if ver.returncode == 0 else 'FAILED'}; "
                   f"total {result['total_s']} s")
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    else:
        _say(f"kept {base}")
    if not same:
        raise VerifyFailed("the restored snapshot differs from the disk")
    if ver.returncode != 0:
        raise VerifyFailed(f"repository verify failed: {ver.stderr.strip()}")


def _same(a: str, b: str, size: int) -> bool:
    step = 4 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while pos < size:
            n = min(step, size - pos)
            if fa.read(n) != fb.read(n):
                return False
            pos += n
    return True


def _table(rows: list[dict[str, Any]], disk: int, full_rate: float) -> str:
    hdr = f"{'backup':<26} {'mode':<12} {'read':>10} {'of disk':>8} {'time':>8} {'full read':>10}  reason"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(
            f"{r['label']:<26} {r['mode']:<12} {_fmt_bytes(r['bytes_read']):>10} "
            f"{100 * r['bytes_read'] / disk:>7.2f}% {r['duration_s']:>7.2f}s {disk / full_rate:>9.2f}s  "
            f"{r['reason'] or '-'}")
    lines.append(f"('full read': the time the first, full backup's rate needs for the whole {_fmt_bytes(disk)}"
                 " disk)")
    return "\n".join(lines)
