"""``python -m bench.indexcache --entries N DIR``: a new process's first ``prepare_backup`` with and without the
node-local chunk-index cache (baton.repo.indexcache).

Builds (once, in ``DIR/repo-N``; its index files listed in ``DIR/repo-N.index-files``) a local repository holding N synthetic index entries in index files of
``--file-entries`` entries (one pack id per 512 entries; the packs themselves are not written, so this measures
loading only and the repository is good for nothing else). Then, ``--rounds`` times, alternating, runs one
child process per case, each doing ``Repository.open(url).prepare_backup()`` and reporting its wall and CPU time:

* ``cold``: ``BATON_INDEX_CACHE=off`` (every index file decoded: the behaviour without the cache), the cache
  directory emptied before; after the measured load the cache is turned on and the first save of what was
  loaded is timed (``save_first_*``; a real process does it in a background thread);
* ``warm``: the cache in ``DIR/cache-N`` the cold child saved, nothing new since; after the measured load one
  index file of ``--new-entries`` entries is written and the save a backup's commit does is timed
  (``save_commit_*``);
* ``warm+1``: as warm, and one more index file of ``--new-entries`` entries written since the save.

Order per round: cold, warm, warm+1; the index files a round's warm cases added are deleted before the next
round starts, so each round measures the same repository. Prints one JSON object with each
figure's median, min and max, and the load average before and after.

``--backup-size BYTES``: real backups instead. A synthetic disk (64 KiB chunks, about 29 % of them zero, the
rest incompressible) is backed up in full once into ``DIR/backup-repo-BYTES``; then, alternating, incrementals
of ``--changed`` (1 %) of its chunks, each in a new process from ``Repository.open`` to ``commit``: ``cold``
without the cache, ``warm`` with the cache as the previous owner's commit left it (a process that loads the
index and saves it runs first, unmeasured). Reports each one's wall and CPU time and those of its
``open_prepare`` part (open, then the writer's ``prepare_backup``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from baton.format.repo_index import IndexEntry


def _entries(rng: random.Random, n: int, first: int, packs: dict[int, bytes]) -> list[tuple[bytes, IndexEntry]]:
    out = []
    for i in range(first, first + n):
        pid = packs.setdefault(i // 512, rng.randbytes(32))
        out.append((rng.randbytes(32), IndexEntry(pid, (i % 512) * 40000, 30000, 65536, 1)))
    return out


def build(url: str, entries: int, file_entries: int, seed: int) -> None:
    from baton.repo import Repository

    repo = Repository.init(url)
    rng = random.Random(seed)
    packs: dict[int, bytes] = {}
    for first in range(0, entries, file_entries):
        repo.write_index_file(_entries(rng, min(file_entries, entries - first), first, packs))


def child(url: str, case: str, new_entries: int) -> dict[str, object]:
    from baton.repo import Repository

    out: dict[str, object] = {"case": case}
    if case == "warm+1":
        Repository.open(url).write_index_file(_entries(random.Random(time.time_ns()), new_entries, 0, {}))
    w0, c0 = time.perf_counter(), time.process_time()
    repo = Repository.open(url)
    repo.prepare_backup()
    out["wall_s"] = time.perf_counter() - w0
    out["cpu_s"] = time.process_time() - c0
    if case == "cold":      # the first save of what was loaded, timed in this thread (a real process does it
        del os.environ["BATON_INDEX_CACHE"]   # in a background thread as soon as the load ends)
        w0, c0 = time.perf_counter(), time.process_time()
        repo.save_index_cache()
        out["save_first_wall_s"] = time.perf_counter() - w0
        out["save_first_cpu_s"] = time.process_time() - c0
    repo.wait_index_cache_saved()
    if case == "warm":
        repo.write_index_file(_entries(random.Random(time.time_ns()), new_entries, 0, {}))
        w0, c0 = time.perf_counter(), time.process_time()
        repo.save_index_cache()
        out["save_commit_wall_s"] = time.perf_counter() - w0
        out["save_commit_cpu_s"] = time.process_time() - c0
    st = repo.statistics()
    out.update({k: st[k] for k in ("index_files_loaded", "index_files_from_cache", "index_cache_hits",
                                   "index_cache_saves", "index_cache_save_failed", "index_entries")})
    return out


# ----- --backup: real incrementals -------------------------------------------------------------------------------

CHUNK = 64 << 10


def _chunk(i: int, version: int) -> bytes:
    """Chunk ``i`` of the synthetic disk: zero for about 29 % of the chunks (as in bench.diskgen's image), else
    incompressible bytes that depend on the chunk and its version."""
    import blake3

    if blake3.blake3(i.to_bytes(8, "little")).digest()[0] < 74:
        return bytes(CHUNK)
    return blake3.blake3(i.to_bytes(8, "little") + version.to_bytes(8, "little")).digest(length=CHUNK)


def build_backup(url: str, size: int) -> None:
    from baton.repo import BackupWriter, DiskIdentity, Repository

    repo = Repository.init(url)
    disk = DiskIdentity("bench", size, CHUNK)
    w = BackupWriter(repo, disk, parent=None, node="n1", mode="full", reason="bench", lineage="L")
    for i in range(disk.chunk_count):
        w.put(i, _chunk(i, 0))
    w.commit({})


def child_backup(url: str, version: int, changed: float) -> dict[str, object]:
    """One incremental of ``changed`` of the chunks (chosen by ``version``), in this new process."""
    from baton.repo import BackupWriter, DiskIdentity, Repository

    w0, c0 = time.perf_counter(), time.process_time()
    repo = Repository.open(url)
    parent = repo.snapshots()[-1]
    disk = DiskIdentity("bench", parent.disk.size, CHUNK)
    w = BackupWriter(repo, disk, parent=parent, node="n2", mode="incremental", reason="bench", lineage="L")
    prep_wall, prep_cpu = time.perf_counter() - w0, time.process_time() - c0
    n = disk.chunk_count
    for i in sorted(random.Random(version).sample(range(n), max(1, int(n * changed)))):
        w.put(i, _chunk(i, version))
    w.commit({})
    st = repo.statistics()
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "open_prepare_wall_s": prep_wall,
            "open_prepare_cpu_s": prep_cpu, "index_files_loaded": st["index_files_loaded"],
            "index_files_from_cache": st["index_files_from_cache"], "index_entries": st["index_entries"]}


def main_backup(a: argparse.Namespace) -> None:
    size = int(a.backup_size)
    url = os.path.join(a.dir, f"backup-repo-{size}")
    cache = os.path.join(a.dir, f"backup-cache-{size}")
    os.makedirs(cache, exist_ok=True)
    if not os.path.isdir(url):
        build_backup(url, size)
    load0 = os.getloadavg()
    runs: dict[str, list[dict[str, object]]] = {}
    version = int(time.time())
    for _ in range(a.rounds):
        for case in ("cold", "warm"):
            env = dict(os.environ, BATON_CACHE_DIR=cache)
            if case == "cold":
                env["BATON_INDEX_CACHE"] = "off"
            else:   # the previous owner saved its cache after its commit: a process that loads and saves
                subprocess.run([sys.executable, "-c", "import sys; from baton.repo import Repository; "
                                "Repository.open(sys.argv[1]).chunk_index()", url], env=env, check=True)
            version += 1
            res = subprocess.run([sys.executable, "-m", "bench.indexcache", "--child", f"backup:{version}",
                                  "--changed", str(a.changed), url], env=env, capture_output=True, text=True,
                                 check=True)
            runs.setdefault(case, []).append(json.loads(res.stdout))
    _report({"disk_size": size, "changed": a.changed, "rounds": a.rounds, "loadavg_before": load0,
             "loadavg_after": os.getloadavg()}, runs)


def _report(report: dict[str, object], runs: dict[str, list[dict[str, object]]]) -> None:
    for case, rs in runs.items():
        figures: dict[str, object] = {}
        for k in rs[0]:
            vals = [r[k] for r in rs]
            if all(isinstance(v, float) for v in vals):
                fl = [float(str(v)) for v in vals]
                figures[k] = {"median": round(statistics.median(fl), 4), "min": round(min(fl), 4),
                              "max": round(max(fl), 4)}
            elif k != "case":
                figures[k] = vals[-1]
        report[case] = figures
    print(json.dumps(report, indent=1))


def _run(url: str, cache: str, case: str, new_entries: int) -> dict[str, object]:
    env = dict(os.environ, BATON_CACHE_DIR=cache)
    if case == "cold":
        env["BATON_INDEX_CACHE"] = "off"
    res = subprocess.run([sys.executable, "-m", "bench.indexcache", "--child", case, "--new-entries",
                          str(new_entries), url], env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(res.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--file-entries", type=int, default=2600)
    ap.add_argument("--new-entries", type=int, default=655, help="entries of a later backup's index file")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backup-size", type=int, help="instead: real 1 %% incrementals (--changed) of a synthetic "
                    "disk of this many bytes, backed up in full once, each in a new process, cold and warm")
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child and a.child.startswith("backup:"):
        print(json.dumps(child_backup(a.dir, int(a.child.split(":")[1]), a.changed)))
        return
    if a.child:
        print(json.dumps(child(a.dir, a.child, a.new_entries)))
        return
    if a.backup_size:
        main_backup(a)
        return
    url = os.path.join(a.dir, f"repo-{a.entries}")
    cache = os.path.join(a.dir, f"cache-{a.entries}")
    os.makedirs(cache, exist_ok=True)
    listing = url + ".index-files"       # the index files as built (later runs' additions are removed)
    if not os.path.isdir(url):
        build(url, a.entries, a.file_entries, a.seed)
        with open(listing, "w") as out:
            out.write("\n".join(sorted(os.listdir(os.path.join(url, "index")))))
    load0 = os.getloadavg()
    runs: dict[str, list[dict[str, object]]] = {}
    index_dir = os.path.join(url, "index")
    with open(listing) as src:
        built = set(src.read().split())
    for _ in range(a.rounds):
        for f in set(os.listdir(index_dir)) - built:   # the files a round's warm cases added
            os.unlink(os.path.join(index_dir, f))
        for case in ("cold", "warm", "warm+1"):
            if case == "cold":
                where = os.path.join(cache, "chunk-index")
                for f in os.listdir(where) if os.path.isdir(where) else []:
                    os.unlink(os.path.join(where, f))
            runs.setdefault(case, []).append(_run(url, cache, case, a.new_entries))
    _report({"entries": a.entries, "file_entries": a.file_entries, "rounds": a.rounds, "loadavg_before": load0,
             "loadavg_after": os.getloadavg()}, runs)


if __name__ == "__main__":
    main()
