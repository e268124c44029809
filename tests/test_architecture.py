"""The package's shape: imports point down the layers, and the public surface is tidy.

Layers, top to bottom: ``__main__`` -> ``cli`` -> ``web`` (the status app, a subpackage
for the optional extra) -> ``__init__`` (re-exports) -> ``pipeline`` (the runner) ->
public feature modules (``progress``, ``retry``, ...) -> ``state`` -> private
``_modules`` -> ``models`` -> ``errors``. Only ``cli`` imports ``web``, and only inside a
function, so the core never needs the extra. Imports under ``if TYPE_CHECKING:`` are for
annotations only and never run, so they are not edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline_common

PACKAGE = "pipeline_common"
ROOT = Path(pipeline_common.__file__).parent
SUBPACKAGES = ("web",)  # each counts as one module: its files' imports are its imports
MODULES = sorted([*(p.stem for p in ROOT.glob("*.py")), *SUBPACKAGES])

# Higher numbers sit higher; a module may import only modules of a lower layer, or of its
# own layer when that layer allows it (the private helpers and the feature modules do).
_ERRORS, _MODELS, _PRIVATE, _STATE, _FEATURE, _RUNNER, _INIT, _WEB, _CLI, _MAIN = range(10)
_SAME_LAYER_OK = {_PRIVATE, _FEATURE}


_NAMED_LAYERS = {
    "errors": _ERRORS,
    "models": _MODELS,
    "state": _STATE,
    "pipeline": _RUNNER,  # on progress + retry + state; nothing below imports it
    "__init__": _INIT,
    "web": _WEB,
    "cli": _CLI,
    "demo": _CLI,  # an entry point like cli: it shows the runner too
    "__main__": _MAIN,
}


def _layer(module: str) -> int:
    if module in _NAMED_LAYERS:  # checked first: "__init__" and "__main__" start with "_"
        return _NAMED_LAYERS[module]
    if module.startswith("_"):
        return _PRIVATE
    return _FEATURE  # progress, retry and any other public module built on PipelineState


def _is_type_checking_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those inside ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking_guard(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _files(module: str) -> list[tuple[Path, int]]:
    """The source files of ``module``, each with its depth below the package root."""
    if module in SUBPACKAGES:
        return [(p, 1) for p in sorted((ROOT / module).glob("*.py"))]
    return [(ROOT / f"{module}.py", 0)]


def _imported_modules(module: str, *, runtime_only: bool = True) -> set[str]:
    """The modules of this package that ``module`` imports (``__init__`` for the package)."""
    found: set[str] = set()
    for path, depth in _files(module):
        found |= _imports_of_file(path, depth, module, runtime_only=runtime_only)
    found.discard(module)
    return found


def _imports_of_file(path: Path, depth: int, module: str, *, runtime_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = _runtime_nodes(tree) if runtime_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith(PACKAGE):
                continue
            if node.level > depth + 1:
                raise AssertionError(f"{path.name} imports from outside the package: {node}")
            if node.level == 1 and depth == 1:  # inside the subpackage: its own files
                continue
            base = (node.module or "").removeprefix(PACKAGE).lstrip(".")
            if base:
                found.add(base.split(".")[0])
            else:  # from . import a, b  /  from pipeline_common import a, b
                for alias in node.names:
                    found.add(alias.name if alias.name in MODULES else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE:
                    found.add("__init__")
                elif alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.split(".")[1])
    found.discard(module)
    return found


def test_the_package_has_the_core_modules() -> None:
    """The layered core exists, so the checks below are not vacuous."""
    for module in ("errors", "models", "state", "_atomic", "_lock", "_backup", "_log", "_json"):
        assert module in MODULES
    for module in ("progress", "retry", "pipeline", "_plan"):
        assert module in MODULES


def test_errors_imports_nothing_of_ours() -> None:
    """errors.py sits at the bottom: it imports no module of the package, not even for types."""
    assert _imported_modules("errors", runtime_only=False) == set()


@pytest.mark.parametrize("module", [m for m in MODULES if m != "__init__"])
def test_imports_point_down_the_layers(module: str) -> None:
    """A module imports only lower layers, or its own where allowed (private and feature)."""
    mine = _layer(module)
    for target in _imported_modules(module):
        theirs = _layer(target)
        assert theirs < mine or (theirs == mine and mine in _SAME_LAYER_OK), (
            f"{module} (layer {mine}) imports {target} (layer {theirs})"
        )


@pytest.mark.parametrize("module", [m for m in MODULES if m != "__main__"])
def test_nothing_imports_cli(module: str) -> None:
    """No module but ``python -m``'s __main__, __init__ included, imports the console entry."""
    assert "cli" not in _imported_modules(module, runtime_only=False)


def test_there_are_no_import_cycles() -> None:
    """The runtime import graph of the package is acyclic."""
    graph = {m: _imported_modules(m) for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


def test_dunder_all_is_sorted_and_unique() -> None:
    """pipeline_common.__all__ is sorted and lists each name once."""
    names = list(pipeline_common.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_name_in_dunder_all_exists() -> None:
    """Every name in pipeline_common.__all__ is an attribute of the package."""
    missing = [n for n in pipeline_common.__all__ if not hasattr(pipeline_common, n)]
    assert missing == []


def test_core_names_are_public() -> None:
    """The contract's classes are exported from the package root."""
    for name in ("PipelineState", "StateTransaction", "StateError", "PipelineModel"):
        assert name in pipeline_common.__all__


def test_init_holds_no_logic() -> None:
    """__init__.py only imports and assigns: no functions, classes or control flow."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    allowed = (ast.Expr, ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign)
    for node in tree.body:
        assert isinstance(node, allowed), ast.dump(node)[:80]


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("cli", "web")])
def test_nothing_but_cli_imports_web(module: str) -> None:
    """The status app sits on top: no module but the CLI imports it, not even for types."""
    assert "web" not in _imported_modules(module, runtime_only=False)


def test_cli_imports_web_only_inside_a_function() -> None:
    """``pipeline-state`` works without the web extra: ``web`` is imported lazily, by ``serve``."""
    tree = ast.parse((ROOT / "cli.py").read_text(encoding="utf-8"))
    for node in tree.body:  # module level only
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "") not in ("web", f"{PACKAGE}.web"), ast.dump(node)
    assert "web" in _imported_modules("cli")  # ...but it does import it, in a function


def test_importing_the_package_or_the_cli_loads_no_web_dependency() -> None:
    """``import pipeline_common`` and its CLI load neither Starlette nor uvicorn."""
    code = (
        "import sys, pipeline_common, pipeline_common.cli, pipeline_common.progress\n"
        "print(sorted(m for m in ('starlette', 'uvicorn', 'pipeline_common.web') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
