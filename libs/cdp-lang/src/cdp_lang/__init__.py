"""cdp's condition language (the segment language), shared by segmentation and orchestration: no I/O.

The public API, for a caller deciding about one person at a time (see README.md):

    compile_condition(source, field="condition") -> CompiledCondition     text or JSON tree; InvalidArgument
    CompiledCondition.evaluate(view, now) -> bool                         on `field` names the position
    CompiledCondition.next_change(view, now) -> float | None
    CompiledCondition.reads -> Reads(fields, segments, events, time)      what the answer depends on
    CompiledCondition.computed_traits, .text, .to_json()
    ProfileView(fields, segments, events) / ProfileView.of(traits=..., computed=..., consent=..., scores=...)
    Event(type, name, at, payload, context) / Event.from_json(segment_event)

The modules, for segmentation and for anyone who needs the parts:

- `nodes`: the syntax tree both written forms map onto; `text`: `parse` / `to_text` (the grammar in its
  docstring); `tree`: `from_json` / `to_json` (the JSON shapes); `values`: what values mean (missing,
  numbers, strings, times), the rules every evaluator applies; `percentiles`: what a percentile of the
  population is, and how each evaluator is given it.
- `compiler`: `compile_segment(node)` -> `CompiledSegment`; `plan`, `row`, `vector`, `columns`: the compiled
  form and its per-profile and vectorised (NumPy, whole populations) evaluators.
- `condition`: the one-person API above.
"""

from cdp_kit.errors import InvalidArgument
from cdp_lang.condition import CompiledCondition, Event, ProfileView, Reads, compile_condition, compile_node
from cdp_lang.nodes import EventPredicate, Node
from cdp_lang.text import SegmentSyntaxError, parse, to_text
from cdp_lang.tree import from_json, to_json

__all__ = [
    "CompiledCondition",
    "Event",
    "EventPredicate",
    "InvalidArgument",
    "Node",
    "ProfileView",
    "Reads",
    "SegmentSyntaxError",
    "compile_condition",
    "compile_node",
    "from_json",
    "parse",
    "to_json",
    "to_text",
]
