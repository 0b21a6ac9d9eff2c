"""The pure helpers behind scans: cursors and prefix ranges must agree with the backends' key order."""

from __future__ import annotations

from enum import IntEnum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage.port import (
    Delete,
    Put,
    _BadValue,
    _check_dict,
    check_document,
    check_op,
    decode_cursor,
    encode_cursor,
    prefix_end,
    scan_range,
)

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
        # A dict or list whose values are all strings, or all ints, is checked at once: one bad value
        # among them is still found and named.
        ({"traits": {"a": "x", "b": "y \udfff", "c": "z"}}, "doc.traits.b", "Unicode"),
        ({"counts": {"a": 1, "b": 2**63, "c": 3}}, "doc.counts.b", "64-bit"),
        ({"counts": [1, -(2**63) - 1, 3]}, "doc.counts[1]", "64-bit"),
        # The names of a dict are checked at once too: a bad one among plain ones.
        ({"a": {"ok": 1, "$set": {"x": 1}}}, "doc.a['$set']", "'$'"),
        ({"a": {"ok": 1, "k\x00": 1}}, "doc.a['k\\x00']", "NUL"),
        ({"a": {"ok": 1, 2: "two"}}, "doc.a[2]", "keys are strings"),
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


def _nested(levels: int, leaf: object) -> dict:
    doc: dict = {"leaf": leaf}
    for _ in range(levels - 1):
        doc = {"next": doc}
    return doc


def test_documents_nest_up_to_64_levels_of_dicts_and_lists() -> None:
    assert check_document("profiles", "p1", _nested(64, "deepest"))
    assert check_document("profiles", "p1", _nested(63, ["a list in the 63rd dict"]))
    for too_deep in (_nested(65, "x"), _nested(64, ["a list in the 64th dict"]), _nested(63, [{"x": 1}])):
        with pytest.raises(InvalidArgument, match="deeper than 64"):
            check_document("profiles", "p1", too_deep)


def test_a_dollar_or_a_non_ascii_letter_inside_a_name_is_portable() -> None:
    doc = {"price$usd": 1, "a$": {"b$": ["c"]}, "naïve": {"ß": "x"}}

    assert check_document("profiles", "p1", doc) is doc


# Mostly portable, now and then not: a document with one bad part among plain ones is the case to catch.
_plain_names = ["a", "b", "c", "d", "e", "f", "ok_1", "x$", "ü", "ß"]
_names = st.sampled_from(_plain_names * 4 + ["$set", "k\x00", "bad \ud800", 2])
_plain_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)
)
_bad_leaves = st.one_of(
    st.sampled_from([float("nan"), float("inf"), 2**63, -(2**63) - 1, 2**64, b"raw", (1, 2), "lone \udc00"]),
    st.text(max_size=3),
    st.just(_Level.HIGH),
)
_leaves = st.one_of(_plain_leaves, _plain_leaves, _plain_leaves, st.text(max_size=3), _bad_leaves)
_documents = st.dictionaries(
    _names,
    st.recursive(
        _leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_names, inner, max_size=4), max_leaves=8
    ),
    max_size=4,
)


# Wider dicts and lists too: the quick check takes a few values one by one and more than a few by their
# kinds (all strings, all ints) at once, so both ways are walked.
_wide_documents = st.dictionaries(
    _names,
    st.recursive(
        _leaves,
        lambda inner: st.lists(inner, max_size=12) | st.dictionaries(_names, inner, max_size=12),
        max_leaves=30,
    ),
    max_size=12,
)
_homogeneous = st.one_of(
    st.lists(st.one_of(st.text(max_size=3), st.text(max_size=3), _bad_leaves), min_size=7, max_size=12),
    st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), _bad_leaves), min_size=7, max_size=12),
    st.dictionaries(st.sampled_from(_plain_names), st.one_of(st.text(max_size=3), _bad_leaves), min_size=7),
)


@settings(max_examples=500)
@given(st.one_of(_documents, _wide_documents, st.dictionaries(_names, _homogeneous, max_size=3)))
def test_the_quick_check_refuses_exactly_what_the_full_walk_refuses_and_names_the_same_field(doc: dict) -> None:
    # check_document first asks a quick check that only says "certainly storable"; the full walk
    # (`_check_dict`) decides everything else. The two must agree on every document.
    try:
        _check_dict(doc, 1)
    except _BadValue as bad:
        expected = "doc" + "".join(reversed(bad.path))
        with pytest.raises(InvalidArgument) as caught:
            check_document("profiles", "p1", doc)
        assert caught.value.field == expected
    else:
        assert check_document("profiles", "p1", doc) is doc


@pytest.mark.parametrize(
    ("op", "field"),
    [
        (Put("profiles", "a\x00b", {}), "ops[2].key"),
        (Put("profiles", "", {}), "ops[2].key"),
        (Put("profiles", "x" * 1025, {}), "ops[2].key"),
        (Put("profiles", 42, {}), "ops[2].key"),  # type: ignore[arg-type]
        (Put("profiles", "bad \ud800", {}), "ops[2].key"),
        (Put("profiles", "k", {}, expected_version=True), "ops[2].expected_version"),
        (Delete("profiles", "k", expected_version=-1), "ops[2].expected_version"),
        (Delete("profiles", "k", expected_version=1.0), "ops[2].expected_version"),  # type: ignore[arg-type]
        (Put("profiles", "k", ["not", "a", "dict"]), "ops[2].doc"),  # type: ignore[arg-type]
        (Put("profiles", "k", {"a": {"$b": 1}}), "ops[2].doc.a['$b']"),
        (Put("system.profiles", "k", {}), "collection"),
        (("profiles", "k"), "ops[2]"),
    ],
)
def test_an_op_of_a_collection_written_before_is_still_checked_in_full(op: object, field: str) -> None:
    check_op(Put("profiles", "k", {"a": 1}), 0)  # the collection is known from here on

    with pytest.raises(InvalidArgument) as caught:
        check_op(op, 2)

    assert caught.value.field == field


def test_ops_with_any_valid_key_and_version_are_accepted() -> None:
    for op in (
        Put("profiles", "email:ada@example.com", {"a": 1}, expected_version=0),
        Put("profiles", "ключ", {"naïve": "ü"}, expected_version=3),
        Delete("profiles", "k" * 1024, expected_version=0),
        Delete("profiles", "k"),
    ):
        assert check_op(op, 0) is op
