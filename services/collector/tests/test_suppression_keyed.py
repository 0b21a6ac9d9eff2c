"""Keyed suppression hashes through a real collector and nats-server: a collector given the platform's
key file drops a suppressed person's events whether their notice was made with that key or, before keyed
hashes, with plain SHA-256; a notice made with another key suppresses no one and is logged as an error
naming the key id and the variable, without an identifier value."""

from __future__ import annotations

import asyncio
import hashlib
import logging

from cdp.collector.v1 import collector_pb2
from cdp.events.v1 import events_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp_collector.__main__ import setup
from cdp_kit.bus import ensure_stream, privacy_stream
from cdp_kit.identifier_hash import SETTING, IdentifierHashKeys
from cdp_kit.service import serving

from .conftest import RunningCollector, collector_settings
from .test_suppression import collect, post_batch

SUPPRESSED = collector_pb2.EVENT_STATUS_SUPPRESSED
ACCEPTED = collector_pb2.EVENT_STATUS_ACCEPTED
PLATFORM_KEY = "p" * 20 + "-platform-key-0123456789"
EARLIER_KEY = "e" * 20 + "-earlier-key-0123456789"
OTHER_KEY = "x" * 20 + "-another-platform-key-0123"


async def publish(nc, hashes: list[str], *, key_id: str = "", request_id: str) -> None:
    js = nc.jetstream()
    await ensure_stream(js, privacy_stream())
    notice = privacy_pb2.PrivacyDeleted(
        request_id=request_id,
        person_id=f"person-{request_id}",
        identifier_hashes=hashes,
        suppress=True,
        identifier_hash_key_id=key_id,
    )
    await js.publish("privacy.deleted", notice.SerializeToString(), stream="PRIVACY")


def keyed(secret: str, *keys: str) -> dict:
    key = IdentifierHashKeys.of(secret).current
    return {"hashes": [key.hash(k) for k in keys], "key_id": key.id}


def track(message_id: str, user_id: str) -> events_pb2.Event:
    return events_pb2.Event(message_id=message_id, type=events_pb2.EVENT_TYPE_TRACK, user_id=user_id, event="E")


async def test_a_collector_with_the_key_file_drops_events_of_keyed_and_of_older_plain_notices(
    nats_server, nats_client, tmp_path, caplog
):
    key_file = tmp_path / "privacy-hash.key"
    key_file.write_text(f"{PLATFORM_KEY}\n{EARLIER_KEY}\n")
    await publish(nats_client, [hashlib.sha256(b"user_id:u-plain").hexdigest()], request_id="before-keys")
    await publish(nats_client, **keyed(EARLIER_KEY, "user_id:u-earlier"), request_id="earlier-key")
    await publish(nats_client, **keyed(OTHER_KEY, "user_id:u-other"), request_id="other-key")
    settings = collector_settings(nats_server.url, tmp_path, privacy_hash_key_file=key_file)
    with caplog.at_level(logging.INFO, logger="cdp.collector"):
        async with serving(settings, setup) as runtime:
            collector = RunningCollector(runtime, nats_server.url)
            await publish(nats_client, **keyed(PLATFORM_KEY, "email:ada@example.com"), request_id="keyed")
            event = events_pb2.Event(message_id="g-5", type=events_pb2.EVENT_TYPE_IDENTIFY, anonymous_id="a-5")
            event.traits.update({"email": "Ada@Example.com"})
            # The notice published after the start reaches the list by the collector's subscription: wait for
            # it (a guard of 30 s, not a speed figure; 4 s and going on regardless failed a CI run).
            deadline = asyncio.get_running_loop().time() + 30
            while len(runtime.parts["suppression"]) < 3:
                assert asyncio.get_running_loop().time() < deadline, "the keyed notice never reached the list"
                await asyncio.sleep(0.02)
            reply = await collect(
                collector,
                [
                    track("g-1", "u-plain"),
                    track("g-2", "u-earlier"),
                    track("g-3", "u-other"),
                    track("g-4", "u-1"),
                    event,
                ],
            )
            assert [r.status for r in reply.results] == [SUPPRESSED, SUPPRESSED, ACCEPTED, ACCEPTED, SUPPRESSED]
            status, answer = await post_batch(collector, [{"type": "track", "userId": "u-earlier", "event": "E"}])
            assert status == 200 and answer["suppressed"] == 1
            await collector.stored(expected=2)
    other_id = IdentifierHashKeys.of(OTHER_KEY).current.id
    (logged,) = [r for r in caplog.records if other_id in r.getMessage()]
    assert logged.levelno == logging.ERROR and SETTING in logged.getMessage() and "other-key" in logged.getMessage()
    assert not any("u-other" in r.getMessage() or OTHER_KEY in r.getMessage() for r in caplog.records)


async def test_a_collector_with_a_wrong_key_suppresses_no_one(nats_server, nats_client, tmp_path):
    key_file = tmp_path / "privacy-hash.key"
    key_file.write_text(OTHER_KEY + "\n")
    await publish(nats_client, **keyed(PLATFORM_KEY, "user_id:u-9"), request_id="keyed")
    settings = collector_settings(nats_server.url, tmp_path, privacy_hash_key_file=key_file)
    async with serving(settings, setup) as runtime:
        collector = RunningCollector(runtime, nats_server.url)
        assert len(runtime.parts["suppression"]) == 0
        reply = await collect(collector, [track("g-1", "u-9")])
        assert [r.status for r in reply.results] == [ACCEPTED]
