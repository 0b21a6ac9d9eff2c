"""What a compromised service can push onto another's core subscriptions, and what those take from it.

A service's NATS user may publish only its own subjects, but one that keeps a consumer may create it as a
push consumer whose deliver subject is any subject at all: nats-server then publishes the stream's
messages there for it (the create permission does not look at the deliver subject in the request's body;
`libs/cdp-kit/tests/test_core_subjects_pushed.py`). Such a message keeps its stream subject, which is how
a receiver tells it from a publish (`subjects.published_on`). Orchestration publishes into a stream it
also consumes (`orchestration.in.<p>`, its own consumer `orchestration-p<p>`), so its user can put bytes of
its choosing onto any core subject. Each receiver here must drop what was not published on its subject.
Real nats-server, the platform's users and permissions, streams made by the provisioner."""

from __future__ import annotations

import asyncio
import hashlib
import json

import orjson

from cdp.events.v1 import events_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp_collector.domain import SuppressionList
from cdp_collector.privacy import SuppressionFollower
from cdp_kit.bus import Bus, ConsumerSpec, subjects
from cdp_kit.bus.consumer import DLQ_SEQ, ConsumerRunner
from cdp_testing.waiting import until


async def push_as_orchestration(orchestration, deliver_subject: str, payload: bytes, *, partition: int = 0) -> None:
    """Store `payload` on orchestration's own `orchestration.in.<partition>` (a publish its user may make)
    and have its own consumer of that partition, created again as a push consumer, deliver it onto
    `deliver_subject`."""
    js = orchestration.jetstream()
    await js.publish(subjects.orchestration_in(partition), payload, stream=subjects.ORCHESTRATION)
    name = subjects.partition_durable("orchestration", partition)
    config = {
        "durable_name": name,
        "deliver_subject": deliver_subject,
        "ack_policy": "none",
        "filter_subject": subjects.orchestration_in(partition),
    }
    reply = await orchestration.request(
        f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.ORCHESTRATION}.{name}",
        json.dumps({"stream_name": subjects.ORCHESTRATION, "config": config}).encode(),
        timeout=5,
    )
    assert "error" not in json.loads(reply.data), reply.data  # what the permissions allow


def identify(email: str) -> events_pb2.Event:
    event = events_pb2.Event(message_id="m-1", type=events_pb2.EVENT_TYPE_IDENTIFY, anonymous_id="anon-1")
    event.traits.update({"email": email})
    return event


def deletion(key: str, request_id: str) -> privacy_pb2.PrivacyDeleted:
    """A suppressing deletion as a notice made before keyed hashes names it (plain SHA-256 of the key):
    the collector still matches those, and they need no secret to make."""
    return privacy_pb2.PrivacyDeleted(
        request_id=request_id,
        person_id="p_victim",
        identifier_hashes=[hashlib.sha256(key.encode()).hexdigest()],
        suppress=True,
    )


async def test_the_collector_takes_no_deletion_pushed_onto_privacy_deleted_by_another_services_consumer(
    secured_bus,
):
    """Before: the collector's wake-up subscription applied whatever arrived on `privacy.deleted` as a
    deletion, so orchestration's user could suppress any person's events at the edge (answered SUPPRESSED
    and dropped) without profile, the one publisher of deletions, ever deleting them."""
    collector = await secured_bus.connect("collector")
    orchestration = await secured_bus.connect("orchestration")
    profile = await secured_bus.connect("profile")
    observer = await secured_bus.operator_connection()
    suppression = SuppressionList()
    follower = SuppressionFollower(collector, collector.jetstream(), suppression, follow_every=60)
    seen: list = []

    async def observed(msg):
        seen.append(msg)

    try:
        await follower.load(timeout=10)
        await observer.subscribe(subjects.PRIVACY_DELETED, cb=observed)
        await observer.flush()
        forged = deletion("email:victim@example.com", "forged")
        await push_as_orchestration(orchestration, subjects.PRIVACY_DELETED, forged.SerializeToString())
        await until(lambda: seen, "the pushed message on privacy.deleted")
        assert not subjects.published_on(seen[0], subjects.PRIVACY_DELETED)
        # A deletion profile publishes after it: once the collector applied that one, it had the pushed one.
        real = deletion("email:someone@example.com", "real")
        await profile.jetstream().publish(subjects.PRIVACY_DELETED, real.SerializeToString(), stream=subjects.PRIVACY)
        await until(lambda: suppression.match(identify("someone@example.com")), "profile's deletion applied")
        assert suppression.match(identify("victim@example.com")) is None, "the pushed deletion was applied"
        assert len(suppression) == 1
    finally:
        await follower.stop()
        for client in (collector, orchestration, profile, observer):
            await client.close()


