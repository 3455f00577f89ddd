"""Open repositories kept between operations in a long-lived process (the per-disk daemon).

Opening a repository and loading its chunk index is most of a small incremental's fixed cost. A
:class:`RepoCache` keeps each :class:`~baton.repo.repository.Repository` open; what other clients did in the
meantime (backups, forgets, prunes, lost index files) is caught up by :meth:`Repository.prepare_backup`, which
every backup calls under the repository's shared lock (two listings, no index reload).

An entry is keyed by URL and key file, and reopened when the key file changes (size, mtime or inode) or the
repository's ``config`` object is replaced (another repository initialised at the same URL). Thread-safe.
"""

from __future__ import annotations

import os
import threading

from baton.errors import BatonError
from baton.repo.repository import CONFIG_KEY, Repository, _resolve_key_file


def _key_file_stamp(key_file: str | None) -> tuple[int, int, int] | None:
    if not key_file:
        return None
    try:
        st = os.stat(key_file)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class RepoCache:
    """``get(url, key_file)`` returns an open Repository, the same object while it stays valid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str | None], tuple[Repository, object]] = {}
        self._stats = {"hits": 0, "opens": 0}

    def get(self, url: str, key_file: str | None = None) -> Repository:
        """An open repository at ``url``; the errors of :meth:`Repository.open` on a (re)open."""
        key_file = _resolve_key_file(key_file)
        k = (url, key_file)
        with self._lock:
            cached = self._repos.get(k)
        if cached is not None:
            repo, stamp = cached
            if stamp == self._stamp(repo, key_file):
                with self._lock:
                    self._stats["hits"] += 1
                return repo
        repo = Repository.open(url, key_file=key_file)
        with self._lock:
            old = self._repos.get(k)
            self._repos[k] = (repo, self._stamp(repo, key_file))
            self._stats["opens"] += 1
        if old is not None and old[0] is not repo:
            old[0].close()
        return repo

    @staticmethod
    def _stamp(repo: Repository, key_file: str | None) -> object:
        try:
            cfg = repo.store.stat(CONFIG_KEY)
            cfg_stamp: object = (cfg.size, cfg.mtime)
        except BatonError:  # gone or unreadable: reopen, which reports the problem
            cfg_stamp = None
        return (_key_file_stamp(key_file), cfg_stamp)

    def drop(self, url: str | None = None) -> None:
        """Forget (and close) every cached repository, or those at ``url``."""
        with self._lock:
            keys = [k for k in self._repos if url is None or k[0] == url]
            repos = [self._repos.pop(k)[0] for k in keys]
        for r in repos:
            r.close()

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats, open=len(self._repos))


_default: RepoCache | None = None
_default_lock = threading.Lock()


def repo_cache() -> RepoCache:
    """The process-wide cache (the daemon's)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RepoCache()
        return _default
