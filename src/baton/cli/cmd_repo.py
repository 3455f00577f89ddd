"""`baton repo`: create and inspect repositories. Also the helpers the other repository commands share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from baton.cli import emit
from baton.cli import progress_bar as progress_bar  # re-exported: the repository commands import it from here
from baton.repo import Repository

KEY_FILE_HELP = ("File holding the repository key (64 hex digits, mode 0600). Also read from the "
                 "BATON_KEY_FILE environment variable. Needed for encrypted repositories.")


def repo_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--repo", "repo_url", required=True, envvar="BATON_REPO", metavar="URL",
                        help="Repository: a directory, file://PATH, s3://BUCKET/PREFIX (endpoint and credentials "
                             "from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) "
                             "or memory://NAME (tests). Also BATON_REPO.")(f)


def key_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--key-file", type=click.Path(dir_okay=False), envvar="BATON_KEY_FILE",
                        help=KEY_FILE_HELP)(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(f)


def open_repo(url: str, key_file: str | None) -> Repository:
    """Open the repository at ``url``; a URL no store can serve is refused first (exit 2 or 7, saying why)."""
    from baton.storage import check_url

    check_url(url)
    return Repository.open(url, key_file=key_file)


@click.group("repo")
def command() -> None:
    """Create or inspect a backup repository.

    A repository holds the snapshots of any number of disks. Chunks are deduplicated across snapshots and
    disks, compressed with zstd and, optionally, encrypted with AES-256-GCM.
    """


@command.command("init")
@click.argument("url")
@click.option("--encryption", type=click.Choice(["none", "aes-256-gcm"]), default="none", show_default=True,
              help="Encrypt chunks and metadata with AES-256-GCM under a key kept in --key-file.")
@key_option
@json_option
def init_cmd(url: str, encryption: str, key_file: str | None, as_json: bool) -> None:
    """Create a repository at URL.

    \b
    URL is a directory (created if missing), s3://BUCKET/PREFIX or memory://NAME.
    With --encryption aes-256-gcm, --key-file names the key: an existing file is used (it must not be
    readable by group or others), a missing one is created with a new random key and mode 0600.
    Keep a copy of the key file elsewhere: without it the repository cannot be read.

    \b
    Examples:
      baton repo init /backup/repo
      baton repo init s3://backups/cluster1 --encryption aes-256-gcm --key-file /etc/baton/repo.key
    """
    repo = Repository.init(url, encryption=encryption, key_file=key_file)
    out = {"url": url, "repo_id": repo.config.repo_id.hex(), "encryption": repo.config.encryption,
           "pack_target": repo.config.pack_target}
    emit(out, as_json, f"created repository {repo.config.repo_id.hex()} at {url} (encryption: {encryption})")


@command.command("info")
@click.argument("url")
@key_option
@json_option
def info_cmd(url: str, key_file: str | None, as_json: bool) -> None:
    """Show a repository's identity, object counts and locks."""
    from baton.repo.locks import list_locks

    repo = open_repo(url, key_file)
    counts: dict[str, list[int]] = {}
    for prefix in ("packs/", "index/", "pages/", "snapshots/"):
        objs = list(repo.store.list(prefix))
        counts[prefix.rstrip("/")] = [len(objs), sum(o.size for o in objs)]
    import time

    from baton.repo.locks import RepoLock

    locks = [lk.describe() + (" (stale)" if RepoLock.is_stale(lk, time.time()) else "")
             for lk in list_locks(repo.store)]
    out = {"url": url, "repo_id": repo.config.repo_id.hex(), "encryption": repo.config.encryption,
           "objects": {k: {"count": v[0], "bytes": v[1]} for k, v in counts.items()}, "locks": locks}
    human = "\n".join([f"repository {out['repo_id']} at {url}", f"encryption: {repo.config.encryption}"] +
                      [f"{k:10} {v[0]:8d} objects {v[1]:14,d} bytes" for k, v in counts.items()] +
                      [f"lock: {lk}" for lk in locks])
    emit(out, as_json, human)


@command.command("rebuild-index")
@click.argument("url")
@key_option
@json_option
def rebuild_index_cmd(url: str, key_file: str | None, as_json: bool) -> None:
    """Rebuild the chunk index from the packs' own tables.

    Use it when index files are lost or damaged (verify reports bad-index or missing-chunk while the packs
    are intact). Takes the exclusive lock. Packs whose tables fail their checks are listed and left alone.
    """
    from baton.repo.maintenance import rebuild_index

    res = rebuild_index(open_repo(url, key_file))
    emit(res.to_json(), as_json,
         "\n".join([f"indexed {res.entries} chunks from {res.packs} packs; replaced {res.index_files_replaced} "
                    f"index files"] + [f"bad pack: {b}" for b in res.bad_packs]))
