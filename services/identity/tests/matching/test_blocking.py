from __future__ import annotations

import numpy as np
import pytest

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, Matcher
from cdp_identity.matching.blocking import BlockingRule, KeyPart, candidate_pairs
from cdp_identity.matching.normalise import normalise_text
from cdp_identity.matching.records import RecordTable
from cdp_testing.people import true_pairs


def pairs_for(records: list[dict], rules: list[str], max_block_size: int = 1000) -> set[tuple]:
    parsed = tuple(BlockingRule.parse(rule) for rule in rules)
    fields = {name for rule in parsed for name in rule.fields}
    table = RecordTable.from_records(records, dict.fromkeys(fields, normalise_text))
    candidates = candidate_pairs(table, parsed, max_block_size)
    return {(table.ids[a], table.ids[b]) for a, b in zip(candidates.left, candidates.right, strict=True)}


def test_rules_parse_fields_and_slices():
    rule = BlockingRule.parse("first_name[0:1] + last_name[:3]+zip")
    assert rule.parts == (KeyPart("first_name", 0, 1), KeyPart("last_name", None, 3), KeyPart("zip"))
    assert rule.fields == ("first_name", "last_name", "zip")


@pytest.mark.parametrize("bad", ["", "   ", "first_name[0:x]", "first name", "email+", "a+a", "id", 42])
def test_unparseable_rules_are_rejected(bad):
    with pytest.raises(ValueError):
        BlockingRule.parse(bad)


def test_equal_keys_pair_up_once_without_self_pairs():
    records = [
        {"id": "a", "email": "x@example.com", "phone": "1"},
        {"id": "b", "email": "X@example.com ", "phone": "1"},
        {"id": "c", "email": "y@example.com", "phone": "1"},
        {"id": "d", "email": None, "phone": None},
        {"id": "e", "email": None, "phone": None},
    ]
    pairs = pairs_for(records, ["email", "phone"])
    # a-b share both email and phone but appear once; missing values never form a block.
    assert pairs == {("a", "b"), ("a", "c"), ("b", "c")}


def test_prefix_slices_and_compound_keys():
    records = [
        {"id": 1, "first_name": "John", "last_name": "Smith", "zip": "10001"},
        {"id": 2, "first_name": "Jane", "last_name": "Smithers", "zip": "10001"},
        {"id": 3, "first_name": "John", "last_name": "Smith", "zip": "10002"},
        {"id": 4, "first_name": "", "last_name": "Smith", "zip": "10001"},
    ]
    assert pairs_for(records, ["first_name[0:1]+last_name[0:3]+zip"]) == {(1, 2)}


def test_oversized_blocks_contribute_no_pairs():
    records = [{"id": i, "phone": "000"} for i in range(50)] + [{"id": 100, "phone": "1"}, {"id": 101, "phone": "1"}]
    assert pairs_for(records, ["phone"], max_block_size=10) == {(100, 101)}


def test_default_rules_find_the_true_pairs_of_a_generated_population(population):
    records, truth = population
    candidates = Matcher(DEFAULT_PERSON_CONFIG).candidate_pairs(records)
    normalised = {tuple(sorted(pair)) for pair in candidates}
    assert len(normalised) == len(candidates), "each pair once"
    assert all(left != right for left, right in candidates)
    truth_pairs = true_pairs(truth)
    assert len(normalised & truth_pairs) / len(truth_pairs) >= 0.95
    # Blocking is selective: a small multiple of the true pairs, nowhere near n².
    assert len(candidates) < 3 * len(truth_pairs)


def test_blocking_grows_with_pairs_not_with_n_squared():
    rng = np.random.default_rng(0)
    n = 30_000
    records = [{"id": i, "zip": f"{rng.integers(0, 3000):05d}"} for i in range(n)]
    pairs = pairs_for(records, ["zip"])
    # About n²/(2·3000) = 150k pairs from 30k records; every pair really shares its zip.
    assert 100_000 < len(pairs) < 200_000
    by_id = {record["id"]: record["zip"] for record in records}
    assert all(by_id[a] == by_id[b] and a < b for a, b in pairs)


def test_an_unordered_pair_of_fields_blocks_swapped_names_together():
    records = [
        {"id": 1, "first_name": "Wei", "last_name": "Zhang", "dob": "1980-04-02"},
        {"id": 2, "first_name": "Zhang", "last_name": "Wei", "dob": "1980-04-02"},  # entered the other way round
        {"id": 3, "first_name": "Wei", "last_name": "Zhang", "dob": "1991-01-01"},
        {"id": 4, "first_name": "Wei", "last_name": None, "dob": "1980-04-02"},
    ]
    rule = BlockingRule.parse("{first_name, last_name}+dob")
    assert rule.fields == ("first_name", "last_name", "dob")
    assert pairs_for(records, ["{first_name,last_name}+dob"]) == {(1, 2)}
    assert pairs_for(records, ["last_name+dob"]) == set()
    # The matcher's per-record keys agree, so MatchRecords finds the same candidates.
    config = {**DEFAULT_PERSON_CONFIG.to_dict(), "blocking_rules": ["{first_name,last_name}+dob"]}
    matcher = Matcher(config)
    assert matcher.blocking_keys(records[0]) == matcher.blocking_keys(records[1]) != []
    assert matcher.blocking_keys(records[3]) == []


@pytest.mark.parametrize("bad", ["{first_name}", "{first_name,first_name}", "{a,b}[0:1]", "{a,b,c}"])
def test_unparseable_field_pairs_are_rejected(bad):
    with pytest.raises(ValueError):
        BlockingRule.parse(bad)
