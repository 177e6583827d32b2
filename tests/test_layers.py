"""The package's structure, checked: layers, imports in functions, private names.

import-linter checks the layers contract in CI (``lint-imports``, configured in
pyproject.toml); these tests check what it cannot: that no function hides an
import of graphexec's own modules (each would be an edge of the layering that
no tool sees), that deferred imports are on a short named list, and that no
module takes another module's private names.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import graphexec as gx

PACKAGE = pathlib.Path(gx.__file__).parent

# Imports allowed inside functions: optional dependencies (an extra installs
# them), and heavy ones deferred so that `import graphexec` (and a worker's
# start) stays fast: each of these costs milliseconds and only some runs need
# it (sqlite3 and tempfile: a run that caches; psutil: memory limits, cleanup).
OPTIONAL = {"distributed", "graphviz"}
DEFERRED_FOR_STARTUP = {"tqdm", "psutil", "numpy", "sqlite3", "tempfile", "threadpoolctl"}


# Private modules, not private names: a package that loads its modules on first
# use (PEP 562) is reached through the package itself (`from .. import _surfaces`).
MODULES_NOT_NAMES = {"_version", "_model", "_data", "_executors", "_engine", "_surfaces"}


def _modules() -> list[tuple[pathlib.Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def _function_imports(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_no_function_imports_graphexec_modules():
    hidden = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path, tree in _modules()
        for line, name in _function_imports(tree)
        if name.startswith(".") or name.startswith("graphexec")
    ]
    assert hidden == [], "imports inside functions hide edges of the layering:\n" + "\n".join(
        hidden
    )


def test_deferred_imports_are_on_the_named_list():
    others = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path, tree in _modules()
        for line, name in _function_imports(tree)
        if not name.startswith(".") and name.split(".")[0] not in OPTIONAL | DEFERRED_FOR_STARTUP
    ]
    assert others == [], "\n".join(others)


def test_no_module_takes_another_modules_private_names():
    taken = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("graphexec")
            ):
                taken += [
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno} takes {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                    and not alias.name.startswith("__")
                    and alias.name not in MODULES_NOT_NAMES
                ]
    assert taken == [], "\n".join(taken)


@pytest.mark.parametrize("layer", ["_model", "_data", "_executors", "_engine", "_surfaces"])
def test_each_layer_imports_only_layers_below_it(layer):
    # The same contract as import-linter's, so that a plain pytest run sees it too.
    order = ["_model", "_data", "_executors", "_engine", "_surfaces"]
    above = set(order[order.index(layer) + 1 :])
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        tree = ast.parse(path.read_text())
        type_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and id(node) not in type_only:
                target = (node.module or "").split(".")[0]
                if target in above:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} -> {target}")
    assert wrong == [], "\n".join(wrong)
