from __future__ import annotations

import numpy as np
import pytest

from cdp_identity.matching.comparisons import build_comparison
from cdp_identity.matching.config import MatchConfig
from cdp_identity.matching.records import RecordTable
from cdp_kit.errors import InvalidArgument


def level(spec: dict, left: object, right: object) -> str:
    """The level label of one pair; left/right are the field's values or whole records (dicts)."""
    config = MatchConfig.from_dict({"comparisons": [spec], "blocking_rules": [spec["field"]]})
    comparison = build_comparison(config.comparisons[0])
    records = [
        {"id": position, **(value if isinstance(value, dict) else {spec["field"]: value})}
        for position, value in enumerate([left, right])
    ]
    table = RecordTable.from_records(records, config.normalisers())
    forward = comparison.compare(table, np.array([0]), np.array([1]))[0]
    backward = comparison.compare(table, np.array([1]), np.array([0]))[0]
    assert forward == backward, "levels must not depend on the order of the pair"
    return comparison.labels[forward]


EXACT = {"field": "city", "kind": "exact"}
JW = {"field": "last_name", "kind": "jaro_winkler", "thresholds": [0.92, 0.8], "normalise": "name"}
LEV = {"field": "zip", "kind": "levenshtein", "thresholds": [1, 2], "normalise": "digits"}
DATE = {"field": "dob", "kind": "date", "thresholds": [30, 365]}
NUMERIC = {"field": "age", "kind": "numeric", "thresholds": [1, 5]}
EMAIL = {"field": "email", "kind": "email", "thresholds": [0.88]}
FIRST = {
    "field": "first_name",
    "kind": "jaro_winkler",
    "thresholds": [0.92, 0.8],
    "normalise": "name",
    "nicknames": True,
    "swap_field": "last_name",
}


@pytest.mark.parametrize("spec", [EXACT, JW, LEV, DATE, NUMERIC, EMAIL, FIRST])
@pytest.mark.parametrize(("left", "right"), [(None, None), ("", "x"), (None, "2001-01-01"), ("  ", "3")])
def test_a_missing_side_is_the_null_level(spec, left, right):
    if spec is DATE and right:
        right = "2001-01-01"  # a present date must be a date (see test_an_impossible_date_is_refused)
    assert level(spec, left, right) == "null"


def test_exact_is_case_and_whitespace_insensitive_but_not_fuzzy():
    assert level(EXACT, "New York", " new  YORK ") == "exact"
    assert level(EXACT, "New York", "New Yrok") == "else"


def test_jaro_winkler_levels_follow_the_thresholds():
    assert level(JW, "Johnson", "JOHNSON") == "exact"
    assert level(JW, "Johnson", "Johnsen") == "jaro_winkler>=0.92"  # 0.943
    assert level(JW, "Martha", "Marhta") == "jaro_winkler>=0.92"  # transposition: 0.961
    assert level(JW, "Dixon", "Dicksonx") == "jaro_winkler>=0.8"  # 0.813
    assert level(JW, "Smith", "Garcia") == "else"


def test_unicode_names_compare_after_folding_accents():
    assert level(JW, "Núñez", "Nunez") == "exact"
    assert level(JW, "Müller", "Muller") == "exact"
    assert level(JW, "Åström", "Astrom") == "exact"
    assert level(JW, "Ζωή", "ζωη") == "exact"  # Greek: case and accent folding too


def test_levenshtein_levels_by_edit_distance():
    assert level(LEV, "02147", "021-47") == "exact"
    assert level(LEV, "02147", "02148") == "levenshtein<=1"
    assert level(LEV, "02147", "0214") == "levenshtein<=1"
    assert level(LEV, "02147", "20147") == "levenshtein<=2"
    assert level(LEV, "02147", "99999") == "else"


