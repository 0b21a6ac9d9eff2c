"""The shipped matching parameters are what the documented recipe produces, and they separate matches."""

from __future__ import annotations

import json

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, Matcher
from cdp_identity.matching_service import DEFAULT_MODEL
from cdp_testing.people import generate_population


def test_the_shipped_parameters_are_reproducible():
    records, _truth = generate_population(10_000, seed=2026)
    matcher = Matcher(DEFAULT_PERSON_CONFIG)
    matcher.fit(records)
    assert json.loads(json.dumps(matcher.to_dict(), sort_keys=True)) == json.loads(DEFAULT_MODEL.read_text())


def test_the_shipped_parameters_score_a_nickname_duplicate_above_a_stranger():
    matcher = Matcher.from_dict(json.loads(DEFAULT_MODEL.read_text()))
    robert = {"id": "1", "first_name": "Robert", "last_name": "Meyer", "dob": "1980-04-02", "zip": "10115"}
    bob = {"id": "2", "first_name": "Bob", "last_name": "Meyer", "dob": "1980-04-02", "zip": "10115"}
    other = {"id": "3", "first_name": "Anna", "last_name": "Meyer", "dob": "1991-07-30", "zip": "10115"}
    assert matcher.score_pair(robert, bob).probability > matcher.score_pair(robert, other).probability
    assert matcher.score_pair(robert, bob).decision == "match"
