"""Imports flow one way: model/errors -> format -> {storage, device, record} -> tracker -> repo -> engines ->
{frontends, cluster} -> agent -> cli. This test parses every module with ast and fails on an import that goes
the wrong way (a lower layer importing a higher one)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "baton"

# Lower number = lower layer. A module may import only from layers <= its own.
LAYERS: dict[str, int] = {
    "errors": 0, "model": 0, "clock": 0, "config": 0, "__init__": 0, "util": 0,
    "format": 1,
    "device": 2, "storage": 2, "record": 2, "blockdev": 2, "host": 2,
    "tracker": 3,
    "repo": 4,
    "backup": 5, "restore": 5, "verify": 5, "engine": 5,
    "frontends": 6, "cluster": 6,
    "agent": 7,
    "testing": 8,
    "cli": 9, "__main__": 9,
}


def layer_of(parts: list[str]) -> int | None:
    if not parts:
        return 0
    return LAYERS.get(parts[0])


def test_imports_flow_one_way() -> None:
    bad: list[str] = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("").parts
        mine = layer_of(list(rel))
        assert mine is not None, f"{path}: top-level module {rel[0]!r} has no layer in test_layering.LAYERS"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if not name.startswith("baton.") and name != "baton":
                    continue
                target = layer_of(name.split(".")[1:])
                assert target is not None, f"{path}: imports {name}, which has no layer"
                if target > mine:
                    bad.append(f"{path.relative_to(SRC)} (layer {mine}) imports {name} (layer {target})")
    assert not bad, "imports going the wrong way:\n" + "\n".join(bad)
