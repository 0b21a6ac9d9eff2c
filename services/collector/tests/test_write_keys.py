"""A client refused for its write key is told where keys come from and how to send one, over HTTP and gRPC,
and never sees the key it sent echoed back (a wrong key is often a real key of another source or platform,
and the answer may end up in a log)."""

from __future__ import annotations

import aiohttp
import grpc
import pytest

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2

WRONG_KEY = "wk_typo_3f9a1c77d2"


def _track() -> dict:
    return {"type": "track", "messageId": "m1", "userId": "u1", "event": "Signed Up"}


async def _post(collector, headers: dict, body: dict) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(collector.http_url + "/v1/batch", json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def _says_where_keys_come_from(message: str) -> None:
    assert "CDP_COLLECTOR_SOURCES_FILE" in message  # the setting that lists the sources and their keys
    assert "run.json" in message  # where `make up` put its dev source's key


async def test_an_unknown_key_over_http_names_the_sources_setting_and_how_basic_auth_carries_it(collector):
    status, reply = await _post(
        collector, {"Authorization": aiohttp.encode_basic_auth(WRONG_KEY, "")}, {"batch": [_track()]}
    )
    message = reply["error"]["message"]
    assert status == 401 and message.startswith("unknown write key")
    _says_where_keys_come_from(message)
    assert "HTTP Basic user name" in message and "empty password" in message
    assert WRONG_KEY not in message and WRONG_KEY[3:] not in message
    await collector.stored(expected=0)


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no Authorization at all
        {"Authorization": aiohttp.encode_basic_auth("", WRONG_KEY)},  # the key sent as the password
        {"Authorization": f"Bearer {WRONG_KEY}"},  # a token's scheme
    ],
    ids=["none", "key-as-password", "bearer"],
)
async def test_a_request_without_a_key_where_segment_carries_it_is_told_where_it_goes(collector, headers):
    status, reply = await _post(collector, headers, {"batch": [_track()]})
    message = reply["error"]["message"]
    assert status == 401 and message.startswith("missing write key")
    assert "HTTP Basic user name" in message and "empty password" in message
    _says_where_keys_come_from(message)
    assert WRONG_KEY not in message
    await collector.stored(expected=0)


async def test_an_unknown_key_over_grpc_names_the_sources_setting_and_the_request_field(collector):
    event = events_pb2.Event(message_id="m1", type=events_pb2.EVENT_TYPE_TRACK, user_id="u1", event="Signed Up")
    async with grpc.aio.insecure_channel(collector.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collector_pb2_grpc.CollectorServiceStub(channel).Collect(
                collector_pb2.CollectRequest(write_key=WRONG_KEY, events=[event])
            )
    message = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and message.startswith("unknown write key")
    _says_where_keys_come_from(message)
    assert "write_key" in message
    assert WRONG_KEY not in message
    await collector.stored(expected=0)
