"""A blocking rule chooses which pairs are scored; it must not decide how they score. Blocking on a field
that strangers often share (a date of birth) fills the candidates with people who agree on nothing else,
and a correct fit calls them what they are."""

from __future__ import annotations

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, MatchConfig, Matcher
from cdp_testing.people import true_pairs


def dob_blocked_config() -> MatchConfig:
    return MatchConfig.from_dict({**DEFAULT_PERSON_CONFIG.to_dict(), "blocking_rules": ["dob"]})


def test_blocking_on_a_common_date_does_not_manufacture_matches(population):
    records, truth = population
    matcher = Matcher(dob_blocked_config())
    matcher.fit(records)
    scored = matcher.score(records)
    truth_pairs = true_pairs(truth)
    # Candidates that share nothing but the birthday: first and last name, e-mail, phone and address differ.
    strangers = [
        pair
        for pair in scored
        if tuple(sorted((pair.left_id, pair.right_id))) not in truth_pairs
        and pair.levels["dob"] == "exact"
        and all(pair.levels[name] in ("else", "null") for name in ("first_name", "last_name", "email", "address"))
    ]
    assert len(strangers) > 100
    assert max(pair.probability for pair in strangers) < 0.5
    born_same_day = {"dob": "1980-04-02"}
    alice = {"id": "a", "first_name": "Alice", "last_name": "Wong", "email": "aw@example.org", **born_same_day}
    bruno = {"id": "b", "first_name": "Bruno", "last_name": "Keller", "email": "bk@example.net", **born_same_day}
    assert matcher.score_pair(alice, bruno).probability < 0.5
    # ...and the duplicates the rule does find still match.
    found = {tuple(sorted((p.left_id, p.right_id))) for p in scored if p.probability >= 0.5}
    candidates = {tuple(sorted((p.left_id, p.right_id))) for p in scored}
    reachable = truth_pairs & candidates
    assert len(found & truth_pairs) / len(found) > 0.95
    assert len(found & reachable) / len(reachable) > 0.9


def test_parameters_saved_by_the_old_candidate_prior_model_are_refused_with_the_fix(fitted):
    import pytest

    from cdp_kit.errors import InvalidArgument

    matcher, _ = fitted
    saved = {**matcher.to_dict(), "format": "cdp.identity.matching/v1"}
    with pytest.raises(InvalidArgument, match="fit the matcher again") as raised:
        Matcher.from_dict(saved)
    assert raised.value.field == "format"
