"""The quick document check (`checks._plain_values`) takes nested dicts and lists inline, and skips the
walk of an empty one: an empty dict or list past the depth limit is still refused, named like the full
walk names it, and a bad value anywhere in a record-shaped document is still found."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage.checks import check_document


def _nested(levels: int, leaf: object) -> dict:
    doc: dict = {"leaf": leaf}
    for _ in range(levels - 1):
        doc = {"next": doc}
    return doc


@pytest.mark.parametrize("leaf", [{}, [], [[]], [{}], {"x": []}])
def test_an_empty_dict_or_list_past_64_levels_is_refused(leaf: object) -> None:
    with pytest.raises(InvalidArgument, match="deeper than 64") as caught:
        check_document("profiles", "p1", _nested(64, leaf))

    assert caught.value.field.startswith("doc" + ".next" * 63 + ".leaf")


@pytest.mark.parametrize("leaf", [{}, [], "x"])
def test_an_empty_dict_or_list_at_the_limit_is_stored(leaf: object) -> None:
    doc = _nested(63, leaf)

    assert check_document("profiles", "p1", doc) is doc


def _record() -> dict:
    """Shaped like orchestration's instance record: many kinds side by side, small nested parts."""
    return {
        "v": 1,
        "id": "i1",
        "status": "active",
        "entered_at": 1764000000.5,
        "trigger_at": None,
        "visits": {"start": 1, "wait": 2},
        "timers": [["t1", 1764000100.0, "wait", "delay"]],
        "pending": [],
        "variants": {},
        "entry": {"plan": "pro", "ltv": 12.5, "vip": False},
        "steps": [["start", 1764000000.5, "ok"], ["send", 1764000001.5, "sent"]],
    }


_BAD = [(float("nan"), "finite"), (2**63, "64-bit"), ("lone \udc00", "Unicode"), ((1, 2), "tuple"), (b"x", "bytes")]


@pytest.mark.parametrize(("bad", "problem"), _BAD)
@pytest.mark.parametrize(
    ("place", "field"),
    [
        (lambda doc, bad: doc.__setitem__("trigger_at", bad), "doc.trigger_at"),
        (lambda doc, bad: doc["visits"].__setitem__("wait", bad), "doc.visits.wait"),
        (lambda doc, bad: doc["timers"][0].__setitem__(1, bad), "doc.timers[0][1]"),
        (lambda doc, bad: doc["pending"].append(bad), "doc.pending[0]"),
        (lambda doc, bad: doc["variants"].__setitem__("a", bad), "doc.variants.a"),
        (lambda doc, bad: doc["steps"][1].__setitem__(2, bad), "doc.steps[1][2]"),
    ],
)
def test_a_bad_value_anywhere_in_a_record_is_refused_and_named(place, field: str, bad: object, problem: str) -> None:
    doc = _record()
    assert check_document("profiles", "p1", doc) is doc
    place(doc, bad)

    with pytest.raises(InvalidArgument, match=problem) as caught:
        check_document("profiles", "p1", doc)

    assert caught.value.field == field
