"""Keyed suppression hashes: a notice names the key its hashes were made with; the collector matches an
event against each form it holds (every key of its key file, and plain SHA-256 for notices published before
keyed hashes), and a notice made with a key it does not hold matches nothing."""

from __future__ import annotations

import hashlib

import pytest

from cdp.events.v1 import events_pb2
from cdp_collector.domain import SuppressionList
from cdp_collector.domain.suppression import UnknownHashKey
from cdp_kit.identifier_hash import IdentifierHashKeys

T = events_pb2
CURRENT = "c" * 40
OLD = "o" * 40
STRANGER = "s" * 40


def keyed(secret: str, *keys: str) -> tuple[list[str], str]:
    """(identifier_hashes, identifier_hash_key_id) as profile publishes them with `secret`."""
    key = IdentifierHashKeys.of(secret).current
    return [key.hash(k) for k in keys], key.id


def plain(*keys: str) -> list[str]:
    return [hashlib.sha256(k.encode()).hexdigest() for k in keys]


def by_user(user_id: str) -> events_pb2.Event:
    return T.Event(message_id="m-1", type=T.EVENT_TYPE_TRACK, user_id=user_id, event="E")


def by_email(email: str) -> events_pb2.Event:
    event = T.Event(message_id="m-2", type=T.EVENT_TYPE_IDENTIFY, anonymous_id="anon-1")
    event.traits.update({"email": email})
    return event


def test_a_notice_hashed_with_the_current_key_drops_the_persons_events():
    suppression = SuppressionList(IdentifierHashKeys.of(CURRENT, OLD))
    hashes, key_id = keyed(CURRENT, "user_id:u-9", "email:x@y.io")
    assert suppression.add(hashes, key_id=key_id) == (2, 0)
    assert suppression.match(by_user("u-9")) == "user_id"
    assert suppression.match(by_email(" X@Y.io")) == "traits.email"
    assert suppression.match(by_user("u-1")) is None


def test_a_notice_made_before_keyed_hashes_still_drops_the_persons_events():
    suppression = SuppressionList(IdentifierHashKeys.of(CURRENT))
    assert suppression.add(plain("user_id:u-9")) == (1, 0)  # no key id: plain SHA-256
    hashes, key_id = keyed(CURRENT, "email:x@y.io")
    suppression.add(hashes, key_id=key_id)
    assert suppression.match(by_user("u-9")) == "user_id"
    assert suppression.match(by_email("x@y.io")) == "traits.email"
    assert suppression.match(by_user("u-1")) is None and len(suppression) == 2


def test_a_notice_made_with_an_earlier_key_kept_in_the_file_still_matches():
    suppression = SuppressionList(IdentifierHashKeys.of(CURRENT, OLD))
    hashes, key_id = keyed(OLD, "user_id:u-9")
    suppression.add(hashes, key_id=key_id)
    assert suppression.match(by_user("u-9")) == "user_id"


def test_a_notice_made_with_a_key_the_collector_does_not_hold_matches_nothing():
    suppression = SuppressionList(IdentifierHashKeys.of(CURRENT))
    hashes, key_id = keyed(STRANGER, "user_id:u-9")
    with pytest.raises(UnknownHashKey) as caught:
        suppression.add(hashes, key_id=key_id)
    assert caught.value.key_id == key_id and caught.value.hashes == 1
    assert len(suppression) == 0 and suppression.match(by_user("u-9")) is None


def test_keyed_hashes_taken_as_plain_ones_match_nothing():
    """A keyed hash is no SHA-256 of the identifier: read without its key id it suppresses no one."""
    suppression = SuppressionList(IdentifierHashKeys.of(CURRENT))
    hashes, _key_id = keyed(CURRENT, "user_id:u-9")
    suppression.add(hashes)
    assert suppression.match(by_user("u-9")) is None


def test_the_same_identifier_under_two_forms_is_counted_once_per_form():
    suppression = SuppressionList(IdentifierHashKeys.of(CURRENT))
    suppression.add(plain("user_id:u-9"))
    hashes, key_id = keyed(CURRENT, "user_id:u-9")
    assert suppression.add(hashes, key_id=key_id) == (1, 0)
    assert suppression.add(hashes, key_id=key_id) == (0, 0)
    assert len(suppression) == 2 and suppression.match(by_user("u-9")) == "user_id"
