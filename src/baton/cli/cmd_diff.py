"""`baton diff`: the changed extents between two snapshots of one disk."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.cli.cmd_repo import json_option, key_option, open_repo, repo_option


def human_size(n: int) -> str:
    """1536 -> "1.5 KiB" (binary units, one decimal; bytes below 1 KiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


@click.command("diff")
@click.argument("snap_a", metavar="SNAP_A")
@click.argument("snap_b", metavar="SNAP_B")
@repo_option
@key_option
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Extents listed in the text output (0: all). --json always lists every extent.")
@json_option
def command(snap_a: str, snap_b: str, repo_url: str, key_file: str | None, limit: int, as_json: bool) -> None:
    """List the byte extents that differ between snapshots SNAP_A and SNAP_B of the same disk.

    \b
    SNAP_A and SNAP_B are snapshot ids, unique prefixes of 6 or more hex digits, or "latest". Both must be
    of the same disk (same disk uuid, size and chunk size); otherwise the command fails with exit 2.
    Chunks are compared by content id: the two snapshots' index trees are walked together and every
    subtree with the same page id on both sides is skipped without being read, so a diff costs what
    changed between the two, not the size of the disk. Nothing is read from the disk itself and no chunk
    data is fetched; only index pages are.

    \b
    Output (text): one line per extent, "OFFSET  LENGTH  (human size)", merged over consecutive changed
    chunks, then the total. --json prints {"snapshot_a", "snapshot_b", "disk_uuid", "disk_size",
    "chunk_size", "extents": [{"offset", "length"}], "changed_chunks", "changed_bytes",
    "changed_fraction", "pages_read", "partial", "seconds"}; "partial" lists a side that is a checkpoint
    of an unfinished backup (not a point-in-time image).

    \b
    Errors: an unknown or ambiguous snapshot (exit 7), snapshots of two disks or sizes (exit 2), a
    missing repository (exit 7), a damaged index page (exit 7, named; run `baton verify`).

    \b
    Example:
      baton diff 3f2a9c 7be1d0 --repo /backup/repo
    """
    from baton.diff import diff

    repo = open_repo(repo_url, key_file)
    a = repo.get_snapshot(snap_a)
    b = repo.get_snapshot(snap_b)
    res = diff(repo, a, b)
    lines = [f"diff {a.snapshot_id[:12]} -> {b.snapshot_id[:12]}  disk {a.disk.name or a.disk.disk_uuid}  "
             f"({human_size(res.disk_size)}, {human_size(res.chunk_size)} chunks)"]
    shown = res.extents if not limit else res.extents[:limit]
    lines += [f"{off:>16,d}  {length:>14,d}  ({human_size(length)})" for off, length in shown]
    if len(shown) < len(res.extents):
        lines.append(f"... {len(res.extents) - len(shown)} more extents (--limit 0 or --json lists them all)")
    pct = 100.0 * res.changed_bytes / res.disk_size if res.disk_size else 0.0
    lines.append(f"total: {res.changed_bytes:,} bytes ({human_size(res.changed_bytes)}, {pct:.2f} % of the disk) "
                 f"in {len(res.extents)} extents, {res.changed_chunks} chunks; {res.pages_read} index pages read")
    for sid in res.partial:
        lines.append(f"note: {sid[:12]} is a checkpoint of an unfinished backup, not a point-in-time image")
    emit(res.to_json(), as_json, "\n".join(lines))
