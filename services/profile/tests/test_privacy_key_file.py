"""The profile service hashes deletion notices with the key file it is given (CDP_PRIVACY_HASH_KEY_FILE), the
current key first: what `cdpctl up` and the chart configure reaches the notices the collector matches."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

import grpc
import nats

from cdp.events.v1 import events_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream, partition_for, subjects
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.service import serving
from cdp_profile.__main__ import setup
from cdp_profile.settings import ProfileSettings

KEY = "profile-service-identifier-hash-key-0123"
EARLIER = "earlier-identifier-hash-key-0123456789"


async def test_a_suppressing_deletion_is_hashed_with_the_first_key_of_the_file(nats_server, tmp_path):
    key_file = tmp_path / "privacy-hash.key"
    key_file.write_text(f"{KEY}\n{EARLIER}\n")
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2,
        store_url="memory://", shutdown_grace=1.0, privacy_hash_key_file=key_file,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="key-file-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream())
        async with serving(settings, setup) as runtime:
            engine = runtime.parts["engine"]
            event = events_pb2.Event(message_id="m1", source_id="web", type=events_pb2.EVENT_TYPE_IDENTIFY)
            resolved = events_pb2.ResolvedEvent(event=event, person_id="p_gone", identifiers=["user_id:u-gone"])
            subject = subjects.events_resolved(partition_for("p_gone", 2))
            await bus.js.publish(subject, events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString())
            deadline = time.monotonic() + 15
            while "p_gone" not in engine.profiles:
                assert time.monotonic() < deadline, "the person was not created"
                await asyncio.sleep(0.02)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                request = profile_pb2.DeleteRequest(
                    person_id="p_gone", mode=profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE, request_id="r1"
                )
                await profile_pb2_grpc.ProfileServiceStub(channel).Delete(request)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info("PRIVACY")).state.last_seq
        notice = privacy_pb2.PrivacyDeleted.FromString((await js.get_msg("PRIVACY", last)).data)
    finally:
        await nc.close()
    assert notice.request_id == "r1" and notice.identifier_hash_key_id == IdentifierHashKeys.of(KEY).current.id
    assert list(notice.identifier_hashes) == [hmac.new(KEY.encode(), b"user_id:u-gone", hashlib.sha256).hexdigest()]
