"""The import graph of the project's packages: every module imports alone (none relies on
another having been imported first), no import circle (module-level imports or lazy ones
inside functions), and the layers import only downwards (quant, compress: torch only;
optim: quant; deploy: quant; trainables: quant, compress, deploy, optim; sweeps: all of
them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quant", "compress", "optim", "deploy", "trainables", "sweeps")
ALLOWED = {"quant": {"quant"}, "compress": {"compress", "quant"}, "optim": {"optim", "quant"},
           "deploy": {"deploy", "quant"},
           "trainables": {"trainables", "quant", "compress", "deploy", "optim"},
           "sweeps": {"sweeps", "trainables", "quant", "compress", "deploy", "optim"}}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, names: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in it (``from a.b import c``: a.b.c
    where that is a module, else a.b)."""
    out = set()
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names
                       else node.module for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in names}
    return out


def _nodes(tree: ast.AST):
    """Every node, but not those under ``if TYPE_CHECKING:`` (never imported at run time)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
            continue
        yield child
        yield from _nodes(child)


def graph() -> dict[str, set[str]]:
    found = modules()
    names = set(found)
    edges = {name: imports_of(path, names) - {name} for name, path in found.items()}
    # A package's __init__ is imported before any of its modules: a module importing its
    # own package's __init__ is not a circle (Python finishes the __init__ first).
    return {n: {t for t in e if not n.startswith(t + ".")} for n, e in edges.items()}


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import circle (its modules in order), or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_cycle_finder_by_hand() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle() -> None:
    edges = graph()
    assert len(edges) > 40
    assert cycle(edges) == []


def test_layers_import_downwards_only() -> None:
    wrong = [f"{n} -> {t}" for n, targets in graph().items() for t in targets
             if t.split(".")[0] not in ALLOWED[n.split(".")[0]]]
    assert wrong == []


def test_every_module_imports_alone() -> None:
    """Each module imported with no other project module loaded before it (third-party
    modules stay loaded: a process per module would take minutes)."""
    code = f"""
import importlib, sys
names = {sorted(modules())!r}
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
