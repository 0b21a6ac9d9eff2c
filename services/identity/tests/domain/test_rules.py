"""MergeRules.from_dict: the identity rules file an operator writes, its defaults, and every way it can be wrong."""

from __future__ import annotations

import pytest

from cdp_identity.domain.rules import DEFAULT_BLOCKED_VALUES, MergeRules, parse_duration
from cdp_kit.errors import InvalidArgument

DEFAULT_ORDER = [
    "user_id",
    "salesforce_id",
    "hubspot_id",
    "dynamics_id",
    "zoho_id",
    "email",
    "phone",
    "device_id",
    "anonymous_id",
]


def test_defaults_list_the_types_strongest_first_with_their_limits_and_quarantine():
    rules = MergeRules.default()
    assert [t.name for t in rules.types] == DEFAULT_ORDER
    assert [t.priority for t in rules.types] == list(range(len(DEFAULT_ORDER)))
    limits = {t.name: t.limit for t in rules.types}
    assert limits == {
        "user_id": 1,
        # A person may have several records in one CRM: duplicates matching is there to merge.
        "salesforce_id": None,
        "hubspot_id": None,
        "dynamics_id": None,
        "zoho_id": None,
        "email": 5,
        "phone": 3,
        "device_id": 20,
        "anonymous_id": None,
    }
    quarantine = {t.name: t.quarantine_after for t in rules.types if t.quarantine_after is not None}
    assert quarantine == {"phone": 5, "device_id": 3, "anonymous_id": 5}
    assert rules.require_type("email").normalize == "email"
    assert rules.require_type("phone").normalize == "phone"
    assert rules.require_type("user_id").normalize == "exact"
    assert not any(t.hash or t.window for t in rules.types)
    assert rules.quarantine_window == 30 * 86400
    assert rules.default_phone_region == "US"
    assert {"", "null", "none", "undefined", "anonymous", "unknown", "guest", "0", "-1"} <= rules.blocked_values
    assert MergeRules.from_dict({}) == rules


def test_custom_types_take_the_list_order_as_priority_and_built_ins_keep_their_defaults():
    rules = MergeRules.from_dict(
        {
            "types": [
                {"name": "loyalty_id", "limit": 1, "paths": ["traits.loyalty_id"]},
                {"name": "email", "window": "7d"},
                {"name": "user_id", "limit": None},
                {"name": "device_id", "quarantine_after": None, "hash": True},
            ]
        }
    )
    assert [(t.name, t.priority) for t in rules.types] == [
        ("loyalty_id", 0),
        ("email", 1),
        ("user_id", 2),
        ("device_id", 3),
    ]
    loyalty = rules.require_type("loyalty_id")
    assert (loyalty.normalize, loyalty.limit, loyalty.paths) == ("exact", 1, ("traits.loyalty_id",))
    email = rules.require_type("email")
    # A built-in listed without its settings keeps them: email normalisation and limit 5, now within 7 days.
    assert (email.normalize, email.limit, email.window) == ("email", 5, 7 * 86400)
    assert rules.require_type("user_id").limit is None  # null switches the default limit off
    device = rules.require_type("device_id")
    assert (device.quarantine_after, device.hash, device.limit) == (None, True, 20)
    assert rules.type("phone") is None


def test_a_custom_type_reads_traits_by_default_and_is_matched_exactly():
    kind = MergeRules.from_dict({"types": [{"name": "member_no"}]}).require_type("member_no")
    assert kind.paths == ("traits.member_no", "context.traits.member_no")
    assert (kind.normalize, kind.limit, kind.window, kind.quarantine_after) == ("exact", None, None, None)


def test_require_type_names_the_configured_types():
    rules = MergeRules.from_dict({"types": [{"name": "user_id"}, {"name": "email"}]})
    with pytest.raises(InvalidArgument) as err:
        rules.require_type("phone", "identifiers[2].type")
    assert err.value.field == "identifiers[2].type"
    assert "user_id, email" in err.value.description


DURATIONS = [(3600, 3600.0), (1.5, 1.5), ("45s", 45.0), ("30m", 1800.0), ("12h", 43200.0), ("7d", 604800.0)]
DURATIONS += [("2w", 1209600.0), ("90", 90.0), (" 1.5h ", 5400.0)]


@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_durations_are_seconds_or_a_number_with_a_unit(value, seconds):
    assert parse_duration(value, "window") == seconds


def test_windows_and_the_quarantine_window_accept_durations():
    rules = MergeRules.from_dict({"types": [{"name": "email", "limit": 5, "window": 3600}], "quarantine_window": "2w"})
    assert rules.require_type("email").window == 3600.0
    assert rules.quarantine_window == 14 * 86400.0


def test_blocked_values_add_to_the_defaults_unless_they_replace_them():
    rules = MergeRules.from_dict({"blocked": {"values": [" Test@Example.com "], "patterns": ["^test-"]}})
    assert "test@example.com" in rules.blocked_values  # folded like the values they are compared with
    assert rules.blocked_values >= DEFAULT_BLOCKED_VALUES
    assert [p.pattern for p in rules.blocked_patterns] == ["^[0-]*$", "^test-"]
    replaced = MergeRules.from_dict({"blocked": {"values": ["x"]}, "replace_default_blocked": True})
    assert replaced.blocked_values == {"x"}
    assert replaced.blocked_patterns == ()


def test_phone_region_is_configurable():
    assert MergeRules.from_dict({"default_phone_region": "DE"}).default_phone_region == "DE"


def _field_of(config) -> str:
    with pytest.raises(InvalidArgument) as err:
        MergeRules.from_dict(config)
    assert err.value.description, "the error says what would be valid"
    return err.value.field


