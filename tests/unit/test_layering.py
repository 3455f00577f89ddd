"""Imports flow one way (STYLE §1), checked module by module with ``ast``:

    errors, util  ->  format  ->  {device, storage, host, record}  ->  tracker  ->  repo
      ->  engines (backup, restore, verify)  ->  {frontends, cluster, daemon}  ->  agent  ->  testing  ->  cli

* Every import counts: ``import baton.x``, ``from baton.x import y``, relative imports (``from . import y``,
  ``from ..x import y``), and imports inside functions (a lazy import is still a dependency).
* ``from baton import X`` / ``from baton.pkg import X`` resolve to X's module: the submodule when X is one, else
  the module the package's ``__init__`` takes X from, else the package itself.
* A module may import a lower layer; the same layer only along the edges listed in ``SIDEWAYS`` (inside one
  package any module may import another, but without cycles); never a higher layer.
* Frontends sit directly above the tracker: they may import only ``tracker`` and below (never ``repo`` or an
  engine), whatever their layer number would allow.
* No import cycles between the modules of one package (``KNOWN_CYCLES`` lists the exceptions being removed).

The functions take a source root, so ``test_the_checker_*`` below run them on fake module trees: an upward
import, a frontend importing the repository, a relative import that climbs, and a cycle must each fail.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Lower number = lower layer. Keys are the first component under baton (a package or a top-level module).
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "model": 0, "clock": 0, "config": 0, "util": 0, "workers": 0,
    "format": 1,
    "device": 2, "storage": 2, "host": 2, "record": 2,
    "tracker": 3,
    "repo": 4,
    "backup": 5, "restore": 5, "verify": 5, "diff": 5, "rollback": 5, "freeze": 5,
    "frontends": 6, "cluster": 6, "daemon": 6, "mount": 6,
    "agent": 7,
    "testing": 8,
    "cli": 9, "__main__": 9,
}
# Same-layer imports between different top-level parts that are allowed (importer, imported).
SIDEWAYS: set[tuple[str, str]] = {
    ("record", "device"), ("record", "host"),  # placement opens devices and refuses busy ones
    ("daemon", "frontends"),  # the per-disk daemon starts and stops a Frontend
    ("rollback", "diff"),  # rollback writes the chunks that differ between two snapshots
    ("mount", "daemon"), ("mount", "frontends"),  # the snapshot mount daemon: control protocol, frontend
    ("__main__", "cli"),
}
# Parts whose imports are capped below their own layer: frontends talk to the tracker, nothing above it.
CAPPED: dict[str, int] = {"frontends": LAYERS["tracker"]}
# Cycles between modules of one package that are known and being removed (each names its issue).
KNOWN_CYCLES: set[frozenset[str]] = set()  # repo.repository <-> repo.writer was the last one (issue 10)


@dataclass(frozen=True)
class Edge:
    importer: str  # dotted module name, e.g. baton.record.core (a package is its __init__: baton.record)
    imported: str
    where: str  # path:line


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(root, p): p for p in sorted((root / "baton").rglob("*.py"))}


def _is_package(mods: dict[str, Path], name: str) -> bool:
    return name in mods and mods[name].name == "__init__.py"


@functools.cache
def _parse(path: Path, mtime: float) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _tree_of(path: Path) -> ast.Module:
    return _parse(path, path.stat().st_mtime)


def _reexport_source(mods: dict[str, Path], pkg: str, name: str) -> str | None:
    """The module ``pkg``'s __init__ takes ``name`` from (``from baton.pkg.m import name``), if any."""
    for node in _tree_of(mods[pkg]).body:
        if isinstance(node, ast.ImportFrom):
            src = _absolute(pkg, True, node)
            if src and any((a.asname or a.name) == name for a in node.names):
                return src
    return None


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level - 1 > len(base) - 1:
        return None
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve(mods: dict[str, Path], target: str, name: str | None) -> str:
    """The module an import of ``name`` from ``target`` depends on."""
    if name is not None:
        sub = f"{target}.{name}"
        if sub in mods:
            return sub
        if _is_package(mods, target):
            src = _reexport_source(mods, target, name)
            if src is not None and src in mods and src != target:
                return src
    return target


def edges(root: Path) -> Iterator[Edge]:
    """Every import of a baton module by a baton module under ``root`` (the directory holding ``baton/``)."""
    mods = _modules(root)
    for module, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(_tree_of(path)):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "baton" or a.name.startswith("baton."):
                        yield Edge(module, a.name, where)
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, is_pkg, node)
                if target is None:
                    yield Edge(module, "<outside baton>", where)
                    continue
                if target != "baton" and not target.startswith("baton."):
                    continue
                for a in node.names:
                    yield Edge(module, _resolve(mods, target, a.name), where)


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(root: Path) -> list[str]:
    """Imports that go the wrong way, one line each."""
    bad = []
    for e in edges(root):
        src, dst = _part(e.importer), _part(e.imported) if e.imported.startswith("baton") else None
        if src not in LAYERS:
            bad.append(f"{e.where}: {e.importer} is in no layer (add {src!r} to test_layering.LAYERS)")
            continue
        if dst is None or dst not in LAYERS:
            bad.append(f"{e.where}: {e.importer} imports {e.imported}, which is in no layer")
            continue
        if src == dst:
            continue
        mine, theirs = LAYERS[src], LAYERS[dst]
        cap = CAPPED.get(src)
        if cap is not None and theirs > cap:
            bad.append(f"{e.where}: {e.importer} imports {e.imported}; {src} may import only layer {cap} "
                       "(tracker) and below")
        elif theirs > mine:
            bad.append(f"{e.where}: {e.importer} (layer {mine}) imports {e.imported} (layer {theirs})")
        elif theirs == mine and (src, dst) not in SIDEWAYS:
            bad.append(f"{e.where}: {e.importer} imports {e.imported} sideways (same layer {mine}); allow the "
                       "edge in test_layering.SIDEWAYS only if it is meant")
    return bad


