"""Each comparison level keeps its own evidence: a rare level (nicknames that almost never occur) must not
drag the weaker levels after it down to its weight."""

from __future__ import annotations

import numpy as np

from cdp_identity.matching.fellegi_sunter import level_weights

LABELS = ("null", "exact", "nickname", "swapped", "jaro_winkler>=0.92", "jaro_winkler>=0.8", "else")


def test_a_rare_level_does_not_cap_the_weaker_ones():
    m = np.array([1.0, 0.80, 0.0005, 0.03, 0.06, 0.02, 0.09])
    u = np.array([1.0, 0.008, 0.002, 0.00001, 0.001, 0.006, 0.98])
    weights = dict(zip(LABELS, level_weights(m, u), strict=True))
    assert weights["nickname"] < 0  # nicknames barely occurred: its own weight is negative...
    # ...and swapped names and a close Jaro-Winkler match keep the strong evidence they carry.
    assert weights["swapped"] > 10
    assert weights["jaro_winkler>=0.92"] > 5
    assert weights["jaro_winkler>=0.8"] > 1
    assert weights["else"] < -3
    assert weights["null"] == 0


def test_swapped_names_and_a_close_spelling_count_for_a_match(fitted):
    matcher, report = fitted
    first_name = report.comparison("first_name")
    assert first_name.level("swapped").weight > 0
    assert first_name.level("jaro_winkler>=0.92").weight > 0
    base = {"dob": "1980-04-02", "zip": "10115", "city": "Berlin"}
    anna = {"id": "1", "first_name": "Annabel", "last_name": "Okafor", **base}
    swapped = {"id": "2", "first_name": "Okafor", "last_name": "Annabel", **base}
    typo = {"id": "3", "first_name": "Annabell", "last_name": "Okafor", **base}
    other = {"id": "4", "first_name": "Zygmunt", "last_name": "Okafor", **base}
    assert matcher.score_pair(anna, swapped).levels["first_name"] == "swapped"
    assert matcher.score_pair(anna, typo).levels["first_name"] == "jaro_winkler>=0.92"
    stranger = matcher.score_pair(anna, other).match_weight
    assert matcher.score_pair(anna, swapped).match_weight > stranger + 5
    assert matcher.score_pair(anna, typo).match_weight > stranger + 5
