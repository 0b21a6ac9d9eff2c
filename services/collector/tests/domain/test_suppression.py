"""Suppression rules: the keys the collector builds from an event are the ones identity stores, hashed the
way privacy.deleted carries them, and an empty list costs nothing."""

from __future__ import annotations

import hashlib

import pytest
from google.protobuf.struct_pb2 import Struct

from cdp.events.v1 import events_pb2
from cdp_collector.domain import SuppressionList, identifier_hash, identifier_key, identifier_keys
from cdp_collector.domain import suppression as suppression_module

T = events_pb2


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def suppressing(*keys: str) -> SuppressionList:
    suppression = SuppressionList()
    suppression.add(sha256_hex(k) for k in keys)
    return suppression


def identify(user_id: str = "", **fields) -> events_pb2.Event:
    return T.Event(message_id="m-1", type=T.EVENT_TYPE_IDENTIFY, user_id=user_id, **fields)


def struct(values: dict) -> Struct:
    result = Struct()
    result.update(values)
    return result


@pytest.mark.parametrize(
    ("kind", "raw", "key"),
    [
        ("user_id", " U-42 ", "user_id:U-42"),  # ids are trimmed, never case-folded
        ("anonymous_id", "a1\t", "anonymous_id:a1"),
        ("device_id", "  D1", "device_id:D1"),
        ("email", " Ada@Example.COM ", "email:ada@example.com"),
        ("phone", "+4915112345678", "phone:+4915112345678"),
        ("phone", "+49 (151) 1234-5678", "phone:+4915112345678"),
        ("hubspot_id", " 12345 ", "hubspot_id:12345"),
        ("user_id", "   ", None),
        ("email", "", None),
        ("phone", "0151 12345678", None),  # national form: only libphonenumber knows the country
    ],
)
def test_identifier_keys_are_normalised_per_type(kind, raw, key):
    assert identifier_key(kind, raw) == key


def test_the_hash_is_lowercase_hex_sha256_of_the_key():
    assert identifier_hash("user_id:u-42") == hashlib.sha256(b"user_id:u-42").hexdigest()
    assert len(identifier_hash("email:ada@example.com")) == 64


def test_every_place_an_identifier_can_be_is_read():
    event = T.Event(
        message_id="m-1",
        type=T.EVENT_TYPE_ALIAS,
        user_id="u-1",
        anonymous_id="a-1",
        previous_id="old-1",
        traits=struct({"email": "Ada@Example.com", "plan": "pro", "hubspot_id": 12345}),
    )
    event.context.device.id = "d-1"
    event.context.traits.update({"email": "ada@work.example", "phone": "+49 151 12345678"})
    event.context.extra.update(
        {"externalIds": [{"id": "SF-9", "type": "salesforce_id", "collection": "users"}, {"type": "no_id"}]}
    )
    assert list(identifier_keys(event)) == [
        ("user_id", "user_id:u-1"),
        ("anonymous_id", "anonymous_id:a-1"),
        ("previous_id", "user_id:old-1"),
        ("previous_id", "anonymous_id:old-1"),
        ("context.device.id", "device_id:d-1"),
        ("traits.email", "email:ada@example.com"),
        ("traits.hubspot_id", "hubspot_id:12345"),
        ("context.traits.email", "email:ada@work.example"),
        ("context.traits.phone", "phone:+4915112345678"),
        ("context.externalIds[0].id", "salesforce_id:SF-9"),
    ]


def test_matching_does_not_change_the_event():
    event = identify("u-1", traits=struct({"plan": "pro"}))
    event.context.locale = "de-DE"
    event.context.extra.update({"campaign": {"utm_id": "x"}})
    before = event.SerializeToString(deterministic=True)
    assert suppressing("user_id:someone-else").match(event) is None
    assert event.SerializeToString(deterministic=True) == before


def test_an_upper_case_email_in_identify_traits_matches_a_suppressed_email():
    suppression = suppressing("user_id:u-9", "email:x@y.io")
    assert suppression.match(identify("u-1", traits=struct({"email": " X@Y.IO "}))) == "traits.email"
    assert suppression.match(T.Event(type=T.EVENT_TYPE_TRACK, user_id="u-9", event="E")) == "user_id"
    assert suppression.match(identify("u-1", traits=struct({"email": "x@z.io"}))) is None


def test_ids_are_matched_case_sensitively_like_identity_does():
    suppression = suppressing("user_id:u-9")
    assert suppression.match(identify(" u-9 ")) == "user_id"
    assert suppression.match(identify("U-9")) is None


def test_a_suppressed_user_id_given_as_an_aliass_previous_id_matches():
    alias = T.Event(type=T.EVENT_TYPE_ALIAS, user_id="new-1", previous_id="u-9")
    assert suppressing("user_id:u-9").match(alias) == "previous_id"
    assert suppressing("anonymous_id:u-9").match(alias) == "previous_id"


