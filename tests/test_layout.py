"""The package layout: which module may import which (every import, lazy ones too).

The module graph is built by parsing the source with :mod:`ast`, so an import
inside a function counts the same as one at the top of a file. Imports under
``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "dpft"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _with_parents(name: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """``name`` and every package above it (importing a.b.c runs a/__init__ and a/b/__init__),
    except the importer's own packages: those are already being imported when it runs."""
    return ({name} | _ancestors(name)) & modules.keys() - _ancestors(importer)


def import_graph() -> dict[str, set[str]]:
    """module -> the dpft modules its source imports (lazy imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                names: list[str] = []
            else:
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                bases = [base]
                names = [alias.name for alias in node.names]
            for base in bases:
                if base.split(".")[0] != "dpft":
                    continue
                targets |= _with_parents(base, name, modules)
                for n in names:  # `from pkg import submodule`
                    if f"{base}.{n}" in modules:
                        targets.add(f"{base}.{n}")
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    """The parser itself: a lazy relative import inside a function is an edge."""
    graph = import_graph()
    assert "dpft.app.train" in graph["dpft.app.cli"]  # lazy, inside a function
    assert "dpft.engine" in graph["dpft.hf"]  # top-level relative
    assert "dpft.rules" in graph["dpft.rules.conv"] or "dpft.rules.base" in graph["dpft.rules.conv"]
    planted = {**graph, "dpft.accounting": graph["dpft.accounting"] | {"dpft.engine"}}
    assert any("dpft.engine" in c and "dpft.accounting" in c for c in cycles(planted))


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in src/dpft: " + "; ".join(" <-> ".join(c) for c in found)


#: the one module outside dpft.app allowed to import it: ``python -m dpft`` is the command itself
APP_ENTRY = {"dpft.__main__"}


def test_nothing_outside_app_imports_app():
    graph = import_graph()
    wrong = sorted(f"{m} imports {t}" for m, ts in graph.items() if not m.startswith("dpft.app") and m not in APP_ENTRY
                   for t in ts if t.startswith("dpft.app"))
    assert not wrong, "the library must not import the application: " + "; ".join(wrong)


def test_audit_statistics_import_no_torch():
    """dpft.audit.stats is plain numbers: neither its source nor importing it pulls in torch."""
    path = PKG / "audit" / "stats.py"
    heavy = set()
    for node in _imports(ast.parse(path.read_text())):
        roots = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if not node.level else [f"dpft.audit.{node.module or ''}"])
        heavy |= {r for r in roots if r.split(".")[0] == "torch" or r.startswith("dpft.")}
    assert not heavy, f"dpft/audit/stats.py imports {sorted(heavy)}"
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('stats', sys.argv[1])\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_dpft_script_is_the_app_cli():
    """pyproject's ``dpft`` script entry names a function that exists."""
    import importlib
    import tomllib

    entry = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["scripts"]["dpft"]
    module, _, attr = entry.partition(":")
    assert module == "dpft.app.cli"
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("name", ["dpft.audit", "dpft.audit.stats", "dpft.audit.trials", "dpft.app.train"])
def test_public_names_resolve(name):
    """Every name a public module exports is there."""
    import importlib

    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


#: old module paths (before the stages became packages) -> their home now
OLD_PATHS = {
    "dpft.norms": "dpft.clip.norms",
    "dpft.noise": "dpft.clip.noise",
    "dpft.clipping": "dpft.clip.functions",
    "dpft.batched": "dpft.clip.stacked",
    "dpft.ghost_kernel": "dpft.clip.ghost_kernel",
    "dpft.privatize": "dpft.clip.clipped_sum",
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_paths_are_the_new_modules(old):
    """``import dpft.norms`` still works and is the very module ``dpft.clip.norms`` (so that
    ``dpft.norms.X`` and a patch of it reach the code that runs)."""
    import importlib

    assert importlib.import_module(old) is importlib.import_module(OLD_PATHS[old])


def test_capture_keeps_its_names():
    from dpft.capture import BatchNormError, Capture, UnsupportedModuleError, is_dtensor, plan_model  # noqa: F401
    from dpft.capture.hooks import Capture as C

    assert Capture is C
