"""The segment language and its two evaluators: plain Python and NumPy, no I/O.

The language lives in the shared library `cdp_lang` (orchestration's conditions are written in it too); the
modules below, except `graph`, are that library's modules under their old names, so existing imports work.

- `nodes`: the syntax tree (frozen dataclasses) both written forms map onto.
- `text`: `parse(text)` and `to_text(node)`, the grammar in its docstring; `SegmentSyntaxError`.
- `tree`: `from_json(tree)` and `to_json(node)`, the JSON shapes in its docstring.
- `compiler`: `compile_segment(node)` -> `CompiledSegment` (evaluate, next_change, evaluate_columns, and the
  fields, segments and profile computed traits a segment reads).
- `values`: what values mean (missing, numbers, strings, times); both evaluators apply these rules.
- `plan`, `row`, `vector`: the compiled form and its per-profile and vectorised evaluators.
- `columns`: `Columns`, a population as typed column views.
- `graph`: `check_segment_graph`, cycles and unknown references between segments.
"""

from cdp_lang.columns import Column, Columns
from cdp_lang.compiler import CompiledSegment, compile_segment, computed_trait
from cdp_lang.nodes import (
    Aggregate,
    And,
    Condition,
    Date,
    EventCondition,
    EventPredicate,
    InSegment,
    Node,
    Not,
    Now,
    Or,
    Performed,
)
from cdp_lang.text import SegmentSyntaxError, parse, to_text
from cdp_lang.tree import from_json, to_json
from cdp_segmentation.domain.graph import check_segment_graph

__all__ = [
    "Aggregate",
    "And",
    "Column",
    "Columns",
    "CompiledSegment",
    "Condition",
    "Date",
    "EventCondition",
    "EventPredicate",
    "InSegment",
    "Node",
    "Not",
    "Now",
    "Or",
    "Performed",
    "SegmentSyntaxError",
    "check_segment_graph",
    "compile_segment",
    "computed_trait",
    "from_json",
    "parse",
    "to_json",
    "to_text",
]
