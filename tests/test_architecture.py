"""The package's layering, checked from its source: no import circle, no deferred import of our own
modules (the usual way to hide a circle), no ``_private`` name imported across files, and the engine
never imports a model, a guide or the command line."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyrovae"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, names, deferred) for each import of a pyrovae module in ``path``."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pyrovae"):
                continue
            names = [a.name for a in node.names]
            if node.module is None or target in ("pyrovae", "pyrovae.cli"):  # `from . import a, b`: modules
                for name in names:
                    yield f"{target}.{name}", [], id(node) not in top_level
            else:
                yield target, names, id(node) not in top_level
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pyrovae"):
                    yield a.name, [], id(node) not in top_level


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): list(imports(p)) for p in SOURCES}


def engine(graph: dict) -> dict:
    """Everything but the command line (``pyrovae.cli``, ``python -m pyrovae``)."""
    return {m: deps for m, deps in graph.items() if not m.startswith(("pyrovae.cli", "pyrovae.__main__"))}


def test_no_import_circle():
    edges = {m: {t for t, _, _ in deps if t in GRAPH and t != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail(f"import circle: {' → '.join(path[path.index(t):] + [t])}")
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state and m != "pyrovae":
            visit(m, [m])


def test_no_deferred_import_of_our_own_modules_in_the_engine():
    deferred = [f"{m} imports {t} inside a function" for m, deps in engine(GRAPH).items() for t, _, d in deps if d]
    assert deferred == []


def test_no_private_name_imported_across_files():
    private = [f"{m} imports {t}.{n}" for m, deps in GRAPH.items() for t, names, _ in deps for n in names if n.startswith("_")]
    assert private == []


def test_the_engine_imports_no_model_guide_or_command_line():
    upward = [f"{m} imports {t}" for m, deps in engine(GRAPH).items() for t, _, _ in deps
              if t.startswith(("pyrovae.models", "pyrovae.guides", "pyrovae.cli"))]
    assert upward == []


@pytest.mark.parametrize("broken", ["circle", "deferred", "private"])
def test_the_checks_can_fail(broken, monkeypatch):
    """Each check fails on a graph that breaks its rule."""
    graph = {"pyrovae.a": [("pyrovae.b", [], False)], "pyrovae.b": [("pyrovae.c", [], False)], "pyrovae.c": []}
    if broken == "circle":
        graph["pyrovae.c"] = [("pyrovae.a", [], False)]
        check = test_no_import_circle
    elif broken == "deferred":
        graph["pyrovae.c"] = [("pyrovae.a", [], True)]
        check = test_no_deferred_import_of_our_own_modules_in_the_engine
    else:
        graph["pyrovae.c"] = [("pyrovae.a", ["_helper"], False)]
        check = test_no_private_name_imported_across_files
    monkeypatch.setitem(globals(), "GRAPH", graph)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check()
