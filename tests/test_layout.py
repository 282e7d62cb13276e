"""The package layout: which module may import which (every import, lazy ones too).

The module graph is built by parsing the source with :mod:`ast`, so an import
inside a function counts the same as one at the top of a file, and so does
``importlib.import_module("...")`` with a name written in the source (the
lazy public names of ``dpft/__init__.py`` included). Imports under
``if TYPE_CHECKING:`` are left out: they never run.

Two rules hold for the graph: no cycles, and every arrow between two parts of
the package (a top-level module, or a subpackage as a whole) is in
:data:`ALLOWED`, the list README's "Layout" section shows.
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
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


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


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "string"`` assignments."""
    out = {}
    for node in tree.body:
        if (
            isinstance(node, (ast.Assign, ast.AnnAssign))
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
    return out


def _dynamic_imports(tree: ast.Module, package: str) -> set[str]:
    """Modules named in ``importlib.import_module(...)`` calls (a string written
    there or a module-level string constant; relative names resolved against
    ``package``), and the ``".module"`` entries of a ``_LAZY`` table (the lazy
    public names of ``dpft/__init__.py``)."""
    consts = _constants(tree)
    found: set[str] = set()

    def named(arg: ast.expr) -> str | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.Name):
            return consts.get(arg.id)
        return None

    def resolve(target: str) -> str:
        if not target.startswith("."):
            return target
        level = len(target) - len(target.lstrip("."))
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (level - 1)]
        return ".".join(anchor + [target.lstrip(".")])

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            target = named(node.args[0]) if fname == "import_module" else None
            if target:
                found.add(resolve(target))
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets) and isinstance(node.value, ast.Dict):
            for v in node.value.values:
                if isinstance(v, ast.Tuple) and v.elts and isinstance(v.elts[0], ast.Constant):
                    found.add(resolve(v.elts[0].value))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the dpft modules its source imports (lazy imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for dynamic in _dynamic_imports(tree, package):
            if dynamic.split(".")[0] == "dpft":
                targets |= _with_parents(dynamic, name, modules)
        for node in _imports(tree):
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
    tree = ast.parse(
        "import importlib\nNAME = 'dpft.engine'\n"
        "def f():\n    importlib.import_module(NAME)\n    importlib.import_module('.rows', __name__)\n"
    )
    assert _dynamic_imports(tree, "dpft") == {"dpft.engine", "dpft.rows"}  # importlib.import_module(...)
    assert "dpft.engine" in graph["dpft"]  # the lazy public names
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
    wrong = sorted(
        f"{m} imports {t}"
        for m, ts in graph.items()
        if not m.startswith("dpft.app") and m not in APP_ENTRY
        for t in ts
        if t.startswith("dpft.app")
    )
    assert not wrong, "the library must not import the application: " + "; ".join(wrong)


def test_audit_statistics_import_no_torch():
    """dpft.audit.stats is plain numbers: neither its source nor importing it pulls in torch."""
    path = PKG / "audit" / "stats.py"
    heavy = set()
    for node in _imports(ast.parse(path.read_text())):
        roots = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if not node.level
            else [f"dpft.audit.{node.module or ''}"]
        )
        heavy |= {r for r in roots if r.split(".")[0] == "torch" or r.startswith("dpft.")}
    assert not heavy, f"dpft/audit/stats.py imports {sorted(heavy)}"
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('stats', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "print('torch' in sys.modules)\n"
    )
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
    "dpft.units": "dpft.clip.units",
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


#: The parts of dpft and the parts each may import (an arrow not listed here fails
#: test_only_allowed_arrows). A part is a top-level module or a subpackage as a whole;
#: ``dpft`` itself (the lazy public names) may import every part. README's "Layout"
#: section shows the same list: change both together.
ALLOWED: dict[str, set[str]] = {
    # the application and the integrations on top
    "__main__": {"app"},
    "app": {"accounting", "audit", "batchnorm", "checkpoint", "data", "engine", "methods", "options"},
    "hf": {"accounting", "data", "engine", "methods", "options"},
    "audit": {"accounting", "data", "engine", "methods", "options"},
    # fine-tuning methods: what trains, and the phase plan
    "methods": {"accounting", "data", "engine", "options", "rows", "rules"},
    # the flow: engine -> capture -> rules; engine -> clip; accounting and sampling beside it
    "engine": {
        "accounting",
        "capture",
        "clip",
        "compiled",
        "distributed",
        "options",
        "rows",
        "rules",
        "sampling_check",
    },
    "capture": {"clip", "distributed", "precision", "rules"},  # clip: instantiating a weight's gradients early
    "clip": {"ops", "options", "precision", "rows", "rules"},
    "rows": {"rules"},
    "rules": {"ops", "precision"},
    "options": {"accounting"},  # the accountants' names
    "data": {"clip"},  # the seeded generator states of dpft.clip.noise
    # leaves: nothing in dpft
    "accounting": set(),
    "batchnorm": set(),
    "checkpoint": set(),
    "compiled": set(),
    "distributed": set(),
    "ops": set(),
    "precision": set(),
    "sampling_check": set(),
    # old module paths, each the module of its new home (see OLD_PATHS)
    **{old.split(".")[1]: {"clip"} for old in OLD_PATHS},
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dpft"


def arrows(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """(part, part it imports) -> the module-level imports that make the arrow."""
    out: dict[tuple[str, str], list[str]] = {}
    for m, ts in graph.items():
        for t in ts:
            a, b = _part(m), _part(t)
            if a != b:
                out.setdefault((a, b), []).append(f"{m} -> {t}")
    return out


def test_only_allowed_arrows():
    graph = import_graph()
    parts = {_part(m) for m in graph} - {"dpft"}
    assert parts <= ALLOWED.keys(), f"parts of dpft missing from ALLOWED: {sorted(parts - ALLOWED.keys())}"
    wrong = sorted(
        f"{a} -> {b} ({', '.join(sorted(ms)[:2])})"
        for (a, b), ms in arrows(graph).items()
        if a != "dpft" and b not in ALLOWED[a]
    )
    assert not wrong, "imports outside the allowed layout (tests/test_layout.py ALLOWED): " + "; ".join(wrong)


def test_the_allowed_list_is_the_readme_s():
    """README's layout section lists exactly the arrows of ALLOWED (one line per part)."""
    readme = (SRC.parent / "README.md").read_text()
    start = readme.index("<!-- layout-arrows -->")
    block = readme[start : readme.index("<!-- /layout-arrows -->", start)]
    shown = {}
    for line in block.splitlines():
        line = line.strip().strip("`")
        if " -> " in line:
            part, _, targets = line.partition(" -> ")
            shown[part.strip()] = {t.strip() for t in targets.split(",") if t.strip() and t.strip() != "(nothing)"}
    listed = {k: v for k, v in ALLOWED.items() if k not in {old.split(".")[1] for old in OLD_PATHS}}
    assert shown == listed


def test_an_arrow_outside_the_list_is_caught():
    """The check itself can fail: a planted import of a method by the engine is an arrow not allowed."""
    graph = import_graph()
    planted = {**graph, "dpft.engine": graph["dpft.engine"] | {"dpft.methods.sparta"}}
    assert ("engine", "methods") in arrows(planted) and "methods" not in ALLOWED["engine"]


def test_the_lazy_public_names_resolve():
    """Every entry of dpft's lazy table (``dpft.<name>``) is there."""
    import importlib

    import dpft

    for name in dpft._LAZY:
        if name == "hf":
            pytest.importorskip("transformers")
        assert getattr(dpft, name) is not None
        assert importlib.import_module(dpft._LAZY[name][0], "dpft")
