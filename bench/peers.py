"""restic and borg, driven the way an operator backing up a disk image would drive them.

Settings (also recorded in every result through the exact commands):

- restic: repository format 2 with its default compression ``auto`` and its mandatory encryption; its own
  content-defined chunker. Password from the environment; its cache lives in the scratch directory.
- borg: ``--encryption none`` (its fastest mode), ``--compression lz4`` (its default), and
  ``--chunker-params fixed,65536``: the fixed 64 KiB chunker matches Baton's chunk size on a block image, which
  is borg's best case here (the peer notes measured it ahead of buzhash on both full and incremental runs).

Both back up the disk's backing file, not ``/dev/baton/NAME``, so the peers do not pay for Baton's frontend.
Each method returns the :class:`~bench.common.Measured` run and raises StepFailed when the tool fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import JSON, Measured, StepFailed, check, tree_bytes

BORG_CHUNKER = "fixed,65536"


def available(tool: str) -> bool:
    return shutil.which(tool) is not None


class Restic:
    """One restic repository under ``root``."""

    def __init__(self, root: Path) -> None:
        self.repo = root / "restic-repo"
        self.env = {
            "RESTIC_PASSWORD": "baton-bench",
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_CACHE_DIR": str(root / "restic-cache"),
        }
        self.runs = 0

    def _run(self, *args: str, cwd: Path | None = None, timeout: float = 3600) -> Measured:
        if not available("restic"):
            raise StepFailed("restic is not installed (scripts/setup.sh bench installs it)")
        self.runs += 1
        return check(["restic", *args], env=self.env, cwd=cwd, timeout=timeout)

    def init(self) -> Measured:
        return self._run("init", "--repository-version", "2")

    def backup(self, path: Path) -> tuple[Measured, JSON]:
        """Back up one file; returns the run and restic's JSON summary (data_added etc.)."""
        m = self._run("backup", "--json", "--host", "bench", str(path))
        summary: JSON = {}
        for line in m.stdout.splitlines():
            if '"message_type":"summary"' in line.replace(" ", ""):
                summary = json.loads(line)
        return m, summary

    def restore(self, target: Path) -> Measured:
        return self._run("restore", "latest", "--host", "bench", "--target", str(target))

    def check_read_data(self) -> Measured:
        return self._run("check", "--read-data")

    def size(self) -> int:
        return tree_bytes(self.repo)

    def statistics(self) -> JSON:
        return {"runs": self.runs, "repo_bytes": self.size()}


class Borg:
    """One borg repository under ``root`` (its config, cache and security dirs live there too)."""

    def __init__(self, root: Path) -> None:
        self.repo = root / "borg-repo"
        base = root / "borg-home"
        base.mkdir(parents=True, exist_ok=True)
        self.env = {
            "BORG_REPO": str(self.repo),
            "BORG_BASE_DIR": str(base),
            "BORG_PASSPHRASE": "",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }
        self.archives = 0
        self.runs = 0

    def _run(self, *args: str, cwd: Path | None = None, timeout: float = 3600) -> Measured:
        if not available("borg"):
            raise StepFailed("borg is not installed (scripts/setup.sh bench installs borgbackup)")
        self.runs += 1
        return check(["borg", *args], env=self.env, cwd=cwd, timeout=timeout)

    def init(self) -> Measured:
        return self._run("init", "--encryption", "none")

    def create(self, path: Path) -> tuple[Measured, JSON]:
        """A new archive of one file; returns the run and borg's ``--json`` archive stats."""
        self.archives += 1
        # Relative path from the file's directory, so extract recreates just the file name.
        m = self._run("create", "--json", "--compression", "lz4", "--chunker-params", BORG_CHUNKER,
                      f"::a{self.archives}", path.name, cwd=path.parent)
        stats: JSON = {}
        try:
            stats = json.loads(m.stdout).get("archive", {}).get("stats", {})
        except ValueError:
            pass
        return m, stats

    def extract(self, target: Path) -> Measured:
        target.mkdir(parents=True, exist_ok=True)
        return self._run("extract", f"::a{self.archives}", cwd=target)

    def check_verify_data(self) -> Measured:
        return self._run("check", "--verify-data")

    def size(self) -> int:
        return tree_bytes(self.repo)

    def statistics(self) -> JSON:
        return {"runs": self.runs, "archives": self.archives, "repo_bytes": self.size()}
