"""The body of ``baton backup`` without the parser: :func:`run` is what the click command
(:mod:`baton.cli.cmd_backup`) calls after parsing, and what :func:`baton.cli.main` calls straight away for
the plain forms :func:`fast_args` recognises, without importing click.

Why: ``baton backup NAME --repo URL`` is what a cluster's backup timer runs, on every node (``--if-owner``),
and on the owner it is one request to the disk's daemon. Importing click (with ``inspect``, ``typing`` and
``enum``) cost about 35 ms of a 1 % incremental's ~0.35 s, more than the daemon's commit.

The fast path is only a recogniser: any argument it does not know for certain (another option, ``--help``,
a repeated option, ``--opt=`` forms of flags, ``--``, a value that starts with ``-``, no repository) leaves
the whole command line to click, which parses and reports it as always. Both paths end in :func:`run`, so
what is sent, printed and returned cannot differ (tests/unit/test_client_request_path.py runs both).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from baton.cli.common import emit, progress_bar

# Options of `baton backup` the fast path takes, each as (keyword of run(), environment variable): the same
# names and variables as the click command's declaration in baton.cli.cmd_backup.
VALUE_OPTIONS = {"--repo": ("repo", "BATON_REPO"), "--key-file": ("key_file", "BATON_KEY_FILE")}
FLAG_OPTIONS = {"--full": "full", "--if-owner": "if_owner", "--json": "as_json"}


def fast_args(args: list[str]) -> dict[str, Any] | None:
    """The keyword arguments of :func:`run` for ``baton backup ARGS`` when ARGS are only a TARGET, ``--repo``
    and ``--key-file`` (``--opt VALUE`` or ``--opt=VALUE``), ``--full``, ``--if-owner`` and ``--json``, each at
    most once, with the repository given or in BATON_REPO; None for anything else (click then parses it)."""
    kw: dict[str, Any] = {"target": None, "repo": None, "key_file": None, "full": False, "if_owner": False,
                          "as_json": False}
    seen: set[str] = set()
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if name in VALUE_OPTIONS and name not in seen:
            if not eq:
                if i + 1 >= len(args):
                    return None
                i += 1
                value = args[i]
            if not value or value.startswith("-"):
                return None
            kw[VALUE_OPTIONS[name][0]] = value
            seen.add(name)
        elif a in FLAG_OPTIONS and a not in seen:
            kw[FLAG_OPTIONS[a]] = True
            seen.add(a)
        elif a and not a.startswith("-") and kw["target"] is None:
            kw["target"] = a
        else:
            return None
        i += 1
    for opt, (key, env) in VALUE_OPTIONS.items():
        if opt not in seen:
            kw[key] = os.environ.get(env) or None
    if kw["target"] is None or kw["repo"] is None:
        return None
    kw["node"] = os.environ.get("BATON_NODE") or None
    return kw


def _human(r: dict[str, Any]) -> str:
    mib = 1 << 20
    why = f" ({r['reason']})" if r["reason"] else ""
    return (f"snapshot {r['snapshot']}  {r['mode']}{why}\n"
            f"read {r['bytes_read'] / mib:.1f} MiB of {r['disk_size'] / mib:.1f} MiB "
            f"({r['chunks_read']} chunks, {r['chunks_changed']} changed), stored {r['bytes_stored'] / mib:.1f} MiB, "
            f"{r['duration_s']:.2f} s on {r['node']}" + "".join(
                f"\n{k}: exit {h['exit_status']} in {h['seconds']} s" for k, h in r.get("consistency", {}).items()
                if k in ("pre", "post")) + (f"\nfrozen {r['consistency']['freeze']['mountpoint']} for "
                                            f"{r['consistency']['freeze']['window_s']} s"
                                            if r.get("consistency", {}).get("freeze") else ""))


def run(target: str, repo: str, *, key_file: str | None = None, full: bool = False, if_owner: bool = False,
        node: str | None = None, record: str | None = None, consistency: dict[str, Any] | None = None,
        as_json: bool = False) -> None:
    """Back TARGET up into ``repo`` (:func:`baton.daemon.client.backup`) and print the result."""
    from baton.daemon.client import backup
    from baton.storage import check_url

    check_url(repo)
    with progress_bar(f"backup {target}", not as_json) as bar:
        res = backup(target, repo, node=node or socket.gethostname(), key_file=key_file, full=full,
                     if_owner=if_owner, record=record, progress=bar, consistency=consistency)
    if res.get("skipped"):
        emit(res, as_json)  # --if-owner on a node that does not own the disk: exit 0, quiet without --json
    else:
        emit(res, as_json, _human(res))
