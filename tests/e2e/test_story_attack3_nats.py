"""An attacker holding the collector's NATS credentials (the internet-facing service's, from
`secrets/nats/collector.json`) against the platform as `make up` runs it, trying what stream
configuration would let through: nats-server applies a stream's sources and republish inside the account
without checking the user's subject permissions.

- give EVENTS_RAW sources (PROFILES, EVENTS_RESOLVED, PRIVACY) and a republish of everything to the
  collector's own inbox, to read every person's profile changes;
- create a stream (or the ownership bucket's) with the same sources and republish;
- republish `events.raw.*` to `events.resolved.*` and `privacy.deleted`, to forge a resolved event or a
  privacy deletion.

Every request is dropped by the server (no service's user may create, update, delete or purge a stream:
`cdpctl up` provisions them as its operator user). A person identified afterwards reaches their profile,
and nothing of it reaches the collector's inbox; nothing the attacker published reaches EVENTS_RESOLVED
or PRIVACY; and the streams are still as specified.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from stories import Story, eventually, start_platform

from cdp.profile.v1 import profile_pb2
from cdp_testing.waiting import until

PREFIX = "atk3-5c0e"  # every id of this module holds it


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    platform = start_platform(tmp_path_factory.mktemp("attack3"))
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


async def _request(nc, subject: str, body: dict | None = None) -> dict | None:
    try:
        reply = await nc.request(subject, json.dumps(body or {}).encode(), timeout=1.5)
    except nats.errors.TimeoutError:
        return None  # the server dropped it: a permissions violation
    return json.loads(reply.data)


async def _operator_configs(story: Story, *streams: str) -> dict[str, dict]:
    nc = await nats.connect(story.platform.run["nats"])  # cdpctl's user: the operator's
    try:
        js = nc.jetstream()
        found = {}
        for name in streams:
            try:
                found[name] = (await js.stream_info(name)).config.as_dict()
            except nats.js.errors.NotFoundError:
                pass  # (the ownership bucket, before the provisioner made it)
        return found
    finally:
        await nc.close()


async def _carrying(story: Story, stream: str, marker: bytes) -> int:
    """How many messages of `stream` hold `marker` (read by the operator, from the start)."""
    nc = await nats.connect(story.platform.run["nats"])
    try:
        js = nc.jetstream()
        total = (await js.stream_info(stream)).state.messages
        if total == 0:
            return 0
        subscription = await js.subscribe(
            ">", stream=stream, ordered_consumer=True, deliver_policy=nats.js.api.DeliverPolicy.ALL
        )
        found = 0
        for _ in range(total):
            try:
                message = await subscription.next_msg(timeout=5)
            except nats.errors.TimeoutError:
                break
            found += marker in message.data
        await subscription.unsubscribe()
        return found
    finally:
        await nc.close()


async def _published(story: Story, person_id: str) -> bool:
    """Whether PROFILES holds a change of `person_id` (read by the operator, newest first)."""
    nc = await nats.connect(story.platform.run["nats"])
    try:
        js = nc.jetstream()
        info = await js.stream_info("PROFILES")
        for seq in range(info.state.last_seq, info.state.first_seq - 1, -1) if info.state.messages else ():
            try:
                message = await js.get_msg("PROFILES", seq)
            except nats.js.errors.NotFoundError:  # deleted
                continue
            if any(c.person_id == person_id for c in profile_pb2.ProfileChangedBatch.FromString(message.data).changes):
                return True
        return False
    finally:
        await nc.close()


async def _attack(address: str, credentials: dict, configs: dict[str, dict], marker: bytes) -> tuple[dict, list]:
    intruder = await nats.connect(
        address,
        user=credentials["user"],
        password=credentials["password"],
        inbox_prefix=b"_INBOX.collector",
        allow_reconnect=False,
    )
    spied: list = []

    async def keep(message) -> None:
        spied.append(message)

    watching = await intruder.subscribe("_INBOX.collector.spy.>", cb=keep)
    await intruder.flush()
    raw = configs["EVENTS_RAW"]
    ownership = configs.get("KV_CDP_OWNERSHIP", {"name": "KV_CDP_OWNERSHIP", "subjects": ["$KV.CDP_OWNERSHIP.>"]})
    spy = {"src": ">", "dest": "_INBOX.collector.spy.>"}
    sources = [{"name": s} for s in ("PROFILES", "EVENTS_RESOLVED", "PRIVACY")]
    attempts = {
        "source PROFILES, EVENTS_RESOLVED and PRIVACY into EVENTS_RAW and republish to its inbox": (
            "$JS.API.STREAM.UPDATE.EVENTS_RAW",
            {**raw, "sources": sources, "republish": spy},
        ),
        "republish events.raw to events.resolved": (
            "$JS.API.STREAM.UPDATE.EVENTS_RAW",
            {**raw, "republish": {"src": "events.raw.*", "dest": "events.resolved.{{wildcard(1)}}"}},
        ),
        "republish events.raw to privacy.deleted": (
            "$JS.API.STREAM.UPDATE.EVENTS_RAW",
            {**raw, "republish": {"src": "events.raw.*", "dest": "privacy.deleted"}},
        ),
        "create the ownership bucket's stream sourcing PROFILES": (
            "$JS.API.STREAM.CREATE.KV_CDP_OWNERSHIP",
            {**ownership, "sources": sources, "republish": spy},
        ),
        "create a stream sourcing PROFILES": (
            "$JS.API.STREAM.CREATE.SPY",
            {"name": "SPY", "subjects": ["spy.>"], "sources": sources, "republish": spy},
        ),
        "delete EVENTS_RAW": ("$JS.API.STREAM.DELETE.EVENTS_RAW", None),
        "purge EVENTS_RAW": ("$JS.API.STREAM.PURGE.EVENTS_RAW", None),
    }
    refused = {what: await _request(intruder, subject, body) is None for what, (subject, body) in attempts.items()}
    # What the collector may publish, forged: an event whose payload a republish would have carried on.
    await intruder.jetstream().publish("events.raw.0", marker, timeout=5)
    return refused, [intruder, spied, watching]


def test_the_collectors_user_cannot_reconfigure_a_stream_to_read_or_forge(story):
    home = Path(story.platform.home)
    credentials = json.loads((home / "secrets" / "nats" / "collector.json").read_text())
    address = f"nats://{story.platform.run['nats'].rsplit('@', 1)[-1]}"
    configs = asyncio.run(_operator_configs(story, "EVENTS_RAW", "KV_CDP_OWNERSHIP"))
    # Never a protobuf Event (field tag 0 is invalid): identity dead-letters it. A random marker parsed as an
    # Event about once in 500 runs, and identity then resolved it onto events.resolved, as it may.
    marker = b"\x00" + f"{PREFIX}-forged-{uuid.uuid4().hex}".encode()

    async def attack_and_watch() -> tuple[dict, int]:
        refused, (intruder, spied, watching) = await _attack(address, credentials, configs, marker)
        try:
            # A person identified after the attack: their profile changes must not reach the attacker.
            user = f"{PREFIX}-victim"
            await asyncio.to_thread(
                story.send, {"type": "identify", "userId": user, "traits": {"email": f"{user}@example.com"}}
            )
            victim = await asyncio.to_thread(eventually, lambda: story.profile(user), 30)
            # Past the point where a stream reconfigured by the attacker would have republished the victim's
            # changes: PROFILES holds one (profile publishes it after its store has it, so the profile can be
            # read first), the server has sourced what PROFILES and EVENTS_RESOLVED hold into ORCHESTRATION
            # (stream sourcing, as the attacker's would be) and orchestration applied it. Then whatever the
            # server sent the intruder before is in (a ping answered after it): read, or still queued.
            await until(lambda: _published(story, victim.person_id), "the victim's profile change on PROFILES")
            await asyncio.to_thread(story.orchestration_caught_up)
            await intruder.flush()
            return refused, len(spied) + watching.pending_msgs
        finally:
            await intruder.close()

    refused, spied = asyncio.run(attack_and_watch())
    assert refused == {what: True for what in refused}, [what for what, ok in refused.items() if not ok]
    assert spied == 0, "messages reached the collector's inbox"
    assert asyncio.run(_carrying(story, "PRIVACY", marker)) == 0
    assert asyncio.run(_carrying(story, "EVENTS_RESOLVED", marker)) == 0
    after = asyncio.run(_operator_configs(story, "EVENTS_RAW", "KV_CDP_OWNERSHIP"))
    for name, config in after.items():
        for setting in ("sources", "mirror", "republish", "subject_transform"):
            assert not config.get(setting), (name, setting)
