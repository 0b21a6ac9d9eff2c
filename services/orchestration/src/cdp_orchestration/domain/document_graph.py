"""The checks of a journey's steps as a graph: every target names a step, every step can be reached from
the start, and no loop runs without waiting (a delay or a wait step on it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cdp_orchestration.domain.journey import Node


def check_graph(
    problem: Callable[[str | None, str, str], None], items: list[Any], nodes: Mapping[str, Node], start: str
) -> None:
    """Record (`problem(node, field, message)`) every dangling target, unreachable step and loop that never
    waits, among the steps `items` (the document's) of which `nodes` parsed."""
    # Edges come from the document itself, so a step that failed to parse still has its targets checked
    # and still makes the steps after it reachable (one mistake, one problem).
    edges: dict[str, list[tuple[str, str]]] = {}
    waits: set[str] = set()
    for item in items:
        node_id = item.get("id") if isinstance(item, Mapping) else None
        if isinstance(node_id, str) and node_id in nodes and node_id not in edges:
            edges[node_id] = _raw_targets(item)
            if item.get("type") in ("delay", "wait"):
                waits.add(node_id)
    for node_id, targets in edges.items():
        for name, target in targets:
            if target not in nodes:
                problem(node_id, f"nodes.{node_id}.{name}", f"{target!r} is not the id of a step")
    successors = {n: [t for _, t in targets if t in nodes] for n, targets in edges.items()}
    reachable = {start}
    frontier = [start]
    while frontier:
        for target in successors.get(frontier.pop(), ()):
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    for node_id in nodes:
        if node_id not in reachable:
            problem(node_id, f"nodes.{node_id}.id", f"cannot be reached from the start step {start!r}")
    for cycle in _cycles_without_waiting(successors, waits):
        problem(
            cycle[0],
            f"nodes.{cycle[0]}.next",
            f"loops back through {' -> '.join([*cycle, cycle[0]])} without a delay or wait: "
            "an instance would run it forever; put a delay or a wait on the loop",
        )


def _raw_targets(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, target) for each edge a step's document names, the field as written."""
    pairs: list[tuple[str, Any]] = [(key, item.get(key)) for key in ("next", "timeout_next", "else")]
    for key in ("branches", "variants"):
        listed = item.get(key)
        if isinstance(listed, list):
            pairs += [(f"{key}[{i}].next", x.get("next")) for i, x in enumerate(listed) if isinstance(x, Mapping)]
    return [(name, target) for name, target in pairs if isinstance(target, str) and target]


def _cycles_without_waiting(successors: Mapping[str, list[str]], waits: set[str]) -> list[list[str]]:
    """Cycles among steps that never wait (delay and wait steps cut loops), at least one per loop."""
    moving = {node_id for node_id in successors if node_id not in waits}
    edges = {n: [t for t in successors[n] if t in moving] for n in moving}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(moving):
        if root in state:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node_id, i = stack.pop()
            if i == 0:
                state[node_id] = 1
                path.append(node_id)
            if i < len(edges[node_id]):
                stack.append((node_id, i + 1))
                target = edges[node_id][i]
                if state.get(target) == 1:
                    cycles.append(path[path.index(target) :])
                elif target not in state:
                    stack.append((target, 0))
            else:
                state[node_id] = 2
                path.pop()
    return cycles
