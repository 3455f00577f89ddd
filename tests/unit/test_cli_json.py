"""The CLI's contract with scripts (issue 9, defects 11 and 13): exit codes from errors.EXIT_CODES, every error
under --json is one JSON object on stdout, data on stdout and messages on stderr, and the README's commands are
the ones a root shell on a fresh machine can type.

Real processes (``python -m baton``), each with a private BATON_RUN_DIR/BATON_DEV_DIR; nothing here needs root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from baton import errors

ROOT = Path(__file__).resolve().parents[2]


def code(cls: type[errors.BatonError]) -> int:
    return errors.exit_code(cls("probe"))


USAGE, NOT_OWNER, REPO = code(errors.UsageError), code(errors.NotOwner), code(errors.RepoError)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"BATON_RUN_DIR": str(tmp_path / "run"), "BATON_DEV_DIR": str(tmp_path / "dev"),
                         "BATON_REPO": "", "BATON_KEY_FILE": ""}


def baton(env: dict[str, str], *args: str, rc: int, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=60, env=env,
                       cwd=cwd)
    assert r.returncode == rc, f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def json_error(r: subprocess.CompletedProcess[str], rc: int) -> dict[str, Any]:
    """Under --json an error is exactly one JSON object on stdout, naming the exit code; text goes to stderr."""
    out: dict[str, Any] = json.loads(r.stdout)
    assert out["exit_code"] == rc, out
    assert out["message"], out
    assert r.stderr.startswith("baton: error: ") or r.stderr.startswith("Usage:"), r.stderr
    return out


# --------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args", [
    ["backup", "--json"],                                           # missing argument
    ["backup", "x", "--repo", "r", "--bogus", "--json"],            # unknown option
    ["status", "--json", "a", "b"],                                 # extra argument
    ["status", "--json"],                                           # missing argument, --json first
    ["prune", "--repo", "r", "--max-unused", "x", "--bogus", "--json"],
    ["nosuchcommand", "--json"],
])
def test_usage_errors_under_json_are_json(env: dict[str, str], args: list[str]) -> None:
    r = baton(env, *args, rc=USAGE)
    out = json_error(r, USAGE)
    assert out["error"] == "UsageError", out
    assert "Usage:" in r.stderr or "baton: error:" in r.stderr, r.stderr


def test_usage_error_without_json_stays_text(env: dict[str, str]) -> None:
    r = baton(env, "backup", rc=USAGE)
    assert r.stdout == "", r.stdout
    assert "Missing argument" in r.stderr, r.stderr


# --------------------------------------------------------------------------------------------- status


def test_status_of_an_unknown_name_fails(env: dict[str, str], tmp_path: Path) -> None:
    r = baton(env, "status", "hB-nosuch", rc=NOT_OWNER, cwd=tmp_path)
    assert r.stdout == ""
    assert "hB-nosuch is not attached on this node" in r.stderr, r.stderr
    out = json_error(baton(env, "status", "hB-nosuch", "--json", rc=NOT_OWNER, cwd=tmp_path), NOT_OWNER)
    assert out["error"] == "NotAttached", out


# --------------------------------------------------------------------------------------------- repositories


def with_repo(cmd: list[str], url: str) -> list[str]:
    """`repo init|info` take the URL as an argument, the others as --repo."""
    return [*cmd, url] if cmd[0] == "repo" else [*cmd, "--repo", url]


@pytest.mark.parametrize("cmd", [["snapshots"], ["verify"], ["prune"], ["forget", "--keep-last", "1"],
                                 ["repo", "info"], ["repo", "init"]])
def test_repo_that_is_a_regular_file(env: dict[str, str], tmp_path: Path, cmd: list[str]) -> None:
    f = tmp_path / "afile"
    f.write_bytes(b"not a repository")
    r = baton(env, *with_repo(cmd, str(f)), rc=REPO)
    assert "is a file, not a repository" in r.stderr, r.stderr
    assert "no such directory" not in r.stderr and "File exists" not in r.stderr, r.stderr
    out = json_error(baton(env, *with_repo(cmd, str(f)), "--json", rc=REPO), REPO)
    assert "is a file, not a repository" in out["message"], out
    assert f.read_bytes() == b"not a repository"


@pytest.mark.parametrize("cmd", [["snapshots"], ["verify"], ["repo", "init"], ["repo", "info"]])
def test_unsupported_url_scheme_is_a_usage_error(env: dict[str, str], cmd: list[str]) -> None:
    r = baton(env, *with_repo(cmd, "ftp://host/path"), rc=USAGE)
    assert "unsupported repository URL scheme 'ftp'" in r.stderr, r.stderr
    out = json_error(baton(env, *with_repo(cmd, "ftp://host/path"), "--json", rc=USAGE), USAGE)
    assert out["error"] == "UsageError", out


def test_backup_checks_the_repository_url_first(env: dict[str, str], tmp_path: Path) -> None:
    r = baton(env, "backup", "hB-nosuch", "--repo", "ftp://host/path", rc=USAGE, cwd=tmp_path)
    assert "unsupported repository URL scheme" in r.stderr, r.stderr


def test_prune_dry_run_says_would(env: dict[str, str], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    baton(env, "repo", "init", str(repo), rc=0)
    r = baton(env, "prune", "--repo", str(repo), "--dry-run", "--grace", "0s", rc=0)
    assert "deleting" not in r.stderr and "repacking" not in r.stderr, r.stderr
    assert "would delete" in r.stderr, r.stderr
    assert "deleted" not in r.stdout and "freed" not in r.stdout and "repacked" not in r.stdout, r.stdout
    assert "would delete" in r.stdout and "would repack" in r.stdout, r.stdout


# --------------------------------------------------------------------------------------------- backup --if-owner


def test_if_owner_skip_is_reported_under_json(env: dict[str, str], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    baton(env, "repo", "init", str(repo), rc=0)
    r = baton(env, "backup", "hB-elsewhere", "--repo", str(repo), "--if-owner", rc=0, cwd=tmp_path)
    assert r.stdout == "", r.stdout  # quiet without --json: the timer on the owner does the work
    r = baton(env, "backup", "hB-elsewhere", "--repo", str(repo), "--if-owner", "--json", "--node", "hB-n1",
              rc=0, cwd=tmp_path)
    out = json.loads(r.stdout)
    assert out["skipped"] is True, out
    assert out["name"] == "hB-elsewhere" and out["node"] == "hB-n1", out
    assert "not attached on this node" in out["reason"], out


# --------------------------------------------------------------------------------------------- docs


def test_readme_commands_need_no_sudo() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"], first_block
    for rel in ("README.md", "docs/performance.md", "docs/operations.md", "scripts/setup.sh", "Makefile"):
        path = ROOT / rel
        if path.exists():
            assert "sudo " not in path.read_text(), f"{rel} tells a root user to type sudo"


# --------------------------------------------------------------------------------------------- progress


def test_backup_progress_bar_draws_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Both streams look like terminals; the bar must still go to stderr, never into the data on stdout."""
    from baton.cli import progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with progress_bar("backup hB-x", True) as bar:
        assert bar is not None
        for i in range(0, 11):
            bar(i << 20, 10 << 20)
    out = capsys.readouterr()
    assert out.out == "", repr(out.out)
    assert "backup hB-x" in out.err, repr(out.err)
