from __future__ import annotations

import json

import pytest

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, Matcher
from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_testing.people import generate_population, true_pairs


def pair_key(pair) -> tuple:
    return tuple(sorted((pair.left_id, pair.right_id)))


def test_em_learns_weights_that_separate_matches_from_non_matches(fitted):
    _, report = fitted
    assert report.converged
    email = report.comparison("email")
    assert email.level("exact").m > 0.6  # duplicates usually keep their address...
    assert email.level("exact").u < 0.001  # ...strangers almost never share one
    dob = report.comparison("dob")
    assert dob.level("exact").weight > 8
    assert dob.level("else").weight < -5  # a different birthday is strong evidence against
    first_name = report.comparison("first_name")
    assert first_name.level("nickname").weight > 2
    assert first_name.level("else").weight < -3
    # Housemates share an address, so among candidates an equal address says little either way.
    assert abs(report.comparison("address").level("exact").weight) < 2
    assert 0.5 < report.match_probability < 1


def test_f1_on_a_generated_population(fitted, population):
    matcher, _ = fitted
    records, truth = population
    predicted = {pair_key(pair) for pair in matcher.score(records) if pair.probability >= 0.5}
    truth_pairs = true_pairs(truth)
    true_positives = len(predicted & truth_pairs)
    precision, recall = true_positives / len(predicted), true_positives / len(truth_pairs)
    f1 = 2 * precision * recall / (precision + recall)
    assert precision >= 0.97
    assert recall >= 0.94
    assert f1 >= 0.95


def test_fitting_is_deterministic(population):
    records, _ = population
    first, second = Matcher(DEFAULT_PERSON_CONFIG), Matcher(DEFAULT_PERSON_CONFIG)
    assert first.fit(records) == second.fit(records)
    assert first.to_dict() == second.to_dict()


def test_decisions_follow_the_thresholds(fitted, population):
    matcher, _ = fitted
    records, _ = population
    pairs = matcher.score(records)
    decisions = {pair.decision for pair in pairs}
    assert decisions == {"match", "review", "non_match"}
    for pair in pairs:
        expected = "match" if pair.probability >= 0.95 else "review" if pair.probability >= 0.6 else "non_match"
        assert pair.decision == expected
    assert all(pair.probability >= 0.9 for pair in matcher.score(records, min_probability=0.9))


def test_score_pair_agrees_with_score(fitted, population):
    matcher, _ = fitted
    records, _ = population
    by_id = {record["id"]: record for record in records}
    for pair in matcher.score(records)[:50]:
        single = matcher.score_pair(by_id[pair.left_id], by_id[pair.right_id])
        assert single == pair


def test_housemates_are_not_merged(fitted):
    matcher, _ = fitted
    home = {"address": "12 Maple Avenue", "city": "Boston", "zip": "02147", "phone": "(617) 555-0134"}
    john = {"id": "j", "first_name": "John", "last_name": "Doyle", "dob": "1970-04-02", **home}
    mary = {"id": "m", "first_name": "Mary", "last_name": "Doyle", "dob": "1972-11-19", **home}
    johnny = {**john, "id": "j2", "first_name": "Johnny", "phone": "617.555.0134", "address": "12 Maple Ave"}
    assert matcher.score_pair(john, mary).decision == "non_match"
    assert matcher.score_pair(john, johnny).decision == "match"


def test_to_dict_from_dict_round_trip_scores_identically(fitted, population):
    matcher, _ = fitted
    records, _ = population
    restored = Matcher.from_dict(json.loads(json.dumps(matcher.to_dict())))
    assert restored.score(records[:2000]) == matcher.score(records[:2000])


def test_from_dict_rejects_parameters_that_do_not_fit_the_config(fitted):
    matcher, _ = fitted
    saved = json.loads(json.dumps(matcher.to_dict()))
    saved["parameters"]["comparisons"][1]["levels"].pop()
    with pytest.raises(InvalidArgument) as raised:
        Matcher.from_dict(saved)
    assert raised.value.field == "parameters.comparisons[1].levels"
    with pytest.raises(InvalidArgument):
        Matcher.from_dict({"config": {}})


