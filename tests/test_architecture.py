"""The package graph, read from the sources' imports: one way only, and the layers it promises."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "dataloading", "checkpointing", "actors", "orchestrator")
# each package may import only those below it
ALLOWED = {
    "common": set(),
    "dataloading": {"common"},
    "checkpointing": {"common"},
    "actors": {"common", "dataloading", "checkpointing"},
    "orchestrator": {"common", "dataloading", "checkpointing", "actors"},
}


def imports_of(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import of ours in a file, function-local ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in PACKAGES}
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        files = sorted((REPO / package).rglob("*.py"))
        assert files, f"no sources under {package}/"
        for path in files:
            for target, line in imports_of(path):
                if target != package:
                    graph[package].setdefault(target, []).append(f"{path.relative_to(REPO)}:{line}")
    return graph


def test_the_package_graph_is_one_way():
    graph = package_graph()
    assert sum(len(where) for v in graph.values() for where in v.values()) > 20  # the walk found imports at all
    wrong = {f"{p} -> {t}: {', '.join(where)}" for p, targets in graph.items() for t, where in targets.items()
             if t not in ALLOWED[p]}
    assert not wrong, "\n".join(sorted(wrong))


def test_the_graph_has_no_cycle():
    graph = {p: set(t) for p, t in package_graph().items()}
    seen, stack = set(), []

    def visit(p):
        assert p not in stack, f"cycle: {' -> '.join(stack + [p])}"
        if p in seen:
            return
        stack.append(p)
        for t in graph[p]:
            visit(t)
        stack.pop()
        seen.add(p)

    for p in graph:
        visit(p)


def test_the_controller_core_needs_no_ray():
    """control.py, policy.py and the hang rules are pure: they import neither Ray nor torch."""
    for name in ("orchestrator/control.py", "orchestrator/policy.py", "orchestrator/hang/rules.py",
                 "orchestrator/hang/watchdog.py", "orchestrator/controller.py"):
        tree = ast.parse((REPO / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in mods if m.split(".")[0] in ("ray", "torch")}, name
