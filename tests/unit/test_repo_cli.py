"""The repository commands through the real CLI entry point (exit codes, --json, human output)."""

from __future__ import annotations

import json
import os
import random

import pytest

from baton.cli import main
from baton.repo import BackupWriter, DiskIdentity, Repository
from baton.repo.repository import pack_key

CS = 4096


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(list(args))
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


def seed_repo(url: str, *, key_file: str | None = None) -> list[str]:
    repo = Repository.open(url, key_file=key_file)
    rng = random.Random(99)
    disk = DiskIdentity("uuid-1", 20 * CS + 7, CS, name="sdb")
    img = bytearray(rng.randbytes(disk.size))
    img[3 * CS:6 * CS] = bytes(3 * CS)
    ids = []
    parent = None
    for round_ in range(2):
        w = BackupWriter(repo, disk, parent=parent, node=f"n{round_}", mode="incremental" if parent else "full",
                              reason="" if parent else "first backup", lineage="L")
        for i in range(disk.chunk_count):
            w.put(i, bytes(img[i * CS:(i + 1) * CS]))
        parent = w.commit({})
        ids.append(parent.snapshot_id)
        img[0:10] = b"0123456789"
    return ids


def test_cli_round_trip(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "repo")
    code, out, _ = run(capsys, "repo", "init", url, "--json")
    assert code == 0 and json.loads(out)["encryption"] == "none"
    ids = seed_repo(url)
    code, out, _ = run(capsys, "snapshots", "--repo", url, "--json")
    assert code == 0 and [s["snapshot_id"] for s in json.loads(out)] == ids
    code, out, _ = run(capsys, "snapshots", "--repo", url)
    assert ids[0][:12] in out and "full (first backup)" in out
    code, out, _ = run(capsys, "verify", "--repo", url, "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    target = str(tmp_path / "restored.img")
    code, out, _ = run(capsys, "restore", ids[1][:8], "--repo", url, "--to", target, "--json")
    res = json.loads(out)
    assert code == 0 and res["disk_size"] == 20 * CS + 7 and res["zero_chunks"] == 3
    assert res["image_digest"] is None                  # the whole-image hash is asked for (--digest)
    import blake3

    with open(target, "rb") as f:
        restored = f.read()
    code, out, _ = run(capsys, "restore", ids[1][:8], "--repo", url, "--to", target, "--digest", "--json")
    assert code == 0 and json.loads(out)["image_digest"] == blake3.blake3(restored).hexdigest()
    code, out, _ = run(capsys, "restore", ids[1][:8], "--repo", url, "--to", target, "--digest")
    assert code == 0 and f"image blake3 {blake3.blake3(restored).hexdigest()}" in out
    code, out, _ = run(capsys, "restore", ids[1][:8], "--repo", url, "--to", target)
    assert code == 0 and "restored snapshot" in out and "blake3" not in out
    code, out, _ = run(capsys, "forget", "--repo", url, "--keep-last", "1", "--json")
    assert code == 0 and [r["snapshot"] for r in json.loads(out)["removed"]] == [ids[0]]
    code, out, _ = run(capsys, "prune", "--repo", url, "--grace", "0s", "--json")
    assert code == 0 and json.loads(out)["snapshots"] == 1
    code, out, _ = run(capsys, "repo", "info", url, "--json")
    assert code == 0 and json.loads(out)["objects"]["snapshots"]["count"] == 1


def test_cli_verify_failure_exit_9(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "repo")
    Repository.init(url)
    ids = seed_repo(url)
    repo = Repository.open(url)
    cid = repo.snapshot_reader(repo.get_snapshot(ids[0])).chunk_id(0)
    os.unlink(os.path.join(url, pack_key(repo.chunk_index()[cid].pack_id)))
    code, out, err = run(capsys, "verify", "--repo", url, "--json")
    rep = json.loads(out)
    assert code == 9 and not rep["ok"]
    assert any(p["kind"] == "missing-chunk" and ids[0] in p["snapshots"] for p in rep["problems"])
    code, out, err = run(capsys, "verify", "--repo", url)
    assert code == 9 and "missing-pack" in out and "verify found" in err


def test_cli_errors_map_to_exit_codes(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, "snapshots", "--repo", str(tmp_path / "none"), "--json")
    assert code == 7 and json.loads(out)["error"] == "RepoNotFound"
    url = str(tmp_path / "repo")
    key = str(tmp_path / "key")
    code, _, _ = run(capsys, "repo", "init", url, "--encryption", "aes-256-gcm", "--key-file", key)
    assert code == 0 and os.path.exists(key)
    code, out, err = run(capsys, "snapshots", "--repo", url)
    assert code == 7 and "key" in err
    wrong = tmp_path / "wrong"
    wrong.write_text(os.urandom(32).hex())
    wrong.chmod(0o600)
    code, out, err = run(capsys, "snapshots", "--repo", url, "--key-file", str(wrong))
    assert code == 7 and "wrong key" in err
    code, out, err = run(capsys, "snapshots", "--repo", url, "--key-file", key)
    assert code == 0 and "no snapshots" in out
    seed_repo(url, key_file=key)
    code, out, err = run(capsys, "restore", "zz", "--repo", url, "--key-file", key, "--to", str(tmp_path / "x"))
    assert code == 2
    code, out, err = run(capsys, "restore", "latest", "--repo", url, "--key-file", key, "--to", str(tmp_path))
    assert code == 3 and "directory" in err
    code, out, err = run(capsys, "forget", "--repo", url, "--key-file", key)
    assert code == 2


def test_cli_help_texts(capsys) -> None:  # type: ignore[no-untyped-def]
    for cmd in (["repo", "init"], ["snapshots"], ["restore"], ["verify"], ["forget"], ["prune"]):
        code, out, _ = run(capsys, *cmd, "--help")
        assert code == 0 and "--json" in out and len(out) > 300