def test_a_suppressed_phone_drops_no_event_that_names_someone_else():
    """People share phones (a family's landline, a shop's till; identity quarantines a phone seen on several
    people): a deleted person's phone must not drop, for ever, the events of another person who gives it."""
    suppression = suppressing("user_id:u-9", "phone:+4915112345678")
    shared = {"phone": "+49 151 12345678"}
    assert suppression.match(identify("u-1", traits=struct(shared))) is None  # signed in as someone else
    assert suppression.match(identify("", anonymous_id="a-2", traits=struct({**shared, "email": "b@z.io"}))) is None
    others = T.Event(type=T.EVENT_TYPE_TRACK, event="E", anonymous_id="a-2")
    others.context.extra.update({"externalIds": [{"type": "hubspot_id", "id": "77"}]})
    others.context.traits.update(shared)
    assert suppression.match(others) is None
    # Nothing on the event but the phone, a browser and a device: it may be the deleted person back.
    alone = identify("", anonymous_id="a-2", traits=struct(shared))
    alone.context.device.id = "d-1"
    assert suppression.match(alone) == "traits.phone"
    # The person's own ids still drop the event, whatever else it carries.
    assert suppression.match(identify("u-9", traits=struct({**shared, "email": "b@z.io"}))) == "user_id"
    both = suppressing("phone:+4915112345678", "email:x@y.io")
    assert both.match(identify("u-1", traits=struct({**shared, "email": "x@y.io"}))) == "traits.email"


def test_an_empty_list_builds_and_hashes_no_key(monkeypatch):
    walked = []
    real = suppression_module.identifier_keys
    monkeypatch.setattr(
        suppression_module, "identifier_keys", lambda event, *region: walked.append(event) or real(event, *region)
    )
    suppression = SuppressionList()
    event = identify("u-9", traits=struct({"email": "x@y.io"}))
    assert not suppression and suppression.match(event) is None
    assert walked == []
    suppression.add([sha256_hex("user_id:u-9")])
    assert suppression.match(event) == "user_id" and walked == [event]


def test_malformed_hashes_are_skipped_and_counted():
    suppression = SuppressionList()
    good = sha256_hex("user_id:u-9")
    assert suppression.add([good, good.upper(), "not-a-hash", good[:-1], sha256_hex("email:x@y.io")]) == (2, 2)
    assert len(suppression) == 2


def test_keys_agree_with_identitys_normaliser():
    """The collector cannot import identity at run time; this keeps the two from drifting apart."""
    from cdp_identity.domain.normalize import Normalizer  # the workspace always has identity
    from cdp_identity.domain.rules import MergeRules

    normalizer = Normalizer(MergeRules.default())
    cases = [
        ("user_id", " U-42 "),
        ("anonymous_id", "a1 "),
        ("device_id", " D-1"),
        ("email", " Ada@Example.COM "),
        ("phone", "+4915112345678"),
        ("phone", "+49 (151) 1234-5678"),
        ("phone", "+39 06 1234 5678"),
        ("salesforce_id", " 0031x00000AbCdE "),
        ("hubspot_id", "12345"),
        ("dynamics_id", "7f1c"),
        ("zoho_id", " z-1"),
    ]
    for kind, raw in cases:
        assert identifier_key(kind, raw) == normalizer.normalize_one(kind, raw).key, (kind, raw)


@pytest.mark.parametrize(
    ("raw", "region", "key"),
    [
        ("15550001111", "US", "phone:+15550001111"),
        ("(555) 000-1111", "US", "phone:+15550001111"),
        ("0151 12345678", "DE", "phone:+4915112345678"),
        ("+1 555 000 1111", "DE", "phone:+15550001111"),  # written with its country code: the region is moot
        ("12", "US", None),  # no possible number
    ],
)
def test_a_phone_written_without_its_country_code_is_read_in_identitys_region(raw, region, key):
    assert identifier_key("phone", raw, region) == key


def test_a_suppressed_phone_is_found_however_it_is_written():
    """A privacy trial deleted Ada with --suppress (+15550001111) and sent her phone back as 15550001111:
    accepted, and identity, which formats it with its default region, gave it to a new person."""
    suppression = suppressing("phone:+15550001111")
    for written in ("15550001111", "(555) 000-1111", "+1 555-000-1111"):
        assert suppression.match(identify(traits=struct({"phone": written}))) == "traits.phone", written
    assert suppression.match(identify(traits=struct({"phone": "15550002222"}))) is None
    # Without a region (CDP_COLLECTOR_PHONE_REGION empty) only the E.164 form is checked, as before.
    plain = SuppressionList(phone_region=None)
    plain.add([sha256_hex("phone:+15550001111")])
    assert plain.match(identify(traits=struct({"phone": "15550001111"}))) is None
