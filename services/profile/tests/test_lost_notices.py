"""A PRIVACY stream older than profile's store gets its deletion notices back.

A privacy trial restored `nats/` from a backup taken before two suppressing deletions and kept the
stores: the collector and identity, which learn who is suppressed from PRIVACY alone, accepted the
deleted people's events again (a new person, a new CRM contact with the email), and nothing was logged.
Profile's store still recorded the deletions. Now profile keeps each notice (ids and keyed hashes, no
value) with where PRIVACY stored it, and at start publishes again those a stream older than that lacks,
at ERROR. A notice an operator purged from a stream that went on (to lift a suppression) stays purged."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from cdp.events.v1 import events_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream, partition_for, privacy_stream, subjects
from cdp_kit.service import serving
from cdp_profile.__main__ import setup
from cdp_profile.settings import ProfileSettings
from cdp_testing.waiting import until

PARTITIONS = 2


def identify(person: str) -> bytes:
    event = events_pb2.Event(message_id="m1", source_id="web", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="u-ada")
    event.traits.update({"email": "ada-lost-notice@example.com"})
    event.timestamp.FromNanoseconds(int(time.time() * 1e9))
    event.received_at.CopyFrom(event.timestamp)
    resolved = events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=["user_id:u-ada"])
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


async def notices(bus: Bus) -> list[privacy_pb2.PrivacyDeleted]:
    state = (await bus.js.stream_info(subjects.PRIVACY)).state
    if not state.messages:
        return []
    return [
        privacy_pb2.PrivacyDeleted.FromString((await bus.js.get_msg(subjects.PRIVACY, seq)).data)
        for seq in range(state.first_seq, state.last_seq + 1)
    ]


@pytest.mark.timeout(120)
async def test_notices_a_restored_older_privacy_stream_lacks_are_published_again_purged_ones_are_not(
    nats_server, tmp_path, caplog
):
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, partitions=PARTITIONS, auth_mode="none",
        store_url=f"sqlite:///{tmp_path / 'profile.db'}", shutdown_grace=1.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="lost-notices-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream())
        async with serving(settings, setup) as runtime:
            engine = runtime.parts["engine"]
            await bus.js.publish(subjects.events_resolved(partition_for("p_ada", PARTITIONS)), identify("p_ada"))
            await until(lambda: "p_ada" in engine.profiles, "Ada's profile")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                await profile_pb2_grpc.ProfileServiceStub(channel).Delete(
                    profile_pb2.DeleteRequest(
                        person_id="p_ada", request_id="req-ada", mode=profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE
                    )
                )
        (sent,) = await notices(bus)
        assert sent.request_id == "req-ada" and sent.identifier_hashes

        # nats/ restored from before the deletion: a PRIVACY without the notice, its sequences behind.
        await bus.js.delete_stream(subjects.PRIVACY)
        await bus.ensure_streams(privacy_stream())
        with caplog.at_level(logging.ERROR, logger="cdp.profile.privacy"):
            async with serving(settings, setup):
                pass
        (again,) = await notices(bus)
        assert again == sent  # the same notice: persons, keyed hashes, suppression
        (line,) = [r.getMessage() for r in caplog.records if "PRIVACY lacked" in r.getMessage()]
        assert "1 deletion notices" in line and "req-ada" in line and "ada-lost" not in line

        # Purged on purpose from a stream that went on: it stays purged.
        await bus.js.purge_stream(subjects.PRIVACY)
        async with serving(settings, setup):
            pass
        assert await notices(bus) == []
