"""The import graph of bridge/ and connectors/: no cycles, and the layering of the design.

* No import cycle between modules (imports inside functions and under TYPE_CHECKING count: a
  cycle is a design problem even when Python tolerates it).
* Only the composition root (`bridge.app`) imports ``connectors/``; nothing in ``bridge/``
  imports a bus client library (aiokafka, paho) either.
* `bridge.room` (the LiveKit participant) imports nothing else of the bridge (but the package's
  ``__version__``, which it reports to the server).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bridge", "connectors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours (and every third-party top-level package) `path` imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # The longest prefix that is one of our modules, else the top-level package.
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    out.add(candidate)
                    break
            else:
                out.add(parts[0])
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_seen() -> None:
    graph = _graph()
    assert "bridge.runtime.bridge" in graph["bridge.app"]
    assert "connectors.mqtt" in graph["bridge.app"]
    assert "bridge.endpoint" in graph["connectors.mqtt"]


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_composition_root_imports_connectors_and_bus_clients() -> None:
    offenders = {
        name: sorted(i for i in imports if i.startswith("connectors") or i in ("aiokafka", "paho"))
        for name, imports in _graph().items()
        if name.startswith("bridge") and name != "bridge.app"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_participant_knows_nothing_of_the_bridge() -> None:
    offenders = {
        name: sorted(
            i for i in imports if i.startswith("bridge.") and not i.startswith("bridge.room")
        )
        for name, imports in _graph().items()
        if name.startswith("bridge.room")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
