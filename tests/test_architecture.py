"""The shape of the package (docs/architecture.md), kept by tools rather than by care alone:

- the import-linter contracts in pyproject.toml (layers; the math and the methods never touch DeepSpeed or comm;
  only comm and zero import DeepSpeed; nothing imports the entry points);
- no import cycle among dszo's modules, counting imports inside functions (grimp's graph has them);
- torch.distributed and DeepSpeed's `ds_*` parameter attributes only in dszo/comm.py and dszo/zero.py;
- no code outside dszo/methods/ compares a method's name (it asks the method's capabilities);
- every function under 60 lines.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "dszo"
MAX_FUNCTION_LINES = 60
DISTRIBUTED_MODULES = {"comm.py", "zero.py"}


def _sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_dszo_modules():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("dszo")
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("dszo")}
             for m in graph.modules if m.startswith("dszo")}
    assert len(edges) > 30
    assert _cycles(edges) == []


def _attribute_uses(tree: ast.Module) -> set[str]:
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.args[1].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") in
              ("getattr", "hasattr") and len(n.args) > 1 and isinstance(n.args[1], ast.Constant)}
    return {str(n) for n in names}


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return out


def test_only_comm_and_zero_touch_torch_distributed_and_ds_attributes():
    offenders = []
    for path, tree in _sources().items():
        if path in DISTRIBUTED_MODULES:
            continue
        if any(i.startswith("torch.distributed") for i in _imports(tree)):
            offenders.append(f"{path} imports torch.distributed")
        if "distributed" in _attribute_uses(tree):
            offenders.append(f"{path} uses torch.distributed")
        ds = sorted(a for a in _attribute_uses(tree) if a.startswith("ds_"))
        if ds:
            offenders.append(f"{path} reads ZeRO-3's {ds}")
    assert not offenders, offenders


def test_no_method_name_is_compared_outside_the_methods():
    from dszo.methods import names

    methods = set(names())

    def is_name(node) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_name(e) for e in node.elts)
        return isinstance(node, ast.Constant) and node.value in methods

    offenders = [f"{path}:{n.lineno}" for path, tree in _sources().items() if not path.startswith("methods/")
                 for n in ast.walk(tree) if isinstance(n, ast.Compare) and any(is_name(c) for c in [n.left, *n.comparators])]
    assert not offenders, f"method names tested outside dszo/methods (use its capabilities): {offenders}"


def test_every_function_is_short():
    long = [f"{path}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for path, tree in _sources().items() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long