def test_date_levels():
    assert level(DATE, "1985-03-07", "1985-3-7") == "exact"
    assert level(DATE, "1985-03-07", "1985-07-03") == "day_month_swap_or_one_component"
    assert level(DATE, "1985-03-07", "1995-03-07") == "day_month_swap_or_one_component"  # year typo
    assert level(DATE, "1985-03-07", "1985-03-27") == "day_month_swap_or_one_component"
    assert level(DATE, "1985-03-31", "1985-04-02") == "within_30_days"
    assert level(DATE, "1985-12-30", "1986-03-01") == "within_365_days"
    assert level(DATE, "1985-12-30", "1990-06-01") == "else"


def test_an_impossible_date_is_refused_not_read_as_missing():
    with pytest.raises(InvalidArgument) as raised:
        level(DATE, "1985-02-30", "1985-03-01")
    assert raised.value.field == "records[0].dob"


def test_numeric_levels():
    assert level(NUMERIC, "40", 40.0) == "exact"
    assert level(NUMERIC, 40, 41) == "abs_diff<=1"
    assert level(NUMERIC, 40, 44.5) == "abs_diff<=5"
    assert level(NUMERIC, 40, 60) == "else"
    assert level(NUMERIC, 40, "forty") == "null"


def test_email_levels():
    assert level(EMAIL, "John.Smith@Gmail.com", "johnsmith@gmail.com") == "exact"
    assert level(EMAIL, "john.smith@gmail.com", "johnsmith@yahoo.com") == "same_local_part"
    assert level(EMAIL, "john.smith@gmail.com", "john.smiht@gmail.com") == "jaro_winkler>=0.88"
    assert level(EMAIL, "john.smith@gmail.com", "mary.jones@aol.com") == "else"


def test_nicknames_are_a_level_of_their_own():
    assert level(FIRST, "Robert", "Bob") == "nickname"
    assert level(FIRST, "bill", "WILLIAM") == "nickname"
    assert level(FIRST, "Liz", "Elizabeth") == "nickname"
    assert level(FIRST, "Kate", "Katherine") == "nickname"
    assert level(FIRST, "Robert", "Roberta") == "jaro_winkler>=0.92"
    assert level(FIRST, "Samuel", "Samantha") != "nickname"  # both are "Sam", not each other
    assert level(JW, "Robert", "Bob") == "else"  # only where the comparison asks for it


def test_swapped_first_and_last_name():
    john_smith = {"first_name": "John", "last_name": "Smith"}
    assert level(FIRST, john_smith, {"first_name": "Smith", "last_name": "John"}) == "swapped"
    # One crossing alone is a housemate who shares the surname, not a swap.
    assert (
        level(FIRST, {"first_name": "Smith", "last_name": "John"}, {"first_name": "Mary", "last_name": "Smith"})
        == "else"
    )
    assert level(FIRST, john_smith, {"first_name": "Smith", "last_name": None}) == "else"
    assert level(FIRST, john_smith, {"first_name": "John", "last_name": "Jones"}) == "exact"


def test_levels_for_many_pairs_at_once_match_one_by_one():
    config = MatchConfig.from_dict({"comparisons": [JW], "blocking_rules": ["last_name"]})
    comparison = build_comparison(config.comparisons[0])
    names = ["Smith", "Smyth", "Smith", None, "Jones", "Johns", "smith"]
    table = RecordTable.from_records(
        [{"id": i, "last_name": name} for i, name in enumerate(names)], config.normalisers()
    )
    left, right = np.triu_indices(len(names), 1)
    together = comparison.compare(table, left, right)
    for a, b, got in zip(left, right, together, strict=True):
        assert comparison.labels[got] == level(JW, names[a], names[b])


DAMERAU = {"field": "zip", "kind": "damerau_levenshtein", "thresholds": [1, 2], "normalise": "digits"}


def test_damerau_levenshtein_counts_a_transposition_as_one_edit():
    # Swapped neighbouring digits are the commonest keying error; plain Levenshtein calls them two edits.
    assert level(DAMERAU, "02147", "02147") == "exact"
    assert level(DAMERAU, "02147", "02174") == "damerau_levenshtein<=1"
    assert level(LEV, "02147", "02174") == "levenshtein<=2"
    assert level(DAMERAU, "02147", "20174") == "damerau_levenshtein<=2"
    assert level(DAMERAU, "02147", "98765") == "else"
