"""Upgrading to merges on partitioned subjects: what an older identity published on `identity.merged`
(unpartitioned) is still applied, by the per-replica durable that was reading it, and a replica that
never had such a durable creates none (a new one would replay every stored merge, re-merging persons
unmerged since)."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js.errors import NotFoundError

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    OutMessage,
    events_resolved_stream,
    identity_stream,
    partition_for,
    subjects,
)
from cdp_kit.service import serving
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings

PARTITIONS = 2
LEGACY = subjects.replica_durable("profile", "identity", 0)


def identify(person: str, n: int) -> bytes:
    event = events_pb2.Event(message_id=f"m{n}", source_id="web", type=events_pb2.EVENT_TYPE_IDENTIFY)
    event.traits.update({"name": f"Person {n}"})
    resolved = events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


@pytest.mark.timeout(60)
async def test_an_older_identitys_merges_are_drained_and_no_new_replica_durable_is_created(nats_server):
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none",
        partitions=PARTITIONS, store_url="memory://", shutdown_grace=1.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="upgrade-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream())
        # A fresh deployment: no replica durable appears.
        async with serving(settings, profile_setup):
            pass
        with pytest.raises(NotFoundError):
            await bus.js.consumer_info(subjects.IDENTITY, LEGACY)

        # Upgraded from the release before: replica 0 kept its durable on identity.merged, where an older
        # identity still publishes (or published before its own upgrade) a merge.
        legacy = ConsumerSpec(
            stream=subjects.IDENTITY,
            durable=LEGACY,
            filter_subjects=(subjects.IDENTITY_MERGED, subjects.IDENTITY_UNMERGED),
            batch_size=64,
            ack_wait=30,
            max_ack_pending=64,
        )
        await bus.consumer(legacy, lambda batch: None).provision()
        winner, loser = "p_w", "p_l"
        async with serving(settings, profile_setup) as p:
            engine = p.parts["engine"]
            for n, person in enumerate((winner, loser)):
                await bus.js.publish(subjects.events_resolved(partition_for(person, PARTITIONS)), identify(person, n))
            await until(lambda: winner in engine.profiles and loser in engine.profiles, "profiles built")
            merged = identity_pb2.IdentityMerged(merge_id="m1", winner=winner, loser=loser)
            await bus.publisher.publish_batch([OutMessage(subjects.IDENTITY_MERGED, merged.SerializeToString(), "m1")])
            await until(lambda: engine.hot.root(loser) == winner, "the unpartitioned merge applied")
            assert loser not in engine.profiles
            assert engine.profiles[winner].view(now=engine.clock()).merged_from == [loser]


async def until(done, what: str) -> None:
    deadline = time.monotonic() + 15
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within 15s"
        await asyncio.sleep(0.05)