def package_cycles(root: Path) -> list[list[str]]:
    """Import cycles between modules of one package (strongly connected components of more than one module,
    or a module importing itself). Imports of the package's own ``__init__`` count: re-exports resolve through
    it to the defining module first, so what remains is a real dependency."""
    graph: dict[str, set[str]] = {}
    for e in edges(root):
        a, b = e.importer, e.imported
        if a == b:
            continue
        pa, pb = a.rsplit(".", 1)[0], b.rsplit(".", 1)[0]
        # same package: siblings, or a submodule and its package's __init__
        if pa in (pb, b) or pb == a:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


# ------------------------------------------------------------------------------------------------ the tree


def test_imports_flow_one_way() -> None:
    bad = violations(SRC)
    assert not bad, "imports going the wrong way:\n" + "\n".join(bad)


def test_no_import_cycles_inside_a_package() -> None:
    cycles = [c for c in package_cycles(SRC) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles inside a package:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_part_has_a_layer() -> None:
    parts = {_part(m) for m in _modules(SRC)}
    assert parts <= set(LAYERS), f"add to test_layering.LAYERS: {sorted(parts - set(LAYERS))}"


# ------------------------------------------------------------------------------------------ the checker


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"baton/__init__.py": "", **files}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        for parent in p.relative_to(tmp_path).parents:
            init = tmp_path / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
        p.write_text(text)
    return tmp_path


def test_the_checker_accepts_a_downward_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "baton/format/record.py": "from baton.errors import X\n",
        "baton/errors.py": "X = 1\n",
        "baton/record/core.py": "from baton.format import record\nfrom . import area\n",
        "baton/record/area.py": "import baton.format.record\n",
        "baton/frontends/nbd.py": "from baton.tracker.core import Tracker\n",
        "baton/tracker/core.py": "from ..record.core import area\nclass Tracker: ...\n",
    })
    assert violations(root) == [] and package_cycles(root) == []


@pytest.mark.parametrize("files, expect", [
    ({"baton/format/record.py": "from baton.repo import x\n", "baton/repo/x.py": ""}, "(layer 1) imports baton.repo.x"),
    ({"baton/format/record.py": "def f():\n    from baton.backup import run\n", "baton/backup.py": ""},
     "imports baton.backup (layer 5)"),
    ({"baton/format/record.py": "from ..repo import x\n", "baton/repo/x.py": ""}, "imports baton.repo.x"),
    ({"baton/format/record.py": "from baton import tracker\n", "baton/tracker/__init__.py": ""},
     "imports baton.tracker (layer 3)"),
    ({"baton/frontends/fuse.py": "from baton import backup\n", "baton/backup.py": ""}, "only layer 3"),
    ({"baton/frontends/fuse.py": "from baton.repo import Repository\n",
      "baton/repo/__init__.py": "from baton.repo.repository import Repository\n",
      "baton/repo/repository.py": "class Repository: ...\n"}, "imports baton.repo.repository; frontends"),
    ({"baton/storage/local.py": "import baton.record.core\n", "baton/record/core.py": ""}, "sideways"),
    ({"baton/newthing.py": "import baton.errors\n"}, "in no layer"),
])
def test_the_checker_fails_an_upward_import(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    bad = violations(_tree(tmp_path, files))
    assert any(expect in b for b in bad), bad


def test_the_checker_finds_a_cycle_inside_a_package(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "baton/repo/__init__.py": "from baton.repo.writer import Writer\n",
        "baton/repo/repository.py": "def f():\n    from baton.repo import Writer\n",
        "baton/repo/writer.py": "from .repository import f\nclass Writer: ...\n",
        "baton/repo/a.py": "from . import b\n",
        "baton/repo/b.py": "from . import c\n",
        "baton/repo/c.py": "import baton.repo.a\n",
    })
    assert violations(root) == []
    assert sorted(package_cycles(root)) == [["baton.repo.a", "baton.repo.b", "baton.repo.c"],
                                            ["baton.repo.repository", "baton.repo.writer"]]


# ------------------------------------------------------------------------------------------- exit codes

# Where a literal exit status may appear: the CLI's top level (0 success, 1 internal error, 130 interrupted).
EXIT_LITERALS_ALLOWED = {"baton.cli": {0, 1, 130}}


def literal_exits(root: Path) -> list[str]:
    """``sys.exit(N)``, ``os._exit(N)``, ``SystemExit(N)`` and ``click``'s ``ctx.exit(N)`` with a literal N other
    than where allowed: exit codes come from ``baton.errors.exit_code`` (STYLE §10)."""
    bad = []
    for module, path in _modules(root).items():
        for node in ast.walk(_tree_of(path)):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            arg = node.args[0]
            if name in {"exit", "_exit", "SystemExit", "Exit"} and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, int) and arg.value not in EXIT_LITERALS_ALLOWED.get(module, set()):
                bad.append(f"{path.relative_to(root)}:{node.lineno}: {name}({arg.value})")
    return bad


def test_exit_codes_come_from_the_one_mapping() -> None:
    bad = literal_exits(SRC)
    assert not bad, "exit statuses set outside baton.errors.EXIT_CODES:\n" + "\n".join(bad)


def test_the_checker_finds_a_literal_exit_status(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"baton/daemon/server.py": "import sys\ndef f():\n    sys.exit(5)\n",
                            "baton/cli/__init__.py": "import sys\nsys.exit(130)\n"})
    assert literal_exits(root) == ["baton/daemon/server.py:3: exit(5)"]