def test_clusters_are_connected_components_above_the_threshold(fitted):
    matcher, _ = fitted
    from cdp_identity.matching import ScoredPair

    def pair(a, b, probability):
        return ScoredPair(a, b, 0.0, probability, "match", {})

    pairs = [pair("a", "b", 0.99), pair("b", "c", 0.97), pair("d", "e", 0.96), pair("c", "d", 0.4), pair("x", "y", 0.1)]
    assert matcher.clusters(pairs) == [{"a", "b", "c"}, {"d", "e"}]
    assert matcher.clusters(pairs, threshold=0.3) == [{"a", "b", "c", "d", "e"}]


def test_clusters_recover_people(fitted, population):
    matcher, _ = fitted
    records, truth = population
    clusters = matcher.clusters(matcher.score(records))
    pure = sum(len({truth[record_id] for record_id in cluster}) == 1 for cluster in clusters)
    assert pure / len(clusters) > 0.97


def test_an_unfitted_matcher_refuses_to_score():
    matcher = Matcher(DEFAULT_PERSON_CONFIG)
    assert not matcher.fitted
    with pytest.raises(FailedPrecondition):
        matcher.score([{"id": 1}, {"id": 2}])
    assert Matcher.from_dict(matcher.to_dict()).fitted is False


def test_fit_needs_candidate_pairs():
    with pytest.raises(FailedPrecondition, match="no candidate pairs"):
        Matcher(DEFAULT_PERSON_CONFIG).fit([{"id": 1, "email": "a@x.org"}, {"id": 2, "email": "b@x.org"}])


@pytest.mark.parametrize(
    ("records", "field"),
    [
        ([{"id": 1}, {"first_name": "x"}], "records[1].id"),
        ([{"id": 1}, {"id": 1}], "records[1].id"),
        ([{"id": 1}, "not a record"], "records[1]"),
    ],
)
def test_bad_records_name_the_record(records, field):
    with pytest.raises(InvalidArgument) as raised:
        Matcher(DEFAULT_PERSON_CONFIG).fit(records)
    assert raised.value.field == field


def test_a_config_dict_works_as_well():
    matcher = Matcher(DEFAULT_PERSON_CONFIG.to_dict())
    assert matcher.config == DEFAULT_PERSON_CONFIG
    small, _ = generate_population(300, seed=5)
    report = matcher.fit(small)
    assert report.records == len(small) and report.candidate_pairs > 0


def test_an_unparseable_date_names_the_record_and_field(fitted):
    matcher, _ = fitted
    records = [{"id": "a", "dob": "1956-04-09"}, {"id": "b", "first_name": "Ann", "dob": "19560409x"}]
    for call in (matcher.score, matcher.fit):
        with pytest.raises(InvalidArgument) as raised:
            call(records)
        assert raised.value.field == "records[1].dob"
        assert "19560409" not in str(raised.value)
    with pytest.raises(InvalidArgument) as raised:
        matcher.check_fields({"dob": "09/04/1956"}, "records[3].fields")
    assert raised.value.field == "records[3].fields.dob"
    matcher.check_fields({"dob": "19560409", "first_name": "Ann"}, "records[3].fields")


def test_pairs_found_through_blocking_keys_score_as_a_whole_batch_does(fitted, population):
    matcher, _ = fitted
    records, _ = population
    sample = records[:1500]
    index: dict[str, list[int]] = {}
    for position, record in enumerate(sample):
        for key in matcher.blocking_keys(record):
            index.setdefault(key, []).append(position)
    pairs = {
        (a, b)
        for members in index.values()
        if len(members) <= matcher.config.max_block_size
        for i, a in enumerate(members)
        for b in members[i + 1 :]
    }
    by_index = {pair_key(p): p for p in matcher.score_pairs(sample, sorted(pairs))}
    whole = {pair_key(p): p for p in matcher.score(sample)}
    assert by_index.keys() == whole.keys()
    assert all(by_index[key].probability == whole[key].probability for key in whole)