async def test_a_consumer_takes_no_max_deliveries_advisory_pushed_by_another_services_consumer(secured_bus):
    """Before: a consumer's advisory subscription took whatever arrived on its MAX_DELIVERIES subject as
    nats-server's advisory and copied the message it named into the dead letters, so orchestration's user
    could make scoring dead-letter any message of PROFILES it chose (each a dead letter `cdpctl dlq
    --replay` resends to every consumer of the stream). Only nats-server publishes advisories."""
    profile = await secured_bus.connect("profile")
    orchestration = await secured_bus.connect("orchestration")
    operator = await secured_bus.operator_connection()
    seen: list = []

    async def observed(msg):
        seen.append(msg)

    try:
        for n in range(2):
            await profile.jetstream().publish(subjects.profiles_changed(0), b"change %d" % n, stream=subjects.PROFILES)
        async with Bus.connect(secured_bus.url, name="scoring", security=secured_bus.settings("scoring")) as bus:
            spec = ConsumerSpec(
                stream=subjects.PROFILES,
                durable=subjects.partition_durable("scoring", 0),
                filter_subjects=(subjects.profiles_changed(0),),
            )

            async def handled(batch) -> None:  # every message applied: nothing to dead-letter
                return None

            runner = ConsumerRunner(bus.js, spec, handler=handled, telemetry=bus.telemetry)
            running = asyncio.create_task(runner.run())
            try:
                await runner.wait_ready()
                advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{spec.stream}.{spec.durable}"
                await operator.subscribe(advisory, cb=observed)
                await operator.flush()
                await push_as_orchestration(orchestration, advisory, orjson.dumps({"stream_seq": 1, "deliveries": 5}))
                await until(lambda: seen, "the pushed message on the advisory subject")
                # What nats-server itself would publish there, after it (the operator's user stands in).
                await operator.publish(advisory, orjson.dumps({"stream_seq": 2, "deliveries": 5}))
                letters = operator.jetstream()

                async def dead_lettered() -> list[int]:
                    try:
                        info = await letters.stream_info(subjects.DLQ)
                    except Exception:
                        return []
                    found = []
                    for seq in range(info.state.first_seq or 1, (info.state.last_seq or 0) + 1):
                        letter = await letters.get_msg(subjects.DLQ, seq)
                        found.append(int(letter.headers[DLQ_SEQ]))
                    return found

                await until(lambda: _holds(dead_lettered, 2), "the advisory nats-server published dead-lettered")
                assert await dead_lettered() == [2], "the pushed advisory dead-lettered message 1"
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
    finally:
        for client in (profile, orchestration, operator):
            await client.close()


async def _holds(listing, seq: int) -> bool:
    return seq in await listing()


def test_a_direct_gets_answer_is_not_taken_for_a_publish():
    """A direct get's answer arrives on the reply subject its request named, the message's own bytes in it
    (no role may make one any more: test_sec_stored_answers.py); a receiver of a core subject tells it by the
    headers nats-server puts on it. Any other JetStream API answer is JSON."""
    from types import SimpleNamespace

    answer = SimpleNamespace(
        subject=subjects.PRIVACY_DELETED,
        headers={"Nats-Stream": "KV_CDP_OWNERSHIP", "Nats-Sequence": "1", "Nats-Subject": "$KV.CDP_OWNERSHIP.x.y"},
        data=deletion("email:victim@example.com", "forged").SerializeToString(),
    )
    assert not subjects.published_on(answer, subjects.PRIVACY_DELETED)
    api = SimpleNamespace(subject=subjects.PRIVACY_DELETED, headers=None, data=b'{"type":"io.nats.jetstream.api.v1.x"}')
    assert not subjects.published_on(api, subjects.PRIVACY_DELETED)
    published = SimpleNamespace(subject=subjects.PRIVACY_DELETED, headers={"Nats-Msg-Id": "privacy:r"}, data=b"\n\x01r")
    assert subjects.published_on(published, subjects.PRIVACY_DELETED)
