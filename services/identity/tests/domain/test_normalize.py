"""Normalizer: the same person written two ways becomes one key; values that identify nobody never become one."""

from __future__ import annotations

import hashlib

import pytest

from cdp_identity.domain.normalize import Identifier, Normalizer, Rejected
from cdp_identity.domain.rules import MergeRules


def normalizer(**config) -> Normalizer:
    return Normalizer(MergeRules.from_dict(config))


DEFAULT = normalizer()


def keys(pairs, n: Normalizer = DEFAULT) -> list[str]:
    accepted, _ = n.normalize(pairs)
    return [i.key for i in accepted]


def reasons(pairs, n: Normalizer = DEFAULT) -> list[str]:
    _, rejected = n.normalize(pairs)
    return [r.reason for r in rejected]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("raw", ["ada@example.com", "  Ada@Example.COM\t", "ADA@EXAMPLE.COM", "\nada@example.com "])
def test_emails_are_trimmed_and_lower_cased(raw):
    assert keys([("email", raw)]) == ["email:ada@example.com"]


@pytest.mark.parametrize(
    "raw", ["ada", "ada@example", "ada@@example.com", "ada lovelace@example.com", "@example.com", "ada@example."]
)
def test_malformed_emails_are_rejected_as_invalid(raw):
    accepted, rejected = DEFAULT.normalize([("email", raw)])
    assert accepted == []
    assert [(r.type, r.reason) for r in rejected] == [("email", "invalid")]


US_NUMBER = "+14155550100"
DE_MOBILE = "+4915112345678"


@pytest.mark.parametrize(
    ("region", "raw", "e164"),
    [
        ("US", "(415) 555-0100", US_NUMBER),
        ("US", "415.555.0100", US_NUMBER),
        ("US", "1-415-555-0100", US_NUMBER),
        ("US", "+1 415 555 0100", US_NUMBER),
        ("US", "+49 151 12345678", DE_MOBILE),  # an international number ignores the default region
        ("DE", "0151 12345678", DE_MOBILE),
        ("DE", "0151/123 456 78", DE_MOBILE),
        ("DE", "0049 151 12345678", DE_MOBILE),
        ("DE", "+49 151 12345678", DE_MOBILE),
        ("DE", "+1 (415) 555-0100", US_NUMBER),
        ("GB", "020 7946 0018", "+442079460018"),
        ("GB", "+44 20 7946 0018", "+442079460018"),
    ],
)
def test_phones_become_e164_using_the_default_region_for_national_numbers(region, raw, e164):
    assert keys([("phone", raw)], normalizer(default_phone_region=region)) == [f"phone:{e164}"]


def test_the_region_decides_what_a_national_number_means():
    national = "0151 12345678"
    assert reasons([("phone", national)]) == ["invalid"]  # not a US number
    assert keys([("phone", national)], normalizer(default_phone_region="DE")) == [f"phone:{DE_MOBILE}"]


@pytest.mark.parametrize("raw", ["abc", "123", "+999 1234", "555-CALL-NOW-PLEASE-NOW"])
def test_impossible_phones_are_rejected_as_invalid(raw):
    assert reasons([("phone", raw)]) == ["invalid"]


PLACEHOLDERS = ["", "   ", "null", " NULL ", "None", "nil", "undefined", "Anonymous", "UNKNOWN", "guest", "n/a"]
PLACEHOLDERS += ["NaN", "0", "-1", "[object Object]", "true", "False", "000", "0000-0000", "--"]


@pytest.mark.parametrize("raw", PLACEHOLDERS)
def test_placeholder_values_are_blocked_for_every_type(raw):
    pairs = [("user_id", raw), ("anonymous_id", raw), ("device_id", raw), ("email", raw), ("phone", raw)]
    accepted, rejected = DEFAULT.normalize(pairs)
    assert accepted == []
    assert {(r.type, r.reason) for r in rejected} == {(kind, "blocked") for kind, _ in pairs}


@pytest.mark.parametrize("raw", ["10", "0x0", "guest42", "nullable", "a-0"])
def test_values_that_only_resemble_placeholders_are_kept(raw):
    assert keys([("user_id", raw)]) == [f"user_id:{raw}"]


def test_blocked_values_and_patterns_can_be_added_per_type_and_globally():
    n = normalizer(
        types=[
            {"name": "user_id", "blocked": {"values": ["Admin"], "patterns": ["^test-"]}},
            {"name": "email", "blocked": {"values": ["noreply@example.com"], "patterns": [r"@example\.invalid$"]}},
            {"name": "anonymous_id"},
        ],
        blocked={"values": ["demo"], "patterns": ["^tmp_"]},
    )
    assert (
        reasons([("user_id", " admin "), ("user_id", "TEST-42"), ("user_id", "demo"), ("user_id", "tmp_1")], n)
        == ["blocked"] * 4
    )
    assert (
        reasons([("email", "NoReply@Example.com"), ("email", "x@example.invalid"), ("email", "Demo")], n)
        == ["blocked"] * 3
    )
    # A type's own blocked list is only that type's: "admin" is a fine anonymous id.
    assert keys([("anonymous_id", "admin"), ("anonymous_id", "test-1"), ("user_id", "null")], n) == [
        "anonymous_id:admin",
        "anonymous_id:test-1",
    ]


