"""YAML that people write for the platform (journeys, rules, catalogues, CRM mappings) read as plain data.

One reader for all of it: PyYAML's safe loader (no tags that build objects) with YAML 1.2's booleans.
YAML 1.1, which PyYAML follows, also reads on/off/yes/no/y/n as booleans: the documented journey entry
`{segment: vip, on: entered}` becomes the key True, a rule or catalogue listing an event called `No` or a
segment called `on` gets a boolean where a name was meant, and the document is refused or, worse, quietly
means something else. Here only true/false (any of the three cases YAML 1.2 allows) are booleans; every
other word stays a string. Numbers, nulls and the rest are YAML's as before.

What the safe loader lets through and this reader refuses (each a YAMLError naming the line):
- a key written twice in one mapping (`segments:` twice): PyYAML keeps the last and drops the first
  without a word. A merge key (`<<: *defaults`) may still be overridden by the mapping's own keys.
- nesting deeper than MAX_DEPTH: the composer recurses once per level, and 50,000 `[` end in Python's
  RecursionError rather than an answer.
- aliases that expand to more than MAX_EXPANDED_NODES nodes (600 bytes of "billion laughs" are 10^9
  strings to whoever walks the data); with `aliases=False`, any alias at all, for documents that a
  program writes and that never hold one.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.resolver import Resolver

try:
    from yaml._yaml import CParser as _CParser
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _CParser = None

__all__ = ["MAX_DEPTH", "MAX_EXPANDED_NODES", "YAMLError", "load_yaml"]

YAMLError = yaml.YAMLError

MAX_DEPTH = 100  # levels of nested lists and mappings
MAX_EXPANDED_NODES = 1_000_000  # nodes of the data once every alias is written out

_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "tag:yaml.org,2002:merge"


def _line(mark: Any) -> int:
    return mark.line + 1


class _Checks(Composer):
    """PyYAML's composer refusing repeated keys, deep nesting and alias bombs; with the safe loader's
    constructor it makes the reader (see the module docstring)."""

    allow_aliases = True
    _depth = 0
    _aliased = False

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if not self.allow_aliases:
                raise ComposerError(
                    None,
                    None,
                    f"alias *{event.anchor} on line {_line(event.start_mark)}: this document holds no aliases "
                    f"(write the value of &{event.anchor} out where it is used)",
                    event.start_mark,
                )
            self._aliased = True
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels on line {_line(mark)}", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None and self._aliased:
            _check_expansion(node)
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], Any] = {}
        for key_node, _ in node.value:
            # Scalar keys as written (with their resolved tag: `1` and `'1'` differ); a merge key (`<<`) may
            # be overridden by the mapping's own keys, as YAML means it to be.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            earlier = first.setdefault((key_node.tag, key_node.value), key_node)
            if earlier is not key_node:
                raise ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key_node.value!r} appears twice, on lines {_line(earlier.start_mark)} and "
                    f"{_line(key_node.start_mark)}: keep one (YAML would silently drop the first)",
                    key_node.start_mark,
                )
        return node


def _check_expansion(root: Any) -> None:
    """Refuse a tree whose aliases, written out, make more than MAX_EXPANDED_NODES nodes. Each node is
    sized once (an alias shares its anchor's node), so this costs the size of the text, not of the data."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if not children_done:
            if id(node) in open_:
                raise ComposerError(
                    None, None, f"the alias on line {_line(node.start_mark)} refers to itself", node.start_mark
                )
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        size = 1 + sum(sizes.get(id(child), 0) for child in children)
        if size > MAX_EXPANDED_NODES:
            raise ComposerError(
                None,
                None,
                f"the aliases from line {_line(node.start_mark)} expand to more than {MAX_EXPANDED_NODES} "
                "nodes: write the document without them",
                node.start_mark,
            )
        sizes[id(node)] = size
        open_.discard(id(node))


# The resolver table is a class attribute shared with SafeLoader: copy it without the YAML 1.1 boolean
# rule rather than editing it in place, which would change every SafeLoader in the process.
_Checks.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Checks.yaml_implicit_resolvers.setdefault(_first, []).append(
        (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))
    )


class _PythonLoader(_Checks, yaml.SafeLoader):
    """Everything in Python: where PyYAML was built without libyaml."""


if _CParser is not None:

    class _Loader(_Checks, _CParser, SafeConstructor, Resolver):
        """libyaml's scanner and parser (about four times faster on a large document) under the checking
        composer and the safe constructor."""

        def __init__(self, stream: Any) -> None:
            _CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

else:  # pragma: no cover - PyYAML without libyaml
    _Loader = _PythonLoader  # type: ignore[misc]


class _NoAliasLoader(_Loader):
    allow_aliases = False


def load_yaml(text: str | bytes, *, aliases: bool = True) -> Any:
    """The plain data (dicts, lists, strings, numbers, booleans, None) `text` holds; raises YAMLError,
    also for a repeated key, nesting deeper than MAX_DEPTH and an alias bomb. `aliases=False` refuses
    every alias (`*name`), for documents a program writes."""
    try:
        return yaml.load(text, Loader=_Loader if aliases else _NoAliasLoader)
    except yaml.MarkedYAMLError as error:
        if "maximum nesting depth" not in (error.problem or ""):
            raise
        # libyaml's scanner stops at its own bound (1000 levels of flow nesting) before the composer's
        mark = error.problem_mark
        raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels on line {_line(mark)}", mark) from None
