from __future__ import annotations

import copy
import json

import pytest

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, MatchConfig
from cdp_kit.errors import InvalidArgument

VALID = {
    "comparisons": [
        {"field": "first_name", "kind": "jaro_winkler", "thresholds": [0.92, 0.8], "nicknames": True},
        {"field": "email", "kind": "email"},
        {"field": "dob", "kind": "date", "thresholds": [30]},
    ],
    "blocking_rules": ["email", "first_name[0:2]+dob"],
}


def with_change(path: list, value: object) -> dict:
    config = copy.deepcopy(VALID)
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return config


@pytest.mark.parametrize(
    ("config", "field", "hint"),
    [
        ({"comparisons": [], "blocking_rules": ["email"]}, "comparisons", "non-empty"),
        (with_change(["comparisons", 2, "kind"], "fuzzy"), "comparisons[2].kind", "jaro_winkler"),
        (with_change(["comparisons", 0, "field"], ""), "comparisons[0].field", "record field"),
        (with_change(["comparisons", 0, "thresholds"], [0.8, 0.92]), "comparisons[0].thresholds", "descending"),
        (with_change(["comparisons", 0, "thresholds"], [1.5]), "comparisons[0].thresholds", "(0, 1]"),
        (with_change(["comparisons", 2, "thresholds"], [2.5]), "comparisons[2].thresholds", "integers"),
        (with_change(["comparisons", 1, "threshold"], [0.9]), "comparisons[1].threshold", "thresholds"),
        (with_change(["comparisons", 1, "normalise"], "soundex"), "comparisons[1].normalise", "address"),
        (with_change(["comparisons", 2, "nicknames"], True), "comparisons[2].nicknames", "jaro_winkler"),
        (with_change(["comparisons", 0, "swap_field"], "first_name"), "comparisons[0].swap_field", "another"),
        (with_change(["comparisons", 1, "region"], "US"), "comparisons[1].region", "phone"),
        (with_change(["comparisons", 1, "shareable"], "yes"), "comparisons[1].shareable", "true or false"),
        (with_change(["comparisons", 2], {"field": "email", "kind": "exact"}), "comparisons[2].name", "already used"),
        (with_change(["blocking_rules"], []), "blocking_rules", "non-empty"),
        (with_change(["blocking_rules", 1], "first_name[0:x]"), "blocking_rules[1]", "field[start:stop]"),
        (with_change(["upper_threshold"], 1.5), "upper_threshold", "(0, 1]"),
        ({**VALID, "upper_threshold": 0.5, "lower_threshold": 0.7}, "lower_threshold", "upper_threshold"),
        ({**VALID, "prior_match_probability": 1}, "prior_match_probability", "(0, 1)"),
        ({**VALID, "em": {"max_iterations": 0}}, "em.max_iterations", ">= 1"),
        ({**VALID, "em": {"tolerance": -1}}, "em.tolerance", "(0, 1)"),
        ({**VALID, "em": {"iterations": 5}}, "em.iterations", "max_iterations"),
        ({**VALID, "thresholds": {}}, "thresholds", "upper_threshold"),
    ],
)
def test_bad_config_names_the_field_and_what_is_valid(config, field, hint):
    with pytest.raises(InvalidArgument) as raised:
        MatchConfig.from_dict(config)
    assert raised.value.field == field
    assert hint in raised.value.description


def test_not_a_mapping():
    with pytest.raises(InvalidArgument) as raised:
        MatchConfig.from_dict(["email"])
    assert raised.value.field == "config"


def test_one_field_one_normalisation():
    config = copy.deepcopy(VALID)
    config["comparisons"].append({"name": "email_raw", "field": "email", "kind": "exact", "normalise": "text"})
    with pytest.raises(InvalidArgument) as raised:
        MatchConfig.from_dict(config)
    assert raised.value.field == "comparisons[3].normalise"


def test_defaults_fill_in():
    config = MatchConfig.from_dict(VALID)
    assert (config.upper_threshold, config.lower_threshold) == (0.95, 0.6)
    assert config.comparisons[1].thresholds == (0.88,)
    assert config.comparisons[1].normalise == "email"
    assert config.prior_match_probability is None


@pytest.mark.parametrize("config", [MatchConfig.from_dict(VALID), DEFAULT_PERSON_CONFIG])
def test_to_dict_round_trips_through_json(config):
    assert MatchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_default_person_config_covers_the_person_fields():
    fields = {spec.field for spec in DEFAULT_PERSON_CONFIG.comparisons}
    assert fields == {"first_name", "last_name", "email", "phone", "dob", "city", "zip", "address"}
    assert [rule.text for rule in DEFAULT_PERSON_CONFIG.blocking_rules][:4] == [
        "email",
        "phone",
        "last_name+dob",
        "first_name[0:1]+last_name[0:3]+zip",
    ]


def test_the_readme_example_configuration_loads_and_fits():
    import json
    import re
    import zlib
    from pathlib import Path

    from cdp_identity.matching import Matcher
    from cdp_testing.people import generate_population

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = re.search(r"national id number column.*?```json\n(.*?)```", readme, re.S).group(1)
    matcher = Matcher(MatchConfig.from_dict(json.loads(example)))
    records, _ = generate_population(300, seed=9)
    for record in records:
        record["id_number"] = str(zlib.crc32(str(record.get("email") or record["id"]).encode()) % 10**9)
    assert matcher.fit(records).candidate_pairs > 0