BAD_CONFIGS = {
    "not an object": ([], "rules"),
    "unknown setting": ({"typess": []}, "rules.typess"),
    "types not a list": ({"types": {"name": "email"}}, "types"),
    "no types": ({"types": []}, "types"),
    "type not an object": ({"types": [{"name": "a"}, "email"]}, "types[1]"),
    "unknown type setting": ({"types": [{"name": "a", "limt": 1}]}, "types[0].limt"),
    "missing name": ({"types": [{"limit": 1}]}, "types[0].name"),
    "name with capitals": ({"types": [{"name": "Email"}]}, "types[0].name"),
    "name with a dash": ({"types": [{"name": "user-id"}]}, "types[0].name"),
    "duplicated type": ({"types": [{"name": "email"}, {"name": "phone"}, {"name": "email"}]}, "types[2].name"),
    "unknown normaliser": ({"types": [{"name": "a", "normalize": "upper"}]}, "types[0].normalize"),
    "zero limit": ({"types": [{"name": "a"}, {"name": "b", "limit": 0}]}, "types[1].limit"),
    "negative limit": ({"types": [{"name": "a", "limit": -1}]}, "types[0].limit"),
    "fractional limit": ({"types": [{"name": "a", "limit": 1.5}]}, "types[0].limit"),
    "string limit": ({"types": [{"name": "a", "limit": "5"}]}, "types[0].limit"),
    "boolean limit": ({"types": [{"name": "a", "limit": True}]}, "types[0].limit"),
    "window without limit": ({"types": [{"name": "a", "window": "7d"}]}, "types[0].window"),
    "window on a built-in without limit": ({"types": [{"name": "anonymous_id", "window": "1d"}]}, "types[0].window"),
    "window with limit switched off": (
        {"types": [{"name": "email", "limit": None, "window": "1d"}]},
        "types[0].window",
    ),
    "window without unit letter": ({"types": [{"name": "a", "limit": 1, "window": "7 days"}]}, "types[0].window"),
    "zero window": ({"types": [{"name": "a", "limit": 1, "window": 0}]}, "types[0].window"),
    "negative window": ({"types": [{"name": "a", "limit": 1, "window": "-1d"}]}, "types[0].window"),
    "boolean window": ({"types": [{"name": "a", "limit": 1, "window": True}]}, "types[0].window"),
    "hash not a boolean": ({"types": [{"name": "a", "hash": "yes"}]}, "types[0].hash"),
    "empty paths": ({"types": [{"name": "a", "paths": []}]}, "types[0].paths"),
    "blank path": ({"types": [{"name": "a", "paths": ["traits.a", ""]}]}, "types[0].paths"),
    "paths not a list": ({"types": [{"name": "a", "paths": "traits.a"}]}, "types[0].paths"),
    "quarantine after one": ({"types": [{"name": "a", "quarantine_after": 1}]}, "types[0].quarantine_after"),
    "quarantine boolean": ({"types": [{"name": "a", "quarantine_after": True}]}, "types[0].quarantine_after"),
    "type blocked not an object": ({"types": [{"name": "a", "blocked": ["x"]}]}, "types[0].blocked"),
    "type blocked values": ({"types": [{"name": "a", "blocked": {"values": [1]}}]}, "types[0].blocked.values"),
    "type blocked bad regex": (
        {"types": [{"name": "a"}, {"name": "b", "blocked": {"patterns": ["ok", "(unclosed"]}}]},
        "types[1].blocked.patterns[1]",
    ),
    "blocked not an object": ({"blocked": ["guest"]}, "blocked"),
    "blocked values not a list": ({"blocked": {"values": "guest"}}, "blocked.values"),
    "blocked patterns not a list": ({"blocked": {"patterns": "^x"}}, "blocked.patterns"),
    "blocked bad regex": ({"blocked": {"patterns": ["[a-"]}}, "blocked.patterns[0]"),
    "blocked pattern not a string": ({"blocked": {"patterns": ["^x", 5]}}, "blocked.patterns[1]"),
    "lower-case region": ({"default_phone_region": "de"}, "default_phone_region"),
    "three-letter region": ({"default_phone_region": "DEU"}, "default_phone_region"),
    "numeric region": ({"default_phone_region": 49}, "default_phone_region"),
    "bad quarantine window": ({"quarantine_window": "soon"}, "quarantine_window"),
    "zero quarantine window": ({"quarantine_window": 0}, "quarantine_window"),
}


@pytest.mark.parametrize(("config", "field"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_each_bad_setting_is_refused_with_its_field(config, field):
    assert _field_of(config) == field


def test_the_error_names_the_value_that_failed():
    with pytest.raises(InvalidArgument) as err:
        MergeRules.from_dict({"types": [{"name": "email", "limit": 0}]})
    assert "0" in err.value.description and "positive integer" in err.value.description
    assert str(err.value).startswith("types[0].limit: ")


@pytest.mark.parametrize("region", ["UK", "XX"])
def test_a_region_phone_numbers_do_not_know_is_refused(region):
    # "UK" looks like a region but is not ISO 3166 (that is GB): accepting it would make every national
    # phone number invalid, silently, so phones would never link.
    assert _field_of({"default_phone_region": region}) == "default_phone_region"


@pytest.mark.parametrize("flag", ["false", 0])
def test_replace_default_blocked_must_be_a_boolean(flag):
    # A string "false" would otherwise be truthy and silently remove the blocked defaults ("null", "guest",
    # "0"…) that keep strangers from being glued together.
    assert _field_of({"replace_default_blocked": flag}) == "replace_default_blocked"
