"""The pure helpers behind scans: cursors and prefix ranges must agree with the backends' key order."""

from __future__ import annotations

from enum import IntEnum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage.port import check_document, decode_cursor, encode_cursor, prefix_end, scan_range

keys = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=12)


@given(key=keys)
def test_a_cursor_round_trips_any_key(key: str) -> None:
    cursor = encode_cursor(key)

    assert cursor.isascii() and decode_cursor(cursor) == key


@given(prefix=keys, key=keys)
def test_the_prefix_range_holds_exactly_the_keys_with_the_prefix(prefix: str, key: str) -> None:
    end = prefix_end(prefix)
    # Python orders str by code point: the same as UTF-8 byte order, which SQLite and MongoDB use.
    assert (key < prefix) == (key.encode() < prefix.encode())
    inside = key >= prefix and (end is None or key < end)

    assert inside == key.startswith(prefix)


def test_prefix_end_carries_past_the_last_code_point_and_skips_surrogates() -> None:
    assert prefix_end("user/") == "user0"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\U0010ffff\U0010ffff") is None
    assert prefix_end("\ud7ff") == "\ue000"


def test_a_cursor_behind_the_prefix_starts_at_the_prefix() -> None:
    assert scan_range(encode_cursor("a"), "m").start == "m"
    assert scan_range(encode_cursor("mz"), "m").after == "mz"


@pytest.mark.parametrize("cursor", ["", "k1.", "k1.!!!", "v9.abc", "k1.gA"])
def test_foreign_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidArgument):
        decode_cursor(cursor)


class _Level(IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    ("doc", "field", "problem"),
    [
        # Values in lists and in dicts nested in lists: checked inline, named by their path.
        ({"xs": [1.0, float("nan")]}, "doc.xs[1]", "finite"),
        ({"xs": ["a", [float("-inf")]]}, "doc.xs[1][0]", "finite"),
        ({"xs": [0, -(2**63) - 1]}, "doc.xs[1]", "64-bit"),
        ({"xs": ["ok", "bad \ud800"]}, "doc.xs[1]", "Unicode"),
        ({"xs": [{"ok": 1}, {"$inc": 1}]}, "doc.xs[1]['$inc']", "'$'"),
        ({"a": {"b": {"c": 2**64}}}, "doc.a.b.c", "64-bit"),
        ({"a": {"bad \udc00": 1}}, "doc.a['bad \\udc00']", "Unicode"),
        ({"a": {"k": b"raw"}}, "doc.a.k", "bytes"),
    ],
)
def test_a_document_is_refused_naming_the_first_unportable_value(doc: dict, field: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_document("profiles", "p1", doc)

    assert caught.value.field == field
    assert problem in str(caught.value)


def test_portable_values_of_every_plain_kind_and_their_subclasses_are_accepted() -> None:
    doc = {
        "ü-key": {"日本": ["ü", 1, 2**63 - 1, -(2**63), 0.5, True, False, None, [], {}]},
        "level": _Level.HIGH,
        "levels": [_Level.HIGH, {"nested": _Level.HIGH}],
        "text": "plain",
    }

    assert check_document("profiles", "p1", doc) is doc
