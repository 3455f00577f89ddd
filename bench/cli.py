"""``python -m bench [--smoke] [--size 4G] [--reps 3] [--only incremental,tracking,full,scale,rollback,memory,guest] [--out DIR]``

Runs the selected benchmarks in order and writes, into ``--out`` (default ``bench/results``, or
``bench/results/smoke`` with ``--smoke``):

- ``latest.json``: every figure with samples, median and spread, ratios, machine, tool versions, commands;
- ``latest.md``: the summary tables;
- dated copies of both (``YYYYmmddTHHMMSSZ.json`` / ``.md``);
- plots: ``docs/img/*.png`` for a default run, ``OUT/img/*.png`` otherwise.

A full default run also refreshes the figures block of ``docs/performance.md``. Exit status: 0 when the results
were written (even if rows are unavailable), 2 on a bad argument, 1 when the run could not start.
Needs root (loop devices, FUSE, dropping caches).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import SCHEMA_VERSION, full, guest, incremental, memory, report, rollback, scale, tracking
from bench.batonctl import Baton
from bench.common import JSON, ColdCache, GiB, MiB, machine, parse_size, tool_versions, unavailable
from bench.context import Context

ROOT = Path(__file__).resolve().parents[1]
SECTIONS: dict[str, Callable[[Context], JSON]] = {
    "incremental": incremental.run,
    "tracking": tracking.run,
    "full": full.run,
    "scale": scale.run,
    "rollback": rollback.run,
    "memory": memory.run,
    "guest": guest.run,
}
OPT_IN = ("guest",)  # boots a QEMU guest for minutes: run only when named in --only
DEFAULT = [s for s in SECTIONS if s not in OPT_IN]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one repetition (CI: keeps it working)")
    p.add_argument("--size", default=None, help="disk image size for incremental, full and rollback (default 4G; smoke 32M)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 3; smoke 1)")
    p.add_argument("--only", default=",".join(DEFAULT), help="comma-separated subset of: " + ",".join(SECTIONS))
    p.add_argument("--out", default=None, help="results directory (default bench/results[/smoke])")
    p.add_argument("--scratch", default=None, help="scratch directory on the disk to measure (default: under /tmp)")
    p.add_argument("--baton", default=None, help="the baton executable to measure (default: the project's .venv)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render the markdown, plots and docs/performance.md from a results JSON")
    p.add_argument("--keep-scratch", action="store_true", help="leave the scratch directory for inspection")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"unknown benchmark(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    a.only = only
    try:
        a.size_bytes = parse_size(a.size) if a.size else (32 * MiB if a.smoke else 4 * GiB)
    except ValueError as e:
        p.error(str(e))
    if a.size_bytes < 16 * MiB or a.size_bytes % (64 * 1024):
        p.error("--size must be at least 16M and a multiple of 64K")
    a.reps = a.reps if a.reps is not None else (1 if a.smoke else 3)
    if a.reps < 1:
        p.error("--reps must be at least 1")
    return a


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM (and SIGINT, which a background shell job ignores by default) into an exception, so the
    # benchmarks' finally blocks detach disks, release loop devices and stop what they started.
    raise KeyboardInterrupt(f"signal {signum}")


def render(path: Path) -> int:
    """Re-render a finished run (markdown next to the JSON, plots, and docs/performance.md for a full run)."""
    results = json.loads(path.read_text())
    default = path.resolve().parent == (ROOT / "bench" / "results").resolve()
    img_dir = ROOT / "docs" / "img" if default and not results.get("smoke") else path.parent / "img"
    results["plots"] = report.plots(results, img_dir)
    md = report.markdown(results, img_dir, path.parent)
    path.with_suffix(".md").write_text(md)
    if default and not results.get("smoke") and set(results.get("sections", {})) == set(DEFAULT):
        report.update_performance_doc(ROOT / "docs" / "performance.md", results, md)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.render:
        return render(Path(a.render))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    if os.geteuid() != 0:
        print("bench: needs root (loop devices, FUSE, drop_caches); run `make bench` as root", file=sys.stderr)
        return 1
    # Bytecode for the project's sources, as an install writes it: with PYTHONDONTWRITEBYTECODE set (as in some
    # shells and CI images), an editable install never writes it, and every `baton` process the benchmark times
    # would compile each module changed since the last write from source (about 20 ms for the client's).
    compileall.compile_dir(str(ROOT / "src" / "baton"), quiet=1)
    default_out = not a.out
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / ("smoke" if a.smoke else "")
    img_dir = ROOT / "docs" / "img" if (default_out and not a.smoke) else out / "img"
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="baton-bench-", dir=a.scratch or "/tmp"))
    baton = Baton(scratch / "baton", a.baton)
    ctx = Context(scratch=scratch, baton=baton, cold=ColdCache(light=a.smoke), size=a.size_bytes, reps=a.reps, smoke=a.smoke)
    mach = machine(scratch)
    ctx.scratch_device = str(mach.get("scratch_device", ""))
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    results: JSON = {
        "schema": SCHEMA_VERSION,
        "command": command.strip(),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": a.smoke,
        "size_bytes": a.size_bytes,
        "reps": a.reps,
        "machine": mach,
        "tools": tool_versions(baton.exe),
        "sections": {},
    }
    ctx.log(f"scratch {scratch}; running {', '.join(a.only)}; size {a.size_bytes >> 20} MiB; reps {a.reps}")
    try:
        for name in a.only:
            t0 = time.monotonic()
            try:
                section = SECTIONS[name](ctx)
            except Exception as e:  # a bug in one benchmark must not lose the others' results
                section = unavailable(f"{type(e).__name__}: {e}")
            section["elapsed_s"] = round(time.monotonic() - t0, 1)
            results["sections"][name] = section
            ctx.log(f"{name}: done in {section['elapsed_s']} s (available={section.get('available')})")
    finally:
        baton.force_release()
        if not a.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    results["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["cold_cache"] = ctx.cold.statistics()
    results["baton_cli"] = baton.statistics()
    results["plots"] = report.plots(results, img_dir)
    md = report.markdown(results, img_dir, out)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=1, sort_keys=False, default=str)
    for fname in ("latest.json", f"{stamp}.json"):
        (out / fname).write_text(text + "\n")
    for fname in ("latest.md", f"{stamp}.md"):
        (out / fname).write_text(md)
    if default_out and not a.smoke and set(a.only) == set(DEFAULT):
        report.update_performance_doc(ROOT / "docs" / "performance.md", results, md)
    ctx.log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    return 0
