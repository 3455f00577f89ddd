"""`baton restore`: write a snapshot to a file or block device."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.cli.cmd_repo import json_option, key_option, open_repo, progress_bar, repo_option


@click.command("restore")
@click.argument("snapshot")
@repo_option
@click.option("--to", "target", required=True, metavar="TARGET", help="File or block device to write.")
@click.option("--allow-partial", is_flag=True,
              help="Also restore a checkpoint of an unfinished backup (NOT a point-in-time image).")
@click.option("--digest", is_flag=True,
              help="Also hash the whole restored image and report its BLAKE3-256 digest (equal to "
                   "`b3sum TARGET` for a file): one more pass over every byte, about 0.4 s of CPU per GiB.")
@key_option
@json_option
def command(snapshot: str, repo_url: str, target: str, allow_partial: bool, digest: bool, key_file: str | None,
            as_json: bool) -> None:
    """Restore SNAPSHOT (an id, a unique prefix of 6+ digits, or "latest") to TARGET.

    \b
    TARGET is a regular file (created or truncated; all-zero chunks are left as holes, so the file is
    sparse) or a block device at least as large as the disk (zero chunks are written as zeros).
    A target in use on this node is refused (exit 3) before anything is written, whatever path names
    it (a hard link, a symlink, a loop device over it): attached by Baton, mounted, behind a loop
    device, held by device-mapper or open by a process. A missing TARGET under /dev or Baton's device
    directory is refused (a device that is not there, e.g. /dev/baton/NAME of a disk not attached),
    never created as a file. If the restore fails, a file it created is removed; a TARGET that existed
    is left with undefined content.

    Every chunk is decrypted, decompressed and re-hashed against its id; a damaged chunk stops the restore
    (exit 7) and is named. The result reports the bytes written; with --digest also the BLAKE3-256 digest
    of the whole image, which equals `b3sum TARGET` for a file target of the same size (null in --json
    without --digest).
    """
    from baton.restore import restore

    repo = open_repo(repo_url, key_file)
    manifest = repo.get_snapshot(snapshot)
    with progress_bar(f"restore {manifest.snapshot_id[:8]}", not as_json) as prog:
        res = restore(repo, manifest, target, progress=prog, allow_partial=allow_partial, digest=digest)
    emit(res.to_json(), as_json,
         f"restored snapshot {res.snapshot} to {res.target}: {res.disk_size:,} bytes "
         f"({res.bytes_written:,} written, {res.zero_chunks} zero chunks) in {res.seconds}s"
         + (f"\nimage blake3 {res.image_digest}" if res.image_digest is not None else ""))
