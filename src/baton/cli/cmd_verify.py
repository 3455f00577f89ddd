"""`baton verify`: check structure and re-hash every referenced chunk."""

from __future__ import annotations

import click

from baton.cli import emit, progress_bar
from baton.cli.cmd_repo import json_option, key_option, open_repo, repo_option
from baton.errors import VerifyFailed, exit_code


@click.command("verify")
@click.argument("snapshots", nargs=-1)
@repo_option
@key_option
@json_option
def command(snapshots: tuple[str, ...], repo_url: str, key_file: str | None, as_json: bool) -> int:
    """Verify the repository, or only the named SNAPSHOTS and the data they need.

    \b
    Checks every index file, manifest and index page; that every referenced chunk is indexed; that every
    pack holding one exists, hashes to its name and agrees with the index; and then reads, decrypts,
    decompresses and re-hashes every referenced chunk. There is no option to skip the re-hash.

    Exit status 0 when everything is intact, 9 when anything is missing or corrupt: the report names each
    damaged chunk, pack or page and the snapshots that need it.
    """
    from baton.verify import verify

    repo = open_repo(repo_url, key_file)
    with progress_bar("verify", not as_json) as prog:
        rep = verify(repo, snapshots, progress=prog)
    lines = [f"checked {len(rep.snapshots)} snapshots, {rep.pages} pages, {rep.chunks} chunks in {rep.packs} "
             f"packs ({rep.bytes_read:,} bytes) in {rep.seconds}s"]
    for p in rep.problems:
        who = f" needed by {', '.join(s[:12] for s in p.snapshots)}" if p.snapshots else ""
        lines.append(f"{p.kind}: {p.object}: {p.detail}{who}")
    lines.append("ok" if rep.ok else f"FAILED: {len(rep.problems)} problems")
    emit(rep.to_json(), as_json, "\n".join(lines))
    if not rep.ok:
        if not as_json:
            click.echo(f"baton: error: verify found {len(rep.problems)} problems", err=True)
        return exit_code(VerifyFailed("verify failed"))
    return 0
