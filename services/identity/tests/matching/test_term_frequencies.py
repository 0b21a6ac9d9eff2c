"""Term frequencies: agreeing on a rare surname is stronger evidence than agreeing on the commonest one."""

from __future__ import annotations

from collections import Counter

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, MatchConfig, Matcher


def with_surname_frequencies() -> MatchConfig:
    config = DEFAULT_PERSON_CONFIG.to_dict()
    for comparison in config["comparisons"]:
        if comparison["field"] == "last_name":
            comparison["term_frequencies"] = True
    return MatchConfig.from_dict(config)


def test_a_rare_surname_counts_more_than_a_common_one(population):
    records, _ = population
    matcher = Matcher(with_surname_frequencies())
    matcher.fit(records)
    common = Counter(r["last_name"] for r in records if r.get("last_name")).most_common(1)[0][0]
    base = {"first_name": "Noor", "dob": "1980-04-02"}

    def weight(surname: str) -> float:
        return matcher.score_pair(
            {"id": 1, **base, "last_name": surname}, {"id": 2, **base, "last_name": surname}
        ).match_weight

    assert weight("Okonkwo-Baptiste") > weight(common) + 2
    # Without the adjustment the surname's value makes no difference.
    plain = Matcher(DEFAULT_PERSON_CONFIG)
    plain.fit(records)

    def pair(surname: str):
        return plain.score_pair({"id": 1, **base, "last_name": surname}, {"id": 2, **base, "last_name": surname})

    assert pair("Okonkwo-Baptiste").match_weight == pair(common).match_weight
