"""The layers: storage at the bottom, a Prefect-free core, thin tasks, flows that wire."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.checkpoints import build_checkpoint
from tests.helpers import IGNORE, ROOT, files

PRODUCTION = ("storage", "tasks", "flows")


def imported(path) -> set[str]:
    """Top-level names of every module a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("storage", ("tasks", "flows", "prefect", "prefect_dask")),
        (
            "tasks/core",
            (
                "tasks.download",
                "tasks.quantize",
                "tasks.plan",
                "tasks.finalize",
                "tasks.verify",
                "flows",
                "prefect",
                "prefect_dask",
            ),
        ),
        ("tasks", ("flows",)),
    ],
)
def test_each_layer_imports_only_what_lies_below(folder, forbidden):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported(path):
            bad = [f for f in forbidden if name == f or name.startswith(f + ".")]
            assert not bad, f"{path.relative_to(ROOT)} imports {name}"


def module_graph() -> dict[str, set[str]]:
    """Module -> the production modules it imports, at module level or inside functions.

    `from a.b import c` is an edge to a.b.c when that is a module, else to a.b; a
    package's own submodules it imports are edges like any other.
    """
    paths = {}
    for d in PRODUCTION:
        for path in (ROOT / d).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) + 1 - node.level]
                    base = ".".join([*up, base] if base else up)
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of two or more
    modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    """No module imports, even inside a function, a module that imports it back: each layer
    and each module in it can be read, changed and tested from the bottom up."""
    assert cycles(module_graph()) == []


def test_the_cycle_check_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "tasks.core.planner" in module_graph()["tasks.plan"]


def test_core_modules_name_their_public_names():
    """Every module of the core declares `__all__`, and each name in it is the module's."""
    import importlib

    for path in sorted((ROOT / "tasks" / "core").rglob("*.py")):
        if path.name == "__init__.py" and path.parent.name != "verify":
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(name)
        assert module.__all__, name
        assert [n for n in module.__all__ if not hasattr(module, n)] == [], name


MUTATORS = ("update", "pop", "clear", "setdefault", "append", "extend", "add", "remove")


def test_no_module_writes_into_another_modules_globals():
    """A module's state is its own: others go through what it exports (a context manager,
    a function), never assign or mutate its attributes or its tables (UPPER_CASE names)."""
    writes = []
    for d in PRODUCTION:
        for path in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(path.read_text())
            ours = {
                a.asname or a.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PRODUCTION)
                for a in node.names
            } | {
                (a.asname or a.name).split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for a in node.names
                if a.name.startswith(PRODUCTION)
            }
            for node in ast.walk(tree):
                targets = []
                if isinstance(node, ast.Assign | ast.AugAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    named = isinstance(node.func.value, ast.Name) and node.func.value.id.isupper()
                    if node.func.attr in MUTATORS and named:
                        targets = [node.func]
                for target in targets:
                    base = target
                    while isinstance(base, ast.Attribute | ast.Subscript):
                        base = base.value
                    if base is not target and isinstance(base, ast.Name) and base.id in ours:
                        writes.append(
                            f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(target)}"
                        )
    assert not writes


def test_no_module_imports_the_private_names_of_another():
    """What two modules share is public, or they are one module."""
    private = [
        f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
        for d in PRODUCTION
        for path in sorted((ROOT / d).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not private


CORE_WITHOUT_PREFECT = """
import json, pkgutil, importlib, sys
sys.modules["prefect"] = None  # any import of prefect now raises ImportError
import tasks.core
for m in pkgutil.walk_packages(tasks.core.__path__, "tasks.core."):
    importlib.import_module(m.name)
from tasks.core.pipeline import quantize
from tasks.core.schemes import resolve_config
config = resolve_config("NVFP4A16", ignore=json.loads(sys.argv[3]))
summary = quantize(sys.argv[1], sys.argv[2], config)
from tasks.core.verify import verify
assert verify(sys.argv[1], sys.argv[2]).ok
assert not any(m == "prefect" or m.startswith("prefect.") for m in sys.modules if sys.modules[m])
print(json.dumps([m.name for m in summary.shards]))
"""


@pytest.mark.slow  # over 10 s on 2 cores
def test_core_quantizes_and_verifies_with_prefect_unimportable(tmp_path):
    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=3)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", CORE_WITHOUT_PREFECT, str(src), str(out), json.dumps(IGNORE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = json.loads(proc.stdout.splitlines()[-1])
    assert len(shards) == 3 and all(s in files(out) for s in shards)
    assert json.loads(files(out)["config.json"])["quantization_config"]["format"] == (
        "nvfp4-pack-quantized"
    )


@pytest.mark.slow
def test_plan_imports_no_prefect(tmp_path):
    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    script = (
        "import sys; from flows.cli import main; rc = main(['plan', sys.argv[1], '--scheme', "
        "'FP8_BLOCK']); print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "[]"


def test_dtype_table_skips_what_this_torch_lacks():
    """torch < 2.7 has no float8_e8m0fnu: the table leaves F8_E8M0 out instead of failing."""
    script = (
        "import torch; del torch.float8_e8m0fnu; from storage.safetensors import DTYPES; "
        "assert 'F8_E8M0' not in DTYPES and 'BF16' in DTYPES and 'F8_E4M3' in DTYPES"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
