"""No service's user can make nats-server store bytes of its choosing in another service's stream.

A JetStream API request is answered on whatever reply subject the requester names (permissions look at the
request's subject alone), and every stream stores what is published on its subjects, those answers
included. A direct get's answer is the message itself: every service's user could write a key of its own
in the ownership bucket and direct-get it with `privacy.deleted` as the reply subject, and PRIVACY stored a
deletion of whoever it named, as if profile had published it (identity, orchestration and the CRM connector
erase that person's data; the collector suppresses them), or `events.resolved.<p>` an event for any person.
The collector's own user, the edge's, could. Now no role may direct-get anything, and the ownership bucket
is made without direct gets (each service reads its keys by a scan: cdp_kit.ownership.group_kv)."""

from __future__ import annotations

import contextlib

import nats
import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import subjects
from cdp_kit.natsauth import OWNERSHIP_BUCKET, PROVISIONER, ROLES, permissions_document
from cdp_testing.waiting import until

TARGETS = (subjects.PRIVACY_DELETED, subjects.events_resolved(0))


async def stored(bus, stream: str) -> int:
    operator = await bus.operator_connection()
    try:
        return (await operator.jetstream().stream_info(stream)).state.messages
    finally:
        await operator.close()


@pytest.mark.parametrize("service", sorted(ROLES))
async def test_a_services_own_key_cannot_be_answered_into_another_services_stream(secured_bus, service):
    refusals: list[Exception] = []

    async def refused(error: Exception) -> None:
        refusals.append(error)

    client = await nats.connect(
        secured_bus.url.replace("nats://", f"nats://{service}:{secured_bus.passwords[service]}@", 1),
        inbox_prefix=f"_INBOX.{service}".encode(),
        error_cb=refused,
    )
    try:
        key = f"$KV.{OWNERSHIP_BUCKET}.{service}.forged"
        forged = privacy_pb2.PrivacyDeleted(request_id="forged", person_id="p_victim").SerializeToString()
        await client.request(key, forged, timeout=5)  # its own key: a put it may make, stored
        for target in TARGETS:
            await client.publish(f"$JS.API.DIRECT.GET.KV_{OWNERSHIP_BUCKET}.{key}", b"", reply=target)
        await client.flush()
        # Refused as the server reads the request, before anything is answered: each refusal is reported.
        # (Allowed, the answers are stored within moments: either ends the wait.)

        async def settled() -> bool:
            return len(refusals) >= len(TARGETS) or await stored(secured_bus, subjects.PRIVACY) > 0

        await until(settled, "the direct gets refused or answered")
        assert await stored(secured_bus, subjects.PRIVACY) == 0, "a deletion nobody made was stored in PRIVACY"
        assert await stored(secured_bus, subjects.EVENTS_RESOLVED) == 0
        assert len(refusals) == len(TARGETS)
        assert all("permissions violation" in str(error).lower() for error in refusals)
    finally:
        await client.close()


def test_no_role_may_direct_get():
    """Single messages are read with STREAM.MSG.GET (its answer is JSON, which no consumer takes for one of
    its messages); a service's own keys with a scan consumer whose filter is in its create subject."""
    granted = {
        role: [s for s in rules["publish"]["allow"] if ".DIRECT." in s]
        for role, rules in permissions_document().items()
    }
    assert granted == {role: [] for role in [*ROLES, PROVISIONER]}


async def test_the_provisioner_makes_the_ownership_bucket_without_direct_gets_and_takes_them_away(secured_bus):
    from cdp_kit.provision import as_operator

    operator = await secured_bus.operator_connection()
    try:
        js = operator.jetstream()
        assert not (await js.stream_info(f"KV_{OWNERSHIP_BUCKET}")).config.allow_direct
        # A bucket an earlier version made with them: the next provisioning takes them away.
        await js.delete_key_value(OWNERSHIP_BUCKET)
        await js.create_key_value(bucket=OWNERSHIP_BUCKET, history=1, direct=True)
        done = await as_operator(
            secured_bus.url, secured_bus.operator, {"CDP_OWNERSHIP": "nats", "CDP_PARTITIONS": "2"}
        )
        assert any(f"KV_{OWNERSHIP_BUCKET}" in line and "allow_direct" in line for line in done)
        assert not (await js.stream_info(f"KV_{OWNERSHIP_BUCKET}")).config.allow_direct
        assert not [
            line
            for line in await as_operator(
                secured_bus.url, secured_bus.operator, {"CDP_OWNERSHIP": "nats", "CDP_PARTITIONS": "2"}
            )
            if "KV_" in line
        ]
    finally:
        await operator.close()


@pytest.mark.xfail(
    strict=True,
    reason="known gap: any JetStream API answer (JSON) is stored by whichever stream its reply subject falls in; "
    "closing it needs the streams in a NATS account of their own (docs/security.md, this module's docstring)",
)
async def test_no_api_answer_lands_in_another_services_keys(secured_bus):
    """What is left of the channel: an answer that is JSON (an account lookup, a stream's info), not bytes of
    the requester's choosing, but stored all the same, here as one of segmentation's leases and a member's
    heartbeat, by the collector's user. A lease whose revision moves under its holder is lost by it."""
    collector = await secured_bus.connect("collector")
    try:
        await collector.publish("$JS.API.INFO", b"", reply=f"$KV.{OWNERSHIP_BUCKET}.segmentation.members.phantom")
        await collector.publish(
            f"$JS.API.STREAM.INFO.{subjects.PRIVACY}", b"", reply=f"$KV.{OWNERSHIP_BUCKET}.segmentation.partitions.0"
        )
        await collector.flush()
        # Stored within moments while the gap is open (the expected failure, at once); once it is closed
        # nothing comes, and the bound of the wait is what this test then costs.
        with contextlib.suppress(AssertionError):
            await until(lambda: stored(secured_bus, f"KV_{OWNERSHIP_BUCKET}"), "the answers stored", timeout=5)
        assert await stored(secured_bus, f"KV_{OWNERSHIP_BUCKET}") == 0
    finally:
        await collector.close()
