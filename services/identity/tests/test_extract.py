"""Identifiers are found where the rules say, wherever on the event that is."""

from __future__ import annotations

import pytest

from cdp.events.v1 import events_pb2
from cdp_identity.domain.rules import MergeRules
from cdp_identity.extract import Extractor
from cdp_kit.errors import InvalidArgument


def test_every_kind_of_path_is_read():
    rules = MergeRules.from_dict(
        {
            "types": [
                {"name": "user_id"},
                {"name": "salesforce_id", "paths": ["context.externalIds.salesforce", "traits.sfid"]},
                {"name": "email"},
                {"name": "loyalty_id", "paths": ["properties.loyalty"]},
                {"name": "device_id"},
                {"name": "anonymous_id"},
            ]
        }
    )
    event = events_pb2.Event(type=events_pb2.EVENT_TYPE_ALIAS, user_id="u1", anonymous_id="a1", previous_id="old")
    event.context.device.id = "d1"
    event.context.traits.update({"email": "x@example.com"})
    event.properties.update({"loyalty": 1234})
    event.context.extra.update(
        {"externalIds": [{"id": "003A", "type": "salesforce", "collection": "users"}, {"id": "z", "type": "zoho"}]}
    )
    assert sorted(Extractor(rules).extract(event)) == sorted(
        [
            ("user_id", "u1"),
            ("anonymous_id", "a1"),
            ("device_id", "d1"),
            ("email", "x@example.com"),
            ("loyalty_id", "1234"),
            ("salesforce_id", "003A"),
            ("previous", "old"),
        ]
    )


def test_an_unknown_path_is_refused_with_its_place_in_the_rules():
    rules = MergeRules.from_dict({"types": [{"name": "user_id"}, {"name": "email", "paths": ["headers.email"]}]})
    with pytest.raises(InvalidArgument) as caught:
        Extractor(rules)
    assert caught.value.field == "types[1].paths[0]"
