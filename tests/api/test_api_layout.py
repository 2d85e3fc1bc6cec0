"""The API's layout rules (handlers/__init__.py), read from the source with `ast`: no import
cycles in `handlers/` and `contracts/`, no module importing another's underscore names, no
route importing another route, and stores, queues and services that run without FastAPI's
dependency machinery (stores without FastAPI at all)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("handlers", "contracts")
# Plain classes over S3/SQS: importing one must not import FastAPI (or Starlette).
FASTAPI_FREE = (
    "handlers.job_store",
    "handlers.adapter_store",
    "handlers.training_data_store",
    "handlers.flag_index",
    "handlers.context_store",
    "handlers.file_store",
    "handlers.fine_tuning_store",
    "handlers.feedback_keys",
    "handlers.train_queue",
    "handlers.s3_json",
    "handlers.s3_objects",
    "handlers.idempotency",
    "handlers.avatar_ref",
    "handlers.documents",
)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str | None, bool]]:
    """(module imported, name imported from it or None, at module level) for each import of ours."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, id(node) in top) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    out.append((submodule, None, id(node) in top))
                elif node.module in MODULES:
                    out.append((node.module, alias.name, id(node) in top))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    graph = {name: {target for target, _, _ in _imports(path)} for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{name} imports {target}.{imported}"
        for name, path in MODULES.items()
        for target, imported, _ in _imports(path)
        if imported and imported.startswith("_") and not imported.startswith("__")
    ]
    assert private == []


def test_no_route_imports_another_route() -> None:
    crossing = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("handlers.routes.")
        for target, _, _ in _imports(path)
        if target.startswith("handlers.routes.")
    ]
    assert crossing == []


def _uses_depends(path: Path) -> bool:
    return any(
        isinstance(node, ast.ImportFrom) and node.module == "fastapi" and any(a.name == "Depends" for a in node.names)
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_fastapi_dependencies_are_declared_in_dependencies_py_only() -> None:
    declaring = [name for name, path in MODULES.items() if name != "handlers.dependencies" and _uses_depends(path)]
    assert declaring == []


@pytest.mark.parametrize("module", FASTAPI_FREE)
def test_stores_import_no_fastapi(module: str) -> None:
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'fastapi', 'starlette'}}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"{module} imports {proc.stdout.strip()}"
