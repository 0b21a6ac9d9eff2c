"""Linking two files (a CRM export and an app's sign-ups): only pairs across the files are candidates,
the model is fitted on both files at once, and λ is the chance that a record of one file is the same
person as a record of the other."""

from __future__ import annotations

import pytest

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, MatchConfig, Matcher
from cdp_kit.errors import InvalidArgument
from cdp_testing.people import true_pairs


def link_only() -> MatchConfig:
    return MatchConfig.from_dict({**DEFAULT_PERSON_CONFIG.to_dict(), "link_type": "link_only"})


def two_files(records: list[dict]) -> list[dict]:
    return [{**record, "source": "crm" if position % 2 else "app"} for position, record in enumerate(records)]


def test_only_pairs_across_the_files_are_scored_and_they_match(population):
    records, truth = population
    linked = two_files(records)
    source = {record["id"]: record["source"] for record in linked}
    matcher = Matcher(link_only())
    report = matcher.fit(linked)
    assert report.converged
    scored = matcher.score(linked)
    assert scored and all(source[pair.left_id] != source[pair.right_id] for pair in scored)
    across = {pair for pair in true_pairs(truth) if source[pair[0]] != source[pair[1]]}
    found = {tuple(sorted((p.left_id, p.right_id))) for p in scored if p.probability >= 0.5}
    assert len(found & across) / len(found) > 0.97
    assert len(found & across) / len(across) > 0.9
    # A duplicate inside one file is no candidate, however alike.
    first = next(record for record in linked if record["source"] == "crm")
    assert matcher.candidate_pairs([first, {**first, "id": "copy"}]) == []


def test_link_only_records_need_a_source():
    with pytest.raises(InvalidArgument) as raised:
        Matcher(link_only()).fit([{"id": 1, "source": "crm"}, {"id": 2}])
    assert raised.value.field == "records[1].source"
