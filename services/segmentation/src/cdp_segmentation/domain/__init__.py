"""The segment language and its two evaluators: plain Python and NumPy, no I/O.

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

from cdp_segmentation.domain.columns import Column, Columns
from cdp_segmentation.domain.compiler import CompiledSegment, compile_segment, computed_trait
from cdp_segmentation.domain.graph import check_segment_graph
from cdp_segmentation.domain.nodes import (
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
from cdp_segmentation.domain.text import SegmentSyntaxError, parse, to_text
from cdp_segmentation.domain.tree import from_json, to_json

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
