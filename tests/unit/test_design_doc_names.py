"""docs/design.md names only things that exist, so it cannot drift from the code again (issue 10).

Every `backticked` name in the document is checked when it looks like code:

* ``baton.x.y`` / ``baton.x.y.Name.attr``: the module imports and the attributes exist;
* ``pkg/module.py``, ``pkg/``, ``tests/...``, ``docs/...``: the path exists (under src/baton or the repository),
  and a bare ``module.py`` somewhere in src/baton;
* ``Name.attr`` or ``Name.attr(...)`` where ``Name`` is a class defined in baton: the class has the attribute;
* ``module.func(...)`` where ``module`` is a baton module or package (``host.check_not_in_use``): it exists;
* a bare ``CamelCase`` name (``Tracker``, ``FrontendFailure(kind, ...)``): a class of that name is defined in
  baton (or is a Python builtin such as ``ValueError``).

In ```python blocks, ``Class.attr`` of a baton class and the methods of a ``class X`` sketch of a baton class are
checked the same way. Anything else in backticks (commands, flags, environment variables, reasons in quotes) is left alone.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import re
import textwrap
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "baton"
DOC = ROOT / "docs" / "design.md"

_TICKS = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+(?:\(.*\))?$")
_CLASSLIKE = re.compile(r"^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")  # CamelCase: a class name
_PATH = re.compile(r"^[\w.-]+(?:/[\w.-]*)+$|^[\w-]+\.py$")


@cache
def _classes() -> dict[str, list[str]]:
    """Class name -> modules defining it, over every baton module."""
    out: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append(".".join(parts))
    return out


def _resolve_dotted(name: str) -> bool:
    """``baton.a.b.C.d``: import the longest module prefix, then getattr the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif isinstance(obj, type) and attr in _instance_attrs(obj):
                obj = None  # an attribute set on instances: nothing further to look into
            else:
                return False
        return True
    return False


def _instance_attrs(cls: type) -> set[str]:
    """Attributes a class's methods assign on ``self`` (``self.x = ...``), for the class and its bases."""
    out: set[str] = set()
    for klass in cls.__mro__:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign | ast.AugAssign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    out.add(t.attr)
    return out


def _module_exists(name: str) -> bool:
    return (SRC / f"{name}.py").exists() or (SRC / name / "__init__.py").exists()


def problem(token: str) -> str | None:
    """Why ``token`` names nothing that exists, or None (exists, or not a code name)."""
    tok = token.strip()
    if " " in tok.split("(")[0] or tok.startswith(("-", "$", "baton ")):
        return None
    if _PATH.match(tok) and "://" not in tok:
        cands = [SRC / tok, ROOT / tok, SRC.parent / tok]
        if tok.startswith(("RUN_DIR", "BATON_", "/")) or tok.isupper():
            return None
        if "/" not in tok:  # a bare module file name: anywhere in the package
            return None if any(SRC.rglob(tok)) else "no such file in src/baton"
        return None if any(c.exists() for c in cands) else "no such file or directory"
    bare = tok.split("(")[0]
    if _CLASSLIKE.match(bare):
        known = bare in _classes() or isinstance(getattr(builtins, bare, None), type)
        return None if known else "no class of that name in baton"
    if not _DOTTED.match(tok):
        return None
    dotted = tok.split("(")[0]
    if dotted.startswith("baton."):
        return None if _resolve_dotted(dotted) else "does not import or has no such attribute"
    head, *rest = dotted.split(".")
    if head in _classes():
        for mod in _classes()[head]:
            if _resolve_dotted(".".join([mod, head, *rest])):
                return None
        return f"class {head} has no {'.'.join(rest)}"
    if _module_exists(head):
        return None if _resolve_dotted(f"baton.{dotted}") else f"baton.{head} has no {'.'.join(rest)}"
    return None


_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_CLASS_DOT = re.compile(r"\b([A-Z]\w*(?:\.[a-z_]\w*)+)")
_CLASS_DEF = re.compile(r"^class (\w+)\b.*?(?=^\S|\Z)", re.S | re.M)
_DEF = re.compile(r"^\s+def (\w+)\(", re.M)


def code_block_names(text: str) -> list[str]:
    """Names a ```python block uses that can be checked: ``Class.attr`` of a baton class, and the methods a
    ``class X`` sketch of a baton class declares (as ``X.method``)."""
    out = []
    for block in _FENCE.findall(text):
        out += [m for m in _CLASS_DOT.findall(block) if m.split(".")[0] in _classes()]
        for cls in _CLASS_DEF.finditer(block):
            if cls.group(1) in _classes():
                out += [f"{cls.group(1)}.{d}" for d in _DEF.findall(cls.group(0))]
    return out


def test_every_code_name_in_design_md_exists() -> None:
    text = DOC.read_text()
    names = _TICKS.findall(text) + code_block_names(text)
    bad = sorted({f"`{t}`: {why}" for t in names if (why := problem(t)) is not None})
    assert not bad, "docs/design.md names things that do not exist:\n" + "\n".join(bad)


def test_the_checker_catches_drift() -> None:
    assert problem("Record.open") is not None  # a method that never existed
    sketch = "```python\nrec = Record.open(disk)\nclass Tracker:\n    def write(self): ...\n    def nope(self): ...\n```\n"
    assert code_block_names(sketch) == ["Record.open", "Tracker.write", "Tracker.nope"]
    assert problem("baton.record.core.Record.clear_frozen") is not None
    assert problem("baton/model.py") is not None or problem("model.py") is not None
    assert problem("host.no_such_check(path)") is not None
    assert problem("record/nothing.py") is not None
    assert problem("Record.freeze") is None and problem("baton.format.bitmap.Bitmap") is None
    assert problem("Record.fs_check") is None and problem("Record.no_such_state") is not None  # set in __init__
    assert problem("host.check_not_in_use(path, action)") is None and problem("record/core.py") is None
    assert problem("baton init --reset") is None and problem("BATON_DEV_DIR") is None
    assert problem("Tracker") is None and problem("ValueError") is None and problem("RecordOpener") is not None
