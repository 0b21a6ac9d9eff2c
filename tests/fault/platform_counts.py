"""What the whole-platform kill test (test_platform_kill.py) counts at the end, read where a user or an
on-call engineer would look: profiles and timelines through profile's API, the segments stream, the local
SMTP server's maildir, every durable consumer's position and the dead-letter stream on nats-server, and the
services' logs."""

from __future__ import annotations

import asyncio
import collections
import email
import json
from pathlib import Path

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_testing.platform_run import RunningPlatform


def lookup(stub, platform: RunningPlatform, user: str):
    return stub.LookupProfile(
        profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value=user),
        metadata=platform.admin_metadata,
        timeout=10,
    )


def timeline_counts(platform: RunningPlatform, users: list[str]) -> dict[str, collections.Counter]:
    """user -> how often each of their own messageIds is on their profile's timeline."""
    counts: dict[str, collections.Counter] = {}
    with grpc.insecure_channel(platform.grpc_address("profile")) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        for user in users:
            try:
                profile = lookup(stub, platform, user)
            except grpc.RpcError:
                counts[user] = collections.Counter()
                continue
            seen: collections.Counter = collections.Counter()
            token = ""
            while True:
                page = stub.ListEvents(
                    profile_pb2.ListEventsRequest(person_id=profile.person_id, page_size=1000, page_token=token),
                    metadata=platform.admin_metadata,
                    timeout=10,
                )
                # Timeline ids are "<source>:<messageId>"; the CRM's and orchestration's own events are not ours.
                seen.update(
                    message_id
                    for e in page.events
                    if (message_id := e.event_id.partition(":")[2]).startswith(f"{user}-")
                )
                token = page.next_page_token
                if not token:
                    break
            counts[user] = seen
    return counts


def person_ids(platform: RunningPlatform, users: list[str]) -> dict[str, str]:
    with grpc.insecure_channel(platform.grpc_address("profile")) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        return {user: lookup(stub, platform, user).person_id for user in users}


def traits_of(platform: RunningPlatform, users: list[str], names: tuple[str, ...]) -> dict[str, tuple]:
    """user -> the profile's values of the traits `names` (None for a trait it lacks)."""
    with grpc.insecure_channel(platform.grpc_address("profile")) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        out = {}
        for user in users:
            traits = lookup(stub, platform, user).traits
            out[user] = tuple(traits[n].value.string_value if n in traits else None for n in names)
        return out


async def _jetstream(nats_url: str, read):
    import nats

    nc = await nats.connect(nats_url)
    try:
        return await read(nc.jetstream())
    finally:
        await nc.close()


def segment_transitions(nats_url: str) -> collections.Counter:
    """(person, segment, entered) -> how many times the segments stream holds it."""
    from cdp.segmentation.v1 import segmentation_pb2 as seg
    from cdp_kit.bus import subjects

    async def read(js) -> collections.Counter:
        info = await js.stream_info(subjects.SEGMENTS)
        out: collections.Counter = collections.Counter()
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(subjects.SEGMENTS, sequence)
            except Exception:  # a deleted sequence holds nothing
                continue
            for change in seg.SegmentEventBatch.FromString(msg.data).events:
                out[(change.person_id, change.segment_id, change.entered)] += 1
        return out

    return asyncio.run(_jetstream(nats_url, read))


def consumers_behind(nats_url: str) -> dict[str, tuple[int, int]]:
    """Durable consumers with work left, as `cdpctl lag` shows them: "STREAM/consumer" -> (pending,
    acknowledgement pending). Empty once every service has handled everything sent to it."""

    async def read(js) -> dict[str, tuple[int, int]]:
        behind = {}
        for stream in await js.streams_info():
            for info in await js.consumers_info(stream.config.name):
                if info.config.durable_name and (info.num_pending or info.num_ack_pending):
                    behind[f"{stream.config.name}/{info.name}"] = (info.num_pending or 0, info.num_ack_pending or 0)
        return behind

    return asyncio.run(_jetstream(nats_url, read))


def dead_letters(nats_url: str) -> collections.Counter:
    """(stream, consumer, reason) -> how many messages the dead-letter stream holds, as `cdpctl dlq` lists them."""
    from nats.js.errors import NotFoundError

    from cdp_kit.bus import subjects
    from cdp_kit.bus.consumer import DLQ_CONSUMER, DLQ_REASON, DLQ_STREAM

    async def read(js) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        try:
            info = await js.stream_info(subjects.DLQ)
        except NotFoundError:
            return out  # no consumer ever dead-lettered: the stream was never needed
        for sequence in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
            try:
                msg = await js.get_msg(subjects.DLQ, sequence)
            except NotFoundError:
                continue
            headers = msg.headers or {}
            out[(headers.get(DLQ_STREAM), headers.get(DLQ_CONSUMER), headers.get(DLQ_REASON))] += 1
        return out

    return asyncio.run(_jetstream(nats_url, read))


def error_lines(platform: RunningPlatform) -> list[str]:
    """Every ERROR or CRITICAL record and every traceback in the services' logs, as "<log>:<line>: <logger>
    <message>" (the message only: the services' logs name fields and ids, never values)."""
    found = []
    for name, path in sorted(platform.service_logs().items()):
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith("Traceback"):
                found.append(f"{name}.log:{number}: {line}")
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
                found.append(f"{name}.log:{number}: {record.get('logger')} {record.get('msg')}")
    return found


def mail_by_recipient(maildir: Path) -> tuple[dict[str, set[str]], collections.Counter]:
    """(user -> the action ids mailed to them, action id -> copies received) from the SMTP server's maildir."""
    recipients: dict[str, set[str]] = collections.defaultdict(set)
    copies: collections.Counter = collections.Counter()
    for folder in ("new", "cur"):
        for path in (maildir / folder).glob("*") if (maildir / folder).is_dir() else ():
            message = email.message_from_bytes(path.read_bytes())
            recipients[message["To"].split("@")[0]].add(message["X-CDP-Action-Id"])
            copies[message["X-CDP-Action-Id"]] += 1
    return recipients, copies
