"""The floor plan, checked from the source: who may import whom, no import cycles, small modules.

Reads every module's imports with `ast` (lazy and TYPE_CHECKING imports included) and checks them
against the layout of docs/architecture.md:
- `radixserve/`'s top-level modules are the floor: they import only the floor.
- `radixserve/gateway/`: the floor and itself. `radixserve/client/`: the floor and itself.
- `radixserve/bench/`: the floor, the client, itself, and the package's public `radixserve.Engine`.
- each `*_proc/`: the floor and itself.
- `radixserve/launch/` (and the package's `__init__` / `__main__`, which defer to it) may import anything, but the
  offline Engine (`launch/engine.py`) reaches the HTTP gateway neither directly nor through another module: it
  shares the front-end core below both (`radixserve/native_api.py`, the sampling checks, tokenizer_proc's core).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("radixserve", "tokenizer_proc", "scheduler_proc", "worker_proc")
MAX_LINES = 400

ALLOWED: dict[str, set[str]] = {
    "floor": {"floor"},
    "gateway": {"floor", "gateway"},
    "client": {"floor", "client"},
    "bench": {"floor", "client", "bench", "package"},
    "tokenizer_proc": {"floor", "tokenizer_proc"},
    "scheduler_proc": {"floor", "scheduler_proc"},
    "worker_proc": {"floor", "worker_proc"},
}

# Modules kept from groups their own group may import, through any chain of imports.
BARRED: dict[str, set[str]] = {"radixserve.launch.engine": {"gateway"}}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def group(module: str) -> str:
    """The layout group a module belongs to."""
    parts = module.split(".")
    if parts[0] != "radixserve":
        return parts[0]
    if module in ("radixserve", "radixserve.__main__"):
        return "package"
    return parts[1] if len(parts) > 2 or parts[1] in ("gateway", "launch", "client", "bench") else "floor"


def imports_of(module: str) -> set[str]:
    """Project modules that `module` imports, resolved to the most specific module that exists."""
    tree = ast.parse(MODULES[module].read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if node.module == "radixserve" and alias.name == "__version__":
                    continue  # a constant, not the package's lazy Engine
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_layout_groups_are_known() -> None:
    groups = {group(m) for m in MODULES}
    assert groups <= set(ALLOWED) | {"launch", "package"}, groups


@pytest.mark.parametrize("module", sorted(m for m in MODULES if group(m) in ALLOWED))
def test_no_forbidden_import(module: str) -> None:
    allowed = ALLOWED[group(module)]
    bad = sorted(dep for dep in GRAPH[module] if group(dep) not in allowed)
    assert not bad, f"{module} ({group(module)}) may import only {sorted(allowed)}; it imports {bad}"


def reachable(module: str) -> set[str]:
    """Every project module that importing `module` loads (its imports, theirs, and so on)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += GRAPH[name]
    return seen - {module}


@pytest.mark.parametrize("module", sorted(BARRED))
def test_no_barred_import(module: str) -> None:
    bad = sorted(dep for dep in reachable(module) if group(dep) in BARRED[module])
    assert not bad, f"{module} must not reach {sorted(BARRED[module])}; it imports {bad}"


def test_barred_imports_are_seen() -> None:
    """The rule bites: the launcher's server (launch/serve.py) reaches the gateway, so the Engine's rule would see
    such an import, direct or through another module."""
    serve = "radixserve.launch.serve"
    indirect = {dep for dep in reachable(serve) - GRAPH[serve] if group(dep) == "gateway"}
    assert "radixserve.gateway.tool_calls" in indirect, indirect  # through gateway.app only


def test_bench_uses_only_the_public_engine() -> None:
    for module in (m for m in MODULES if group(m) == "bench"):
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "radixserve":
                names = {a.name for a in node.names}
                assert names <= {"Engine", "__version__"}, (module, names)


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components over module imports: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (limit {MAX_LINES})"


def test_checker_sees_imports() -> None:
    """The rules bite: the graph holds lazy imports (the launcher's of the processes) and groups are right."""
    assert {"tokenizer_proc.frontend", "radixserve.launch.supervisor", "radixserve.native_api"} <= \
        GRAPH["radixserve.launch.engine"]
    assert {"scheduler_proc.main", "worker_proc.main"} <= GRAPH["radixserve.launch.supervisor"]
    assert [group(m) for m in ("radixserve.wire", "radixserve.gateway.app", "radixserve.bench.serve",
                               "scheduler_proc.radix_cache", "radixserve")] == \
        ["floor", "gateway", "bench", "scheduler_proc", "package"]


def test_engine_import_loads_no_http_stack() -> None:
    """`radixserve.Engine` runs without the HTTP process's stack: importing it loads neither aiohttp nor zmq.asyncio."""
    code = ("import sys, radixserve; radixserve.Engine; "
            "print(sorted(m for m in ('aiohttp', 'zmq.asyncio', 'uvloop') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
