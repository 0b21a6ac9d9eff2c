"""Logs name fields and ids, never the values people sent: collector → identity → profile, every log record
of every in-process service captured at DEBUG, rendered as the services render them in production
(`cdp_kit.logging.JsonFormatter`: message, extra fields and exception text).

The flow touches every path that handles identifier values: identify with email and phone, a track, two
devices linked by an alias and an identify (a merge), a poison event (at the edge, and published behind
it onto events.raw so the consumers' failure and dead-letter paths run), and a privacy deletion through
ProfileService.Delete. No identifier or trait value sent may appear in any log line.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, OutMessage, partition_for
from cdp_kit.logging import JsonFormatter

from .conftest import PARTITIONS, Chain, running_chain

USER = "u-pii-5f1e9c"
ANON_PHONE = "anon-pii-phone-77d2"
ANON_LAPTOP = "anon-pii-laptop-3b8a"
DEVICE = "dev-pii-c41f"
EMAIL = "ada.secretname@example.org"
WORK_EMAIL = "ada.worksecret@example.net"
PHONE = "+44 7700 900123"
NAME = "Ada Secretname"
CITY = "Secretville-on-Sea"
SKU = "sku-pii-a9e3"
POISON_USER = "u-pii-poison-e71b"
POISON_EMAIL = "poison.secret@example.org"

# What must not be in a log line, each as it was sent and as services may hold it (normalised, lower-case).
SECRETS = {
    "user id": (USER, POISON_USER),
    "anonymous id": (ANON_PHONE, ANON_LAPTOP),
    "device id": (DEVICE,),
    "email": (EMAIL, WORK_EMAIL, "poison.secret"),  # the poison's, whatever it became
    "phone": (PHONE, "7700 900123", "7700900123"),
    "trait value": (NAME, "secretname", CITY),
    "property value": (SKU,),
}


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[tuple[logging.LogRecord, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception as exc:  # a record that cannot be rendered is still checked, by its parts
            line = f"{record.name} {record.msg!r} {record.args!r} (unrenderable: {exc!r})"
        self.lines.append((record, line))


@pytest.fixture
def captured_logs():
    """Every log record of the test process at DEBUG, from before the services start until they stop."""
    handler = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
async def logged_chain(captured_logs, nats_server, tmp_path):
    async with running_chain(nats_server.url, tmp_path) as chain:
        yield chain


async def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return False


async def run_the_flow(chain: Chain) -> list[str]:
    """Drive the flow; what did not happen as it should (the log check runs whatever this finds)."""
    problems: list[str] = []
    await chain.post(
        {
            "type": "identify",
            "messageId": "pii-1",
            "userId": USER,
            "anonymousId": ANON_PHONE,
            "traits": {"email": EMAIL, "phone": PHONE, "name": NAME, "city": CITY},
            "context": {"device": {"id": DEVICE}},
        },
        {"type": "track", "event": "Viewed", "messageId": "pii-2", "userId": USER, "properties": {"sku": SKU}},
        {"type": "identify", "messageId": "pii-3", "anonymousId": ANON_LAPTOP, "traits": {"email": WORK_EMAIL}},
    )
    found = await chain.profiles_when([USER], lambda p: p.event_count >= 2, timeout=15.0)
    if not found:
        return ["the first events never reached the profile"]
    person = found[USER].person_id

    async def on_laptop() -> bool:
        return await chain.profile_of("anonymous_id", ANON_LAPTOP) is not None

    await wait_until(on_laptop, 10.0)
    # The two devices become one person: an alias, then a sign-in on the laptop.
    await chain.post({"type": "alias", "messageId": "pii-4", "userId": USER, "previousId": ANON_LAPTOP})
    await chain.post({"type": "identify", "messageId": "pii-5", "userId": USER, "anonymousId": ANON_LAPTOP})

    async def merged() -> bool:
        profile = await chain.profile_of("anonymous_id", ANON_LAPTOP)
        return profile is not None and profile.person_id == person and profile.event_count >= 5

    if not await wait_until(merged, 15.0):
        problems.append("the devices were never merged onto one profile")

    # Forget the person: the profile's Delete, announced on privacy.deleted, purged by identity.
    await chain.profile.Delete(
        profile_pb2.DeleteRequest(
            person_id=person, mode=profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE, request_id="pii-delete"
        )
    )

    async def purged() -> bool:
        try:
            await chain.identity.Lookup(
                identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="user_id", value=USER))
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    if not await wait_until(purged, 15.0):
        problems.append("identity never purged the deleted person")
    # Their next event is suppressed at the edge (and logged as a count).
    if not await wait_until(lambda: suppressed(chain), 5.0):
        problems.append("the deleted person's next event was not suppressed")

    # A poison event: refused at the edge, or dead-lettered further in. Either way, said without its values.
    await chain.post(
        {
            "type": "identify",
            "messageId": "pii-6",
            "userId": POISON_USER + "\u0000",
            "traits": {"email": POISON_EMAIL.replace("@", "\u0000@"), "name": NAME},
        }
    )
    # The same poison behind the edge, as a producer that skipped the collector's checks would leave it on
    # events.raw (the collector's envelope): it has to fail somewhere, and say so without its values.
    poison = events_pb2.Event(
        message_id="pii-8", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id=POISON_USER + "\x00", source_id="web"
    )
    poison.traits.update({"email": POISON_EMAIL.replace("@", "\x00@"), "name": NAME})
    poison.received_at.GetCurrentTime()
    async with Bus.connect(chain.nats_url, name="test-producer") as bus:
        (result,) = await bus.publisher.publish_batch(
            [
                OutMessage(
                    subject=f"events.raw.{partition_for(poison.user_id, PARTITIONS)}",
                    payload=poison.SerializeToString(),
                    msg_id="web:pii-8",
                )
            ]
        )
        assert result.ok, result.error
    # Until every event has been handled for good (a poison that went in: retried, then dead-lettered).
    outstanding = await chain.settled(timeout=30.0)
    if outstanding:
        problems.append(f"the pipeline had not settled: {outstanding}")
    return problems


async def suppressed(chain: Chain) -> bool:
    _status, answer = await chain.post({"type": "track", "event": "Viewed", "messageId": "pii-7", "userId": USER})
    return answer.get("suppressed") == 1


async def test_no_identifier_or_trait_value_reaches_a_log_line(logged_chain, captured_logs):
    problems = await run_the_flow(logged_chain)
    offences = []
    for record, line in captured_logs.lines:
        lowered = line.lower()
        for what, values in SECRETS.items():
            hit = next((v for v in values if v.lower() in lowered), None)
            if hit is not None:
                where = f"{record.name} {record.levelname} ({record.pathname.rsplit('/', 1)[-1]}:{record.lineno})"
                offences.append(f"{where}: {what} {hit!r} in: {line[:400]}")
                break
    assert captured_logs.lines, "no log record was captured at all: the capture is broken"
    if offences:
        problems.append(
            f"{len(offences)} log lines carry values people sent:\n  " + "\n  ".join(dict.fromkeys(offences))
        )
    assert not problems, "\n".join(problems)