def test_replacing_the_default_blocked_list_lets_placeholders_through():
    n = normalizer(blocked={"values": ["nobody"]}, replace_default_blocked=True)
    assert keys([("user_id", "guest"), ("user_id", "0")], n) == ["user_id:0", "user_id:guest"]
    assert reasons([("user_id", "Nobody")], n) == ["blocked"]


def test_hashed_types_store_the_sha256_of_the_normalised_value():
    n = normalizer(
        types=[{"name": "email", "hash": True}, {"name": "phone", "hash": True}, {"name": "user_id", "hash": True}]
    )
    accepted, _ = n.normalize([("email", " Ada@Example.com "), ("phone", "(415) 555-0100"), ("user_id", " u-1 ")])
    assert [i.key for i in accepted] == [
        f"email:{sha256('ada@example.com')}",
        f"phone:{sha256(US_NUMBER)}",
        f"user_id:{sha256('u-1')}",
    ]
    # Blocked and invalid values are refused before hashing: their digest would look like any other.
    assert reasons([("email", "null"), ("email", "not-an-email"), ("phone", "abc")], n) == [
        "blocked",
        "invalid",
        "invalid",
    ]


@pytest.mark.parametrize("normalize", ["email", "phone", "lower", "exact"])
@pytest.mark.parametrize("case", [str.lower, str.upper], ids=["lower-hex", "upper-hex"])
def test_a_value_pre_hashed_by_the_client_is_kept_not_hashed_again(normalize, case):
    # A client that hashed the email itself must land on the same key as a client that sent it in clear.
    n = normalizer(types=[{"name": "contact", "normalize": normalize, "hash": True}])
    digest = sha256("ada@example.com")
    assert keys([("contact", case(digest))], n) == [f"contact:{digest}"]


def test_unknown_types_and_non_string_values_are_rejected():
    accepted, rejected = DEFAULT.normalize([("loyalty_id", "L-1"), ("user_id", 42), ("user_id", "u-1")])
    assert [i.key for i in accepted] == ["user_id:u-1"]
    assert [(r.type, r.reason) for r in rejected] == [("loyalty_id", "unknown_type"), ("user_id", "invalid")]


def test_overlong_values_are_invalid():
    assert reasons([("user_id", "u" * 513)]) == ["invalid"]
    assert keys([("user_id", "u" * 512)]) == ["user_id:" + "u" * 512]


def test_rejected_values_are_reported_redacted():
    _, rejected = DEFAULT.normalize([("email", "ada.lovelace-at-example.com")])
    assert rejected == [Rejected("email", "ada.…", "invalid")]


def test_duplicates_collapse_and_the_result_is_strongest_first():
    accepted, rejected = DEFAULT.normalize(
        [
            ("anonymous_id", "anon-2"),
            ("device_id", "dev-1"),
            ("email", "Ada@Example.com"),
            ("anonymous_id", "anon-1"),
            ("user_id", "u-1"),
            ("email", " ada@example.com "),
            ("phone", "415 555 0100"),
            ("salesforce_id", "003A"),
            ("user_id", "u-1"),
        ]
    )
    assert rejected == []
    assert [i.key for i in accepted] == [
        "user_id:u-1",
        "salesforce_id:003A",
        "email:ada@example.com",
        f"phone:{US_NUMBER}",
        "device_id:dev-1",
        "anonymous_id:anon-1",
        "anonymous_id:anon-2",
    ]
    assert [i.priority for i in accepted] == [0, 1, 5, 6, 7, 8, 8]


def test_exact_values_keep_their_case_and_lower_values_fold_it():
    n = normalizer(types=[{"name": "user_id"}, {"name": "handle", "normalize": "lower"}])
    accepted, _ = n.normalize([("user_id", " AbC "), ("user_id", "abc"), ("handle", " AbC ")])
    assert accepted == [
        Identifier("user_id", "AbC", 0),
        Identifier("user_id", "abc", 0),
        Identifier("handle", "abc", 1),
    ]


def test_the_same_pairs_again_give_the_same_answer_in_lists_of_their_own():
    n = normalizer()
    pairs = [("anonymous_id", "anon-1"), ("email", "ADA@example.com"), ("email", "not an email")]
    first_accepted, first_rejected = n.normalize(pairs)
    # The engine extends an event's rejected list (an alias's previous id): that must not reach the next event.
    first_accepted.append(Identifier("user_id", "u-2", 0))
    first_rejected.append(Rejected("user_id", "u-2", "blocked"))
    accepted, rejected = n.normalize(list(pairs))
    assert [i.key for i in accepted] == ["email:ada@example.com", "anonymous_id:anon-1"]
    assert [(r.type, r.reason) for r in rejected] == [("email", "invalid")]


def test_a_full_cache_of_events_starts_again_and_answers_alike():
    n = Normalizer(MergeRules.from_dict({}), events_cache_size=2)
    answers = [n.normalize([("user_id", f"u-{i % 3}")]) for i in range(9)]
    assert [[i.key for i in accepted] for accepted, _ in answers] == [[f"user_id:u-{i % 3}"] for i in range(9)]
