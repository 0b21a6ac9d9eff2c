"""Segments that read other segments (`in_segment`) must form no cycle and name only segments that exist."""

from __future__ import annotations

from collections.abc import Mapping

from cdp_kit.errors import InvalidArgument

#: The id a definition not yet named (an estimate's) stands under in `check_segment_graph`'s `refs`.
UNNAMED = "$new"


def check_segment_graph(refs: Mapping[str, frozenset[str]]) -> list[str]:
    """Segment ids in an order that puts every segment after the ones it references.

    `refs` maps each segment id to the ids it references. Raises InvalidArgument("definition", ...) naming the
    unknown ids, or the cycle as `a → b → a`.
    """
    # Each reference looked up, never every id walked per segment: `set(targets) - refs.keys()` copies the
    # targets and then walks the whole key view to take it away (dict views subtract so), which made this
    # check, run on every create, update and change of the live segments (`FieldIndex`), quadratic in the
    # segments defined: 1 s of a create's 1.2 s at 1,000 segments.
    unknown = {segment: sorted(t for t in set(targets) if t not in refs) for segment, targets in refs.items()}
    problems = [
        f"{'the definition' if segment == UNNAMED else f'segment {segment!r}'} references "
        f"{', '.join(map(repr, missing))}, which " + ("does" if len(missing) == 1 else "do") + " not exist"
        for segment, missing in sorted(unknown.items())
        if missing
    ]
    if problems:
        raise InvalidArgument("definition", "; ".join(problems) + "; create it first or remove the reference")
    order: list[str] = []
    done: set[str] = set()
    for root in sorted(refs):
        if root in done:
            continue
        # Depth first without recursion: `path` is the chain being explored, each with its pending references.
        path = [root]
        pending = [sorted(refs[root])]
        while path:
            if pending[-1]:
                target = pending[-1].pop(0)
                if target in done:
                    continue
                if target in path:
                    cycle = [*path[path.index(target) :], target]
                    raise InvalidArgument(
                        "definition",
                        f"segments reference each other in a cycle: {' → '.join(cycle)}; remove one in_segment",
                    )
                path.append(target)
                pending.append(sorted(refs[target]))
            else:
                finished = path.pop()
                pending.pop()
                done.add(finished)
                order.append(finished)
    return order
