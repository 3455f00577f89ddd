"""Benchmark 7: memory of the daemon and the backup for a large disk with 10 % changed (issue 12's target:
"the daemon and the backup together under 150 MiB for a 1 TiB disk with 10 % changed").

The disk is a sparse image of ``SIZE`` (1 TiB; 256 MiB in smoke runs; ``BENCH_MEMORY_SIZE`` sets another)
with 64 KiB chunks. What is measured:

1. **Seed.** ``FRACTION`` (10 %) of its chunks, in runs of 1-64 chunks at random places, get one 4 KiB page of
   unique content at their start (the rest of each chunk is a hole): every such chunk is a distinct chunk for
   the repository, while the image holds only 4 KiB per chunk. The image lives on a tmpfs the section mounts
   for itself (6.4 GiB at 1 TiB): on ext4, 1.6 M scattered 4 KiB extents took this machine's disk about 5
   minutes per backup to read and minutes to unlink (a discard per extent). ``baton init``, ``baton repo
   init``, ``baton attach`` (FUSE), then a full backup through the daemon.
2. **Changes.** The disk is detached; the same 10 % of the chunks (a hot set) get a new unique page, written
   to the image directly, and are marked in the disk's record by a node ``B`` through the record API
   (``attach``, ``mark``, ``detach``), as its tracker would have while it owned the disk. Writing 1.6 M
   scattered pages through a tracked device would take most of an hour (each newly marked chunk waits for a
   durable record write); the marking is the record's own code, so the backup sees exactly what a failover
   after those writes leaves.
3. **Incremental after failover.** Node ``C`` attaches (a new daemon process, so its peak RSS covers only the
   attach and this backup) and backs up. Reported: the backup's JSON (mode, chunks read, timings,
   ``peak_rss_bytes`` of the daemon), the daemon's CPU seconds during the backup (``daemon_cpu_s``), the
   client's own peak RSS (VmHWM, sampled), and their sum: the figure the target names.

The repository then holds the seed's chunks plus the changed ones (2 x 10 % of the disk's chunks). The chunk
index's RAM per stored chunk is reported by ``python -m bench.indexmem`` (up to 16.8 M chunks, a full TiB of
unique data); docs/performance.md combines the two.

Restores are not part of this section: the content of every backup is checked by the test tiers.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from bench.common import JSON, GiB, KiB, MiB, StepFailed, TiB, check, parse_size, proc_rss, unavailable
from bench.common import run as run_cmd
from bench.context import Context
from bench.diskgen import Stream

CHUNK = 64 * KiB
PAGE = 4 * KiB
SIZE = 1 * TiB
SMOKE_SIZE = 256 * MiB
FRACTION = 0.10
NAME = "bench-memory"
TARGET_BYTES = 150 * MiB
BACKUP_TIMEOUT_S = 3600.0
SIZE_ENV = "BENCH_MEMORY_SIZE"  # another disk size for this section (e.g. 64G while trying a change)


def runs_covering(rng: random.Random, n_chunks: int, want: int) -> list[int]:
    """Sorted distinct chunk numbers, about ``want`` of them, in runs of 1-64 chunks at random places."""
    picked: set[int] = set()
    while len(picked) < want:
        start = rng.randrange(n_chunks)
        picked.update(range(start, min(n_chunks, start + rng.randint(1, 64))))
    return sorted(picked)


def write_pages(img: Path, chunks: list[int], label: str, seed: int) -> JSON:
    """One unique 4 KiB page at the start of each chunk (16 pseudo-random bytes and a pattern, so it compresses),
    through the page cache (1.6 M small O_DIRECT writes into a sparse file took minutes); fsync before
    returning. The pages stay cached: this section measures memory, not reads (from a cold cache, 1.6 M
    scattered 4 KiB reads took this machine's disk about 5 minutes per backup)."""
    rand = Stream(seed, label)
    tail = (label.encode() * PAGE)[:PAGE - 16]
    noise = rand.read(16 * len(chunks))
    t0 = time.perf_counter()
    fd = os.open(img, os.O_WRONLY)
    try:
        for i, c in enumerate(chunks):
            if os.pwrite(fd, noise[16 * i:16 * i + 16] + tail, c * CHUNK) != PAGE:
                raise OSError(f"short write at chunk {c} of {img}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"chunks": len(chunks), "write_s": round(time.perf_counter() - t0, 3)}


def mark_as_node(img: Path, node: str, chunks: list[int]) -> JSON:
    """Mark ``chunks`` in the image's record as ``node``, the way its tracker would have (attach, mark, detach)."""
    from baton.record.placement import locate

    t0 = time.perf_counter()
    loc = locate(str(img), writable=True)
    try:
        loc.record.attach(node)
        for i in range(0, len(chunks), 65536):
            loc.record.mark(chunks[i:i + 65536])
        loc.record.detach()
    finally:
        loc.close()
    return {"node": node, "chunks": len(chunks), "mark_s": round(time.perf_counter() - t0, 3)}


def _proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process so far (/proc/PID/stat), or None."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _backup_row(ctx: Context, repo: Path, img: Path, daemon_pid: int | None) -> JSON:
    b = ctx.baton
    cpu0 = _proc_cpu_s(daemon_pid)
    out, m = b.backup(NAME, str(repo), timeout=BACKUP_TIMEOUT_S)
    cpu1 = _proc_cpu_s(daemon_pid)
    daemon_peak = proc_rss(daemon_pid, "VmHWM") if daemon_pid else None
    reported = out.get("peak_rss_bytes")
    row: JSON = {k: out.get(k) for k in ("mode", "reason", "chunks_read", "bytes_read", "bytes_stored",
                                         "chunks_stored", "zero_chunks", "holes_skipped_bytes", "duration_s",
                                         "plan_s", "read_s", "store_s", "commit_s")}
    # The client's own peak (VmHWM): its ru_maxrss would count this benchmark's RSS at fork time.
    client = m.hwm_bytes
    row.update({"wall_s": round(m.wall_s, 3), "client_cpu_s": round(m.cpu_s, 3),
                "client_peak_rss_bytes": client, "client_ru_maxrss_bytes": m.peak_rss_bytes,
                "daemon_peak_rss_bytes": daemon_peak, "reported_peak_rss_bytes": reported, "command": m.command,
                # the daemon's CPU during this backup (it also serves the FUSE device, idle here)
                "daemon_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None})
    daemon = daemon_peak if isinstance(daemon_peak, int) else reported
    row["together_bytes"] = daemon + client if isinstance(daemon, int) and isinstance(client, int) else None
    return row


def run(ctx: Context) -> JSON:
    """Run the section; returns its figures (or the reason it is unavailable)."""
    d = ctx.subdir("memory")
    size = parse_size(os.environ[SIZE_ENV]) if os.environ.get(SIZE_ENV) else (SMOKE_SIZE if ctx.smoke else SIZE)
    n_chunks = size // CHUNK
    mnt, repo = d / "tmpfs", d / "repo"
    img = mnt / "disk.img"
    rng = random.Random(ctx.seed)
    section: JSON = {"available": True, "size_bytes": size, "chunk_size": CHUNK, "changed_fraction": FRACTION,
                     "target_bytes": TARGET_BYTES}
    b = ctx.baton
    attached = False
    mounted = False
    try:
        mnt.mkdir(exist_ok=True)
        pages = int(n_chunks * FRACTION) + 64
        check(["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE + 64 * MiB},mode=0700", "baton-bench", str(mnt)])
        mounted = True
        with open(img, "wb") as f:
            f.truncate(size)
        used = runs_covering(rng, n_chunks, int(n_chunks * FRACTION))
        ctx.log(f"memory: {size / GiB:g} GiB sparse disk, seeding {len(used):,} chunks")
        section["seed_write"] = write_pages(img, used, "seed", ctx.seed)
        b.init(img, "64K")
        b.repo_init(str(repo))
        st, _m = b.attach(img, "A", NAME, frontend="fuse")
        attached = True
        ctx.log("memory: full backup of the seed")
        section["seed_backup"] = _backup_row(ctx, repo, img, st.get("pid") if isinstance(st.get("pid"), int) else None)
        b.detach(NAME)
        attached = False
        changed = used  # the same hot 10 %, rewritten: the tmpfs holds one page per chunk
        ctx.log(f"memory: {len(changed):,} chunks changed by node B, then failover to node C")
        section["changes"] = {**write_pages(img, changed, "changes", ctx.seed + 1), **mark_as_node(img, "B", changed)}
        st, m = b.attach(img, "C", NAME, frontend="fuse")
        attached = True
        pid = st.get("pid") if isinstance(st.get("pid"), int) else None
        section["attach"] = {"wall_s": round(m.wall_s, 3),
                             "daemon_rss_bytes": proc_rss(pid) if pid else None}
        ctx.log("memory: incremental backup after the failover")
        inc = section["incremental"] = _backup_row(ctx, repo, img, pid)
        together = inc.get("together_bytes")
        section["target_met"] = together < TARGET_BYTES if isinstance(together, int) else None
        if inc.get("mode") != "incremental":
            section["note"] = f"the backup after the failover was {inc.get('mode')}, not incremental"
    except (StepFailed, OSError) as e:
        section.update(unavailable(str(e)[-1200:]))
    finally:
        if attached:
            notes = b.cleanup(NAME)
            if notes:
                section["cleanup"] = notes
        if mounted:
            img.unlink(missing_ok=True)
            run_cmd(["umount", str(mnt)], timeout=120)
        shutil.rmtree(repo, ignore_errors=True)
    return section


def _mib(v: object) -> str:
    return f"{v / MiB:.0f} MiB" if isinstance(v, int) else "n/a"


def markdown(s: JSON) -> list[str]:
    """The section's table."""
    lines = [f"## 7. Memory: daemon and backup, {s.get('size_bytes', 0) / GiB:g} GiB disk, "
             f"{100 * s.get('changed_fraction', 0):.0f} % changed", ""]
    if not s.get("available", True):
        return [*lines, f"Unavailable: {str(s.get('error', '')).splitlines()[0][:300]}", ""]
    lines += ["| backup | mode | chunks read | wall s | daemon peak RSS | client peak RSS | together |",
              "|---|---|---|---|---|---|---|"]
    for key in ("seed_backup", "incremental"):
        r = s.get(key) or {}
        lines.append(f"| {key} | {r.get('mode')} | {r.get('chunks_read')} | {r.get('wall_s')} | "
                     f"{_mib(r.get('daemon_peak_rss_bytes'))} | {_mib(r.get('client_peak_rss_bytes'))} | "
                     f"{_mib(r.get('together_bytes'))} |")
    met = s.get("target_met")
    lines += ["", f"Target: daemon and backup together under {_mib(s.get('target_bytes'))}: "
              f"{'n/a' if met is None else ('met' if met else 'MISSED')}.", ""]
    if s.get("note"):
        lines += [f"Note: {s['note']}", ""]
    return lines
