"""``python -m bench.indexmem --entries N``: memory and speed of the chunk index (baton.repo.chunkindex).

Loads N synthetic entries the way ``Repository.reload_index`` does (index files of ``--file-entries`` entries
staged with ``update(..., merge=False)``, then ``maybe_merge``), looks up present and absent ids, then adds
``--adds`` entries one at a time as a backup does (merges included, waited for). Prints one JSON object:

* ``*_cpu_s``: process CPU time of each phase (the load's without making the synthetic entries; the additions'
  with it), ``load_cpu_s_per_million``;
* ``lookup_present_us`` / ``lookup_absent_us``: CPU microseconds per ``get``;
* ``rss_peak_bytes_per_entry``: the peak resident set (``ru_maxrss``) above the one before the load, per
  entry (run one phase set per process: ``ru_maxrss`` only grows);
* with ``--tracemalloc``: the peak Python allocation of the load and of the additions, per entry (slower).

``--module FILE`` loads another implementation of the module (for example an older commit's, extracted with
``git show COMMIT:src/baton/repo/chunkindex.py > FILE``) to compare on the same machine; interleave the runs.
Synthetic ids are random bytes from a seeded generator (``--seed``); one pack per 512 entries.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import sys
import time
import tracemalloc
from types import ModuleType

from baton.format.repo_index import IndexEntry


def _module(path: str | None) -> ModuleType:
    if path is None:
        import baton.repo.chunkindex as ci
        return ci
    spec = importlib.util.spec_from_file_location("chunkindex_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"can't load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _batch(rng: random.Random, n: int, first: int, packs: dict[int, bytes]) -> list[tuple[bytes, IndexEntry]]:
    out = []
    for i in range(first, first + n):
        pid = packs.setdefault(i // 512, rng.randbytes(32))
        out.append((rng.randbytes(32), IndexEntry(pid, (i % 512) * 40000, 30000, 65536, 1)))
    return out


def run(entries: int, file_entries: int, adds: int, lookups: int, seed: int, trace: bool,
        module: str | None) -> dict[str, object]:
    ci = _module(module)
    rng = random.Random(seed)
    packs: dict[int, bytes] = {}
    sample: list[bytes] = []
    idx = ci.ChunkIndex()
    res: dict[str, object] = {"entries": entries, "file_entries": file_entries, "adds": adds,
                              "module": module or "baton.repo.chunkindex", "loadavg": os.getloadavg()}
    rss0 = _rss_kib()
    if trace:
        tracemalloc.start()
    t0 = time.process_time()
    gen = 0.0
    done = 0
    while done < entries:
        g = time.process_time()
        batch = _batch(rng, min(file_entries, entries - done), done, packs)
        gen += time.process_time() - g
        sample.append(batch[0][0])
        idx.update(batch, merge=False)
        done += len(batch)
        del batch
    idx.maybe_merge()
    idx.wait_merged()
    load = time.process_time() - t0 - gen
    res["load_cpu_s"] = round(load, 3)                # without making the synthetic entries
    res["load_cpu_s_per_million"] = round(load / max(entries, 1) * 1e6, 3)
    res["synthetic_entries_cpu_s"] = round(gen, 3)
    if trace:
        _cur, peak = tracemalloc.get_traced_memory()
        res["load_tracemalloc_peak_bytes_per_entry"] = round(peak / max(entries, 1), 2)
        tracemalloc.reset_peak()
    res["load_rss_peak_bytes_per_entry"] = round((_rss_kib() - rss0) * 1024 / max(entries, 1), 2)

    present = [sample[i % len(sample)] for i in range(lookups)] if sample else []
    absent = [rng.randbytes(32) for _ in range(lookups)]
    for name, ids in (("present", present), ("absent", absent)):
        t0 = time.process_time()
        found = sum(1 for cid in ids if idx.get(cid) is not None)
        dt = time.process_time() - t0
        res[f"lookup_{name}_us"] = round(dt / max(len(ids), 1) * 1e6, 3)
        res[f"lookup_{name}_found"] = found
    del present, absent, sample, ids

    t0 = time.process_time()
    for i in range(adds):
        pid = packs.setdefault((entries + i) // 512, rng.randbytes(32))
        idx[rng.randbytes(32)] = IndexEntry(pid, 0, 30000, 65536, 1)
    idx.wait_merged()
    res["adds_cpu_s"] = round(time.process_time() - t0, 3)
    if trace:
        _cur, peak = tracemalloc.get_traced_memory()
        res["adds_tracemalloc_peak_bytes_per_entry"] = round(peak / max(entries + adds, 1), 2)
        tracemalloc.stop()
    res["rss_peak_bytes_per_entry"] = round((_rss_kib() - rss0) * 1024 / max(entries + adds, 1), 2)
    res["len_ok"] = len(idx) == entries + adds if entries + adds <= 2_000_000 else None
    res["statistics"] = idx.statistics()
    res["merge_error"] = repr(idx.merge_error) if idx.merge_error else None
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.indexmem", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--file-entries", type=int, default=8192, help="entries per synthetic index file")
    p.add_argument("--adds", type=int, default=200_000, help="entries added one by one after the load")
    p.add_argument("--lookups", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tracemalloc", action="store_true", help="also measure the peak Python allocation")
    p.add_argument("--module", help="a chunkindex.py to measure instead of the installed one")
    a = p.parse_args(argv)
    print(json.dumps(run(a.entries, a.file_entries, a.adds, a.lookups, a.seed, a.tracemalloc, a.module)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
