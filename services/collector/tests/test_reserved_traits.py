"""Segment's reserved traits are stored under one name each, the snake_case one cdp reads (`traits.first_name`
in the shipped CRM mapping and journey template). Segment takes them camelCase or snake_case, and apps
instrumented for analytics.js send `firstName`: the Segment-migration trial's HubSpot contact got no first
name. Segment also fills `name` from the first and last names when only those are sent."""

from __future__ import annotations

import json

import aiohttp
import grpc
from google.protobuf import json_format

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2

from .conftest import WRITE_KEY


def struct_to_dict(struct) -> dict:
    """The Struct as JSON reads it (Struct numbers are doubles: 329 is 329.0)."""
    return json_format.MessageToDict(struct)


async def post(url: str, path: str, body: dict) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + path, data=json.dumps({"writeKey": WRITE_KEY, **body}), headers={"Content-Type": "text/plain"}
        ) as response:
            return response.status


def identify(n: int, traits: dict, **fields) -> dict:
    return {"type": "identify", "messageId": f"ajs-{n}", "userId": "u-1", "traits": traits, **fields}


async def test_camel_case_reserved_traits_are_stored_snake_case_with_the_name_filled(collector):
    sent = {
        "email": "grace@example.com",
        "firstName": "Grace ",
        "lastName": "Hopper",
        "createdAt": "2015-02-23T22:28:55.111Z",
        "address": {"street": "6th St", "postalCode": "94103"},
        "company": {"name": "Initech", "employeeCount": 329},
        "planTier": "pro",  # not reserved: as sent
    }
    assert await post(collector.http_url, "/v1/i", identify(1, sent)) == 200
    ((_, event),) = await collector.stored(expected=1)
    assert struct_to_dict(event.traits) == {
        "email": "grace@example.com",
        "first_name": "Grace ",
        "last_name": "Hopper",
        "name": "Grace Hopper",
        "created_at": "2015-02-23T22:28:55.111Z",
        "address": {"street": "6th St", "postal_code": "94103"},
        "company": {"name": "Initech", "employee_count": 329.0},
        "planTier": "pro",
    }


async def test_snake_case_wins_when_both_spellings_arrive_and_a_sent_name_is_kept(collector):
    both = {
        "firstName": "Old",
        "first_name": "Grace",
        "last_name": "Hopper",
        "lastName": "Old",
        "name": "Amazing Grace",
    }
    assert await post(collector.http_url, "/v1/identify", identify(1, both)) == 200
    only_first = {"firstName": "Grace", "name": None}
    assert await post(collector.http_url, "/v1/identify", identify(2, only_first)) == 200
    stored = [struct_to_dict(event.traits) for _, event in await collector.stored(expected=2)]
    assert stored == [
        {"first_name": "Grace", "last_name": "Hopper", "name": "Amazing Grace"},
        {"first_name": "Grace", "name": None},  # no last name: no name filled, as Segment does
    ]


async def test_context_traits_and_group_traits_are_stored_the_same_way(collector):
    track = {
        "type": "track",
        "messageId": "ajs-t",
        "anonymousId": "a-1",
        "event": "Plan Viewed",
        "context": {"traits": {"firstName": "Grace", "lastName": "Hopper", "email": "grace@example.com"}},
    }
    # RudderStack sends identify traits only in context.traits: they become the identify's traits as well.
    rudder = {
        "type": "identify",
        "messageId": "rs-i",
        "userId": "u-1",
        "context": {"traits": {"firstName": "Grace", "createdAt": "2020-01-01"}},
    }
    group = {
        "type": "group",
        "messageId": "ajs-g",
        "userId": "u-1",
        "groupId": "g-1",
        "traits": {"name": "Initech", "createdAt": "2010-05-01", "address": {"postalCode": "94103"}},
    }
    assert await post(collector.http_url, "/v1/b", {"batch": [track, rudder, group]}) == 200
    stored = {event.message_id: event for _, event in await collector.stored(expected=3)}
    assert struct_to_dict(stored["ajs-t"].context.traits) == {
        "first_name": "Grace",
        "last_name": "Hopper",
        "name": "Grace Hopper",
        "email": "grace@example.com",
    }
    assert struct_to_dict(stored["rs-i"].traits) == {"first_name": "Grace", "created_at": "2020-01-01"}
    assert struct_to_dict(stored["rs-i"].context.traits) == {"first_name": "Grace", "created_at": "2020-01-01"}
    assert struct_to_dict(stored["ajs-g"].traits) == {
        "name": "Initech",
        "created_at": "2010-05-01",
        "address": {"postal_code": "94103"},
    }


async def test_grpc_events_are_stored_the_same_way(collector):
    event = events_pb2.Event(message_id="g-1", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="u-1")
    event.traits.update({"firstName": "Grace", "lastName": "Hopper"})
    async with grpc.aio.insecure_channel(collector.grpc_address) as channel:
        request = collector_pb2.CollectRequest(write_key=collector.write_key, events=[event])
        reply = await collector_pb2_grpc.CollectorServiceStub(channel).Collect(request)
    assert reply.accepted == 1
    ((_, stored),) = await collector.stored(expected=1)
    assert struct_to_dict(stored.traits) == {"first_name": "Grace", "last_name": "Hopper", "name": "Grace Hopper"}
