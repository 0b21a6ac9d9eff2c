"""An attacker against the platform as `make up` runs it: from the internet, with the public write key,
and from a compromised collector pod, with the collector's own NATS credentials.

From outside, every hostile event is either stored or refused naming its field: ids holding NATS subject
characters (`$JS.API.>`, `*`, `.`), a newline forging a log line, traits named `__proto__`, `$where`,
`_id` or with dots, a string cut inside an emoji. Nothing is dead-lettered downstream, the hostile
person's profile reads back, and (the module's log audit) no value sent reaches a log line.

From the collector pod, whose credentials the workspace holds in `secrets/nats/collector.json`: the
collector is the service exposed to the internet, so its NATS user is the one an attacker is most likely
to hold. It cannot read the event streams, publish another service's subjects, reconfigure a stream it
does not own, or rewrite, drain or delete identity's consumer of privacy deletions; and after all that
was tried, a deletion still suppresses the person at the edge.

From a compromised consuming service (scoring, which shares EVENTS_RESOLVED with profile and PROFILES with
segmentation): it cannot drain, acknowledge for, rewrite or delete their consumers, nor reconfigure or
purge the dead letters' stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nats
import nats.errors
import pytest
from stories import Story, eventually, start_platform

from cdp.profile.v1 import profile_pb2

PREFIX = "atk-9f31"  # every id of this module holds it: no other test sends it
SUBJECT_ID = f"$JS.API.STREAM.PURGE.{PREFIX}"  # a user id that reads as a JetStream API subject


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    platform = start_platform(tmp_path_factory.mktemp("attacker"))
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


def test_hostile_events_are_stored_or_refused_by_field_and_nothing_is_dead_lettered(story):
    hostile = [
        {"type": "track", "userId": SUBJECT_ID, "event": "a.*.>"},
        {"type": "track", "userId": f"{PREFIX}-*.>", "event": "$JS.API.>"},
        {"type": "track", "userId": f"{PREFIX}-log", "event": 'Viewed\n{"level":"ERROR","msg":"forged"}'},
        {
            "type": "identify",
            "userId": f"{PREFIX}-traits",
            "traits": {
                "__proto__": {"admin": True},
                "$where": "1 == 1",
                "_id": "x",
                "a.b": 1,
                "email": f"{PREFIX}@x.io",
            },
        },
        {"type": "track", "userId": f"{PREFIX}-emoji", "event": "Searched", "properties": {"query": "pizza \ud83c"}},
    ]
    story.send(*hostile)
    story.register(SUBJECT_ID)
    # A NUL in an id is refused naming the field; the rest of that batch is stored.
    refused = post_batch(story, [{"type": "track", "userId": f"{PREFIX}-\x00", "event": "E"}])
    assert refused["error"]["field"] == "batch[0].userId", refused

    profile = eventually(lambda: story.profile(f"{PREFIX}-traits"), timeout=30)
    assert {"__proto__", "$where", "_id", "a.b"} <= set(profile.traits)
    eventually(lambda: story.profile(f"{PREFIX}-emoji"), timeout=30)
    eventually(lambda: story.profile(SUBJECT_ID), timeout=30)
    assert asyncio.run(dead_letters(story)) == 0


def test_a_compromised_collector_cannot_reach_past_its_own_role(story):
    home = Path(story.platform.home)
    credentials = json.loads((home / "secrets" / "nats" / "collector.json").read_text())
    address = story.platform.run["nats"].rsplit("@", 1)[-1]
    configs = asyncio.run(stream_configs(story, "PRIVACY", "DLQ", "EVENTS_RESOLVED"))
    refused = asyncio.run(_attack(f"nats://{address}", credentials, configs))
    assert refused == {
        "subscribe events.>": True,
        "subscribe another service's replies": True,
        "publish events.resolved": True,
        "publish privacy.deleted": True,
        "update PRIVACY": True,
        "update DLQ": True,
        "update EVENTS_RESOLVED": True,
        "rewrite identity's privacy consumer": True,
        "drain identity's privacy consumer": True,
        "delete identity's privacy consumer": True,
        "delete a stream": True,
    }
    assert "tampered" not in asyncio.run(identity_privacy_consumer(story))

    # The deletion path the attack aimed at still works: a suppressed person is stopped at the edge.
    user = f"{PREFIX}-deleted"
    story.send({"type": "identify", "userId": user, "traits": {"plan": "pro"}})
    person = eventually(lambda: story.profile(user), timeout=30).person_id
    story.profiles.Delete(
        profile_pb2.DeleteRequest(person_id=person, mode=profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE),
        metadata=story.metadata,
        timeout=30,
    )
    eventually(lambda: post_batch(story, [{"type": "track", "userId": user, "event": "E"}])["suppressed"] == 1, 30)


def test_a_compromised_consuming_service_cannot_reach_anothers_consumers(story):
    """Scoring reads EVENTS_RESOLVED beside profile and PROFILES beside segmentation: with scoring's NATS
    credentials, their consumers can be neither drained, rewritten nor deleted, and the dead letters'
    stream (identity's) neither reconfigured nor purged."""
    home = Path(story.platform.home)
    credentials = json.loads((home / "secrets" / "nats" / "scoring.json").read_text())
    address = story.platform.run["nats"].rsplit("@", 1)[-1]
    before = asyncio.run(consumer_description(story, "PROFILES", "segmentation-p0"))
    dlq = asyncio.run(stream_configs(story, "DLQ"))["DLQ"]
    refused = asyncio.run(_attack_consumers(f"nats://{address}", credentials, dlq))
    assert refused == {
        "drain profile's consumer of events.resolved": True,
        "acknowledge for profile's consumer": True,
        "rewrite segmentation's consumer, the name in the body": True,
        "rewrite segmentation's consumer by name": True,
        "delete segmentation's consumer": True,
        "update DLQ": True,
        "purge DLQ": True,
    }
    assert asyncio.run(consumer_description(story, "PROFILES", "segmentation-p0")) == before


async def consumer_description(story: Story, stream: str, name: str) -> str:
    nc = await operator(story)
    try:
        return (await nc.jetstream().consumer_info(stream, name)).config.description or ""
    finally:
        await nc.close()


class Intruder:
    """A connection under a pod's stolen NATS user: each attempt says whether the server refused it
    (a permissions violation reported, or an API error / no answer)."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.nc = None

    @classmethod
    async def connect(cls, url: str, credentials: dict[str, str], inbox_prefix: str) -> Intruder:
        intruder = cls()

        async def on_error(exc: Exception) -> None:
            intruder.violations.append(str(exc))

        intruder.nc = await nats.connect(
            url,
            user=credentials["user"],
            password=credentials["password"],
            inbox_prefix=inbox_prefix,
            error_cb=on_error,
            allow_reconnect=False,
        )
        return intruder

    async def _refused_by_server(self, act) -> bool:
        before = len(self.violations)
        await act
        await self.nc.flush()
        await asyncio.sleep(0.3)
        return len(self.violations) > before

    async def subscribe_refused(self, subject: str) -> bool:
        return await self._refused_by_server(self.nc.subscribe(subject))

    async def publish_refused(self, subject: str) -> bool:
        return await self._refused_by_server(self.nc.publish(subject, b"forged"))

    async def api_refused(self, subject: str, body: dict | None = None) -> bool:
        try:
            answer = await self.nc.request(subject, json.dumps(body or {}).encode(), timeout=1)
        except nats.errors.TimeoutError:
            return True  # the server dropped the request: not this user's to make
        # A JSON error is the API saying no; a fetch that was let through answers with a status, no body.
        return bool(answer.data) and "error" in json.loads(answer.data)

    async def close(self) -> None:
        await self.nc.close()


async def _attack_consumers(url: str, credentials: dict[str, str], dlq: dict) -> dict[str, bool]:
    """What scoring's user tried, each True when the server refused it (or the API said no)."""
    intruder = await Intruder.connect(url, credentials, "_INBOX.scoring")
    tampered = {"name": "segmentation-p0", "ack_policy": "explicit", "description": "tampered"}
    durable = {"durable_name": "segmentation-p0", "ack_policy": "explicit", "description": "tampered"}
    try:
        return {
            "drain profile's consumer of events.resolved": await intruder.api_refused(
                "$JS.API.CONSUMER.MSG.NEXT.EVENTS_RESOLVED.profile-p0", {"batch": 10, "expires": 200_000_000}
            ),
            "acknowledge for profile's consumer": await intruder.publish_refused(
                "$JS.ACK.EVENTS_RESOLVED.profile-p0.1.1.1.0.0"
            ),
            "rewrite segmentation's consumer, the name in the body": await intruder.api_refused(
                "$JS.API.CONSUMER.CREATE.PROFILES", {"stream_name": "PROFILES", "config": tampered}
            ),
            "rewrite segmentation's consumer by name": await intruder.api_refused(
                "$JS.API.CONSUMER.DURABLE.CREATE.PROFILES.segmentation-p0",
                {"stream_name": "PROFILES", "config": durable},
            ),
            "delete segmentation's consumer": await intruder.api_refused(
                "$JS.API.CONSUMER.DELETE.PROFILES.segmentation-p0"
            ),
            "update DLQ": await intruder.api_refused("$JS.API.STREAM.UPDATE.DLQ", dlq),
            "purge DLQ": await intruder.api_refused("$JS.API.STREAM.PURGE.DLQ"),
        }
    finally:
        await intruder.close()


def post_batch(story: Story, batch: list[dict]) -> dict:
    """The collector's answer to one batch, whatever its status."""
    body = json.dumps({"batch": [{"messageId": str(uuid.uuid4()), **event} for event in batch]}).encode()
    platform = story.platform
    key = base64.b64encode(f"{platform.write_key}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {key}"}
    url = platform.service("collector")["http"].rstrip("/") + "/v1/batch"
    request = urllib.request.Request(url, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return json.loads(refused.read())


async def operator(story: Story):
    return await nats.connect(story.platform.run["nats"])  # cdpctl's user: the operator's, unlimited


async def dead_letters(story: Story) -> int:
    nc = await operator(story)
    try:
        return (await nc.jetstream().stream_info("DLQ")).state.messages
    finally:
        await nc.close()


async def stream_configs(story: Story, *streams: str) -> dict[str, dict]:
    """Each stream's whole configuration, shrunk to one message: an update the server lets through works."""
    nc = await operator(story)
    try:
        js = nc.jetstream()
        return {name: {**(await js.stream_info(name)).config.as_dict(), "max_msgs": 1} for name in streams}
    finally:
        await nc.close()


async def identity_privacy_consumer(story: Story) -> str:
    nc = await operator(story)
    try:
        return (await nc.jetstream().consumer_info("PRIVACY", "identity-privacy-0")).config.description or ""
    finally:
        await nc.close()


async def _attack(url: str, credentials: dict[str, str], shrunk: dict[str, dict]) -> dict[str, bool]:
    """What the collector's user tried, each True when the server refused it (or the API said no)."""
    intruder = await Intruder.connect(url, credentials, "_INBOX.collector")
    tampered = {"name": "identity-privacy-0", "ack_policy": "explicit", "description": "tampered"}
    try:
        return {
            "subscribe events.>": await intruder.subscribe_refused("events.>"),
            "subscribe another service's replies": await intruder.subscribe_refused("_INBOX.profile.>"),
            "publish events.resolved": await intruder.publish_refused("events.resolved.0"),
            "publish privacy.deleted": await intruder.publish_refused("privacy.deleted"),
            "update PRIVACY": await intruder.api_refused("$JS.API.STREAM.UPDATE.PRIVACY", shrunk["PRIVACY"]),
            "update DLQ": await intruder.api_refused("$JS.API.STREAM.UPDATE.DLQ", shrunk["DLQ"]),
            "update EVENTS_RESOLVED": await intruder.api_refused(
                "$JS.API.STREAM.UPDATE.EVENTS_RESOLVED", shrunk["EVENTS_RESOLVED"]
            ),
            "rewrite identity's privacy consumer": await intruder.api_refused(
                "$JS.API.CONSUMER.CREATE.PRIVACY",
                {"stream_name": "PRIVACY", "config": tampered},
            ),
            "drain identity's privacy consumer": await intruder.api_refused(
                "$JS.API.CONSUMER.MSG.NEXT.PRIVACY.identity-privacy-0", {"batch": 10, "expires": 200_000_000}
            ),
            "delete identity's privacy consumer": await intruder.api_refused(
                "$JS.API.CONSUMER.DELETE.PRIVACY.identity-privacy-0"
            ),
            "delete a stream": await intruder.api_refused("$JS.API.STREAM.DELETE.PROFILES"),
        }
    finally:
        await intruder.close()
