"""The collector stamps every stored event with its source's trust (Event.source_trust) for identity: a
server source's SERVER, a client source's CLIENT, and with an identity_secret CLIENT_VERIFIED only when
context.userHash is HMAC-SHA256(identity_secret, userId). The hash is checked, never stored; a wrong one is
not refused. A gRPC client cannot choose the trust."""

from __future__ import annotations

import hashlib
import hmac
import json

import aiohttp
import grpc
import pytest

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_collector.__main__ import setup
from cdp_kit.service import serving

from .conftest import RunningCollector, collector_settings

SECRET = "s3cret-identity-verification-key"
KEYS = {"app": "wk-app-server-01", "web": "wk-web-client-01", "open": "wk-web-open-0001"}
SOURCES = [
    {"id": "app", "write_key": KEYS["app"]},
    {"id": "web", "write_key": KEYS["web"], "kind": "client", "identity_secret": SECRET},
    {"id": "web", "write_key": "wk-web-client-02", "kind": "client", "identity_secret": SECRET},  # rotating
    {"id": "open", "write_key": KEYS["open"], "kind": "client"},
]
SERVER = events_pb2.SOURCE_TRUST_SERVER
CLIENT = events_pb2.SOURCE_TRUST_CLIENT
UNVERIFIED = events_pb2.SOURCE_TRUST_CLIENT_UNVERIFIED
VERIFIED = events_pb2.SOURCE_TRUST_CLIENT_VERIFIED


def user_hash(user_id: str, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
async def collector(nats_server, tmp_path):
    settings = collector_settings(nats_server.url, tmp_path)
    settings.sources_file.write_text(json.dumps({"sources": SOURCES}))
    async with serving(settings, setup) as runtime:
        yield RunningCollector(runtime, nats_server.url)


async def _batch(collector, key: str, events: list[dict]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            collector.http_url + "/v1/batch",
            json={"batch": events},
            headers={"Authorization": aiohttp.encode_basic_auth(key, "")},
        ) as response,
    ):
        assert response.status == 200, await response.text()


def _identify(message_id: str, **fields) -> dict:
    return {"type": "identify", "messageId": message_id, "anonymousId": "anon-1", **fields}


async def test_each_event_carries_its_sources_trust_and_no_hash(collector):
    await _batch(collector, KEYS["app"], [_identify("s1", userId="ada", context={"userHash": user_hash("ada")})])
    await _batch(
        collector,
        KEYS["web"],
        [
            _identify("v1", userId="ada", context={"userHash": user_hash("ada"), "kept": 1}),
            _identify("v2", userId="ada", context={"userHash": user_hash("ada").upper()}),
            _identify("w1", userId="ada", context={"userHash": user_hash("bob")}),  # another user's hash
            _identify("w2", userId="ada", context={"userHash": user_hash("ada", "another-secret-0000")}),
            _identify("w3", userId="ada", context={"userHash": 12}),
            _identify("w4", userId="ada"),  # no hash
            _identify("w5", context={"userHash": user_hash("")}),  # no user id to verify
        ],
    )
    await _batch(collector, "wk-web-client-02", [_identify("v3", userId="bob", context={"userHash": user_hash("bob")})])
    await _batch(collector, KEYS["open"], [_identify("c1", userId="ada", context={"userHash": user_hash("ada")})])

    stored = {event.message_id: event for _, event in await collector.stored(expected=10)}
    trust = {message_id: event.source_trust for message_id, event in stored.items()}
    assert trust == {
        "s1": SERVER,
        "v1": VERIFIED,
        "v2": VERIFIED,
        "v3": VERIFIED,
        "w1": UNVERIFIED,
        "w2": UNVERIFIED,
        "w3": UNVERIFIED,
        "w4": UNVERIFIED,
        "w5": UNVERIFIED,
        "c1": CLIENT,
    }
    for event in stored.values():
        assert "userHash" not in event.context.extra.fields, event.message_id
        assert SECRET.encode() not in event.SerializeToString()
    assert stored["v1"].context.extra.fields["kept"].number_value == 1, "other context keys are kept"


async def test_a_grpc_client_cannot_choose_its_trust(collector):
    async with grpc.aio.insecure_channel(collector.grpc_address) as channel:
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        forged = events_pb2.Event(
            message_id="g1", type=events_pb2.EVENT_TYPE_IDENTIFY, anonymous_id="a", source_trust=VERIFIED
        )
        verified = events_pb2.Event(message_id="g2", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="ada")
        verified.context.extra.update({"userHash": user_hash("ada")})
        reply = await stub.Collect(collector_pb2.CollectRequest(write_key=KEYS["web"], events=[forged, verified]))
        assert reply.accepted == 2
        server = events_pb2.Event(
            message_id="g3", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="a", source_trust=CLIENT
        )
        assert (await stub.Collect(collector_pb2.CollectRequest(write_key=KEYS["app"], events=[server]))).accepted == 1
    stored = {event.message_id: event for _, event in await collector.stored(expected=3)}
    assert stored["g1"].source_trust == UNVERIFIED
    assert stored["g2"].source_trust == VERIFIED and "userHash" not in stored["g2"].context.extra.fields
    assert stored["g3"].source_trust == SERVER


@pytest.mark.parametrize(
    ("entries", "says"),
    [
        ([{"id": "w", "write_key": "wk-00000001", "kind": "browser"}], "sources[0].kind must be"),
        ([{"id": "w", "write_key": "wk-00000001", "identity_secret": SECRET}], 'for a "client" source'),
        ([{"id": "w", "write_key": "wk-00000001", "kind": "client", "identity_secret": "short"}], "at least 16"),
        (
            [
                {"id": "w", "write_key": "wk-00000001", "kind": "client", "identity_secret": SECRET},
                {"id": "w", "write_key": "wk-00000002", "kind": "client", "identity_secret": SECRET + "-new"},
            ],
            "sources[1].kind or identity_secret differ",
        ),
        (
            [{"id": "w", "write_key": "wk-00000001", "kind": "client"}, {"id": "w", "write_key": "wk-00000002"}],
            "sources[1].kind or identity_secret differ",
        ),
    ],
)
def test_a_sources_file_with_a_wrong_kind_or_secret_is_refused_without_the_secret(entries, says):
    from cdp_collector.sources import _parse_sources

    with pytest.raises(ValueError) as refused:
        _parse_sources({"sources": entries})
    assert says in str(refused.value)
    assert SECRET not in str(refused.value) and "short" not in str(refused.value)


def test_a_source_never_shows_its_secret():
    from cdp_collector.sources import _parse_sources

    sources = _parse_sources({"sources": SOURCES})
    assert sources[KEYS["web"]].kind == "client" and sources[KEYS["app"]].kind == "server"
    assert SECRET not in repr(sources[KEYS["web"]])
