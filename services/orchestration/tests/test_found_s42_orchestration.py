"""Defects found in session 42 (orchestration), each a test that failed before its fix."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiosmtpd.smtp import AuthResult

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Bus, OutMessage, dead_letter_stream, partition_for, subjects
from cdp_kit.settings import load_settings
from cdp_kit.storage import open_store
from cdp_kit.timestamps import from_seconds
from cdp_orchestration import streams
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.email import EmailChannel
from cdp_orchestration.channels.settings import SmtpSettings, TwilioSettings
from cdp_orchestration.channels.sms import SmsChannel
from cdp_orchestration.dispatch import MAX_ATTEMPTS, PENDING, SENDS, dispatcher
from cdp_orchestration.domain import clock
from cdp_orchestration.domain.arbiter import Kind, PersonState, ProposedAction, decide
from cdp_orchestration.domain.entry import next_scheduled_entry
from cdp_orchestration.domain.journey import ScheduleEntry
from cdp_orchestration.domain.rules import parse_rules
from cdp_orchestration.domain.view import PersonView
from cdp_orchestration.state import PERSONS
from cdp_testing.channels.smtp import LocalSmtpServer
from cdp_testing.channels.twilio import LocalTwilio
from cdp_testing.waiting import eventually

from .channels.test_email import _self_signed
from .conftest import journey_document
from .test_dispatch import Receiver, _dispatch_until_recorded

BERLIN = ZoneInfo("Europe/Berlin")
# 25 October 2026: Berlin's clocks go back from 03:00 CEST to 02:00 CET, so 02:00-02:59 happens twice.
SECOND_0210 = datetime(2026, 10, 25, 1, 10, tzinfo=UTC).timestamp()  # 02:10 CET, the second pass
SECOND_0230 = datetime(2026, 10, 25, 1, 30, tzinfo=UTC).timestamp()  # 02:30 CET


def test_the_next_time_of_day_in_the_hour_a_fall_back_repeats_is_the_same_nights_second_pass():
    """02:30 comes twice on a fall-back night: at 02:10 of the second pass the next 02:30 is twenty minutes
    away, not the next night's (a quiet-hours end or a `delay until` there waited a whole day more)."""
    assert clock.local(SECOND_0210, BERLIN).strftime("%H:%M %Z") == "02:10 CET"
    assert clock.next_time_of_day(SECOND_0210, 2, 30, BERLIN) == SECOND_0230
    assert clock.next_time_of_day(SECOND_0210, 2, 30, BERLIN, inclusive=True) == SECOND_0230
    # The first pass still comes first, and a time in a spring gap resolves to the gap's end, 03:00 CEST, as
    # the journey's cron slots do (it read 02:30 at the pre-change offset, 03:30, before: test_wall_clock_gaps).
    first_0210 = SECOND_0210 - 3600
    assert clock.next_time_of_day(first_0210, 2, 30, BERLIN) == SECOND_0230 - 3600
    spring = datetime(2026, 3, 29, 0, 0, tzinfo=UTC).timestamp()  # 01:00 CET, an hour before the gap
    assert clock.next_time_of_day(spring, 2, 30, BERLIN) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC).timestamp()
    assert clock.local(clock.next_time_of_day(spring, 2, 30, BERLIN), BERLIN).strftime("%H:%M") == "03:00"


def test_quiet_hours_ending_in_the_repeated_hour_defer_to_that_nights_end_not_the_next():
    rules = parse_rules({"quiet_hours": {"from": "22:00", "to": "02:30"}})
    view = PersonView("p1", {"traits.timezone": "Europe/Berlin", "traits.email": "ada@example.com",
                             "consent.purpose:Marketing": True})  # fmt: skip
    proposed = ProposedAction(
        "a1", "p1", "j", 1, "i1", "n", priority=10, proposed_at=SECOND_0210,
        channel="email", category="reminder", purpose="Marketing",
    )  # fmt: skip
    (decision,) = decide(PersonState("p1"), proposed, view, rules, SECOND_0210).decisions
    assert (decision.kind, decision.until) == (Kind.DEFERRED, SECOND_0230)


def _slots(cron: str, after: float, n: int) -> list[str]:
    journey = SimpleNamespace(entry=ScheduleEntry(cron, "members"), timezone="UTC")
    view = PersonView("p1", {"traits.timezone": "Europe/Berlin"})
    slots = []
    for _ in range(n):
        after = next_scheduled_entry(journey, view, after)
        slots.append(clock.local(after, BERLIN).strftime("%d %H:%M %Z"))
    return slots


def test_a_daily_schedule_in_the_hour_a_fall_back_repeats_enters_once_that_night():
    """A cron at a fixed hour fires once a day in the person's zone, as cron does: 02:30 on the night the
    clocks go back came twice (02:30 CEST and 02:30 CET, two slots, two triggers: every member entered
    twice, two messages). A cron over every hour still fires in both passes: an hour went by."""
    before = datetime(2026, 10, 23, 12, tzinfo=UTC).timestamp()
    assert _slots("30 2 * * *", before, 3) == ["24 02:30 CEST", "25 02:30 CEST", "26 02:30 CET"]
    assert _slots("0 9 * * *", before, 3) == ["24 09:00 CEST", "25 09:00 CET", "26 09:00 CET"]
    late = datetime(2026, 10, 24, 23, 30, tzinfo=UTC).timestamp()  # 01:30 CEST
    assert _slots("0 * * * *", late, 3) == ["25 02:00 CEST", "25 02:00 CET", "25 03:00 CET"]
    # Spring: 02:30 does not exist on the 29th; the slot is the first instant after the gap, once.
    spring = datetime(2026, 3, 27, 12, tzinfo=UTC).timestamp()
    assert _slots("30 2 * * *", spring, 3) == ["28 02:30 CET", "29 03:00 CEST", "30 02:30 CEST"]


class _AuthBackendDown(LocalSmtpServer):
    """A relay whose authentication backend is briefly down: AUTH answers 454 4.7.0 (RFC 4954: a temporary
    server failure, to be tried again), the next `down` times: smtplib tries PLAIN, then LOGIN."""

    down = 2

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if self.down:
            self.down -= 1
            return AuthResult(success=False, handled=False, message="454 4.7.0 Temporary authentication failure")
        return super()._authenticate(server, session, envelope, mechanism, auth_data)


async def test_a_relays_temporary_authentication_failure_is_tried_again_not_final(tmp_path):
    """A 454 to AUTH failed each action for good (`smtp_auth_454`, not retryable: dead-lettered on its first
    attempt), so a relay's authentication backend down for a minute lost every email sent in it."""
    context, ca_file = _self_signed(tmp_path)
    async with _AuthBackendDown(host="localhost", credentials=("shop", "s3cret"), tls_context=context) as server:
        settings = load_settings(
            SmtpSettings,
            {
                "CDP_SMTP_HOST": server.host, "CDP_SMTP_PORT": str(server.port), "CDP_SMTP_SECURITY": "starttls",
                "CDP_SMTP_CA_FILE": str(ca_file), "CDP_SMTP_FROM": "Shop <hello@shop.example>", "CDP_SMTP_TIMEOUT": "5",
                "CDP_SMTP_USERNAME": "shop", "CDP_SMTP_PASSWORD": "s3cret",
            },
        )  # fmt: skip
        channel = EmailChannel(settings)
        action = Action(
            action_id="act-1", person_id="person-1", channel="email", address="ada@example.com",
            content=Content(subject="Your cart", body="Your cart misses you."),
        )  # fmt: skip
        first = await channel.send(action)
        assert (first.status, first.reason, first.retryable) == ("failed", "smtp_auth_454", True)
        assert (await channel.send(action)).status == "accepted"
        assert len(server.mailbox) == 1


class _AskingForMonths(Receiver):
    """A webhook receiver answering `status` with a Retry-After of about four months to everything."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.statuses: list[int] = []
        super().__init__()

    async def _receive(self, request: web.Request) -> web.Response:
        self.statuses.append(self.status)
        return web.Response(status=self.status, headers={"Retry-After": str(10**7)})


@pytest.mark.parametrize(("status", "attempts"), [(429, 0), (503, MAX_ATTEMPTS)])
async def test_a_retry_after_longer_than_the_wait_bound_ends_the_action_at_the_bound(
    nats_server, tmp_path, status, attempts
):
    """A provider's Retry-After handed the action back for as long as it said: four months, past the
    ACTIONS stream's retention (7 days), so the message expired before it came back - no outcome, no dead
    letter, its send record `pending` for ever (and every action to that destination held behind it). A
    wait now ends by CDP_ORCHESTRATION_DEFER_SECONDS after the action was published (below the retention):
    a 429 is then final (`http_429`), a 5xx goes on through its attempts on the usual back-off."""
    receiver = _AskingForMonths(status)
    record = await _dispatch_until_recorded(nats_server, tmp_path, receiver, defer_for=1.5, backoff=(0.1,))
    assert (record["status"], record["reason"]) == ("failed", f"http_{status}")
    assert record["attempts"] == attempts  # a 429 uses none; a 5xx all of them


async def test_a_deleted_segments_members_are_not_entered_into_its_on_exited_journeys(world_factory):
    """DeleteSegment publishes every member's exit (reason `deleted`), and `force` deletes a segment a live
    journey enters on: each member of the segment was entered into the journey `on: exited` of it - the
    "sorry to see you go" message to everyone still in it, who left nothing. A member's own exit still
    enters them; the deleted segment's membership is gone from the person either way."""
    world = await world_factory()
    await world.publish_journey(journey_document("goodbye", {"segment": "vip", "on": "exited"}))
    await world.start()
    for person in ("ada", "bo"):
        await world.segment(person, "vip")
    await world.segment("ada", "vip", entered=False)  # ada left the segment
    await world.eventually(lambda: _instances_of(world, "ada", "goodbye", 1))

    deleted = segmentation_pb2.SegmentEvent(id="seg-deleted-bo", person_id="bo", segment_id="vip", entered=False,
                                            reason="deleted")  # fmt: skip
    deleted.at.CopyFrom(from_seconds(world.now()))
    batch = segmentation_pb2.SegmentEventBatch(events=[deleted])
    await world._publish(subjects.segments_exited(world.partition("bo")), batch.SerializeToString())

    async def left() -> bool:
        stored = await world.store.get(PERSONS, "bo")
        return stored is not None and "vip" not in stored.doc["segments"]

    await world.eventually(left)
    assert await _instances_of(world, "bo", "goodbye", 0)


async def _instances_of(world, person: str, journey_id: str, count: int) -> bool:
    return len([i for i in await world.instances(person) if i["journey_id"] == journey_id]) == count


async def test_a_twilio_rate_limit_is_waited_out_without_using_the_texts_attempts(nats_server, tmp_path):
    """Twilio answers 429 (code 20429) when more messages arrive than the account's queue takes (a campaign
    to a large segment). Each 429 used one of the text's attempts, so after CDP_ORCHESTRATION_MAX_ATTEMPTS
    of them it was dead-lettered (`twilio_20429`), unsent - where the README promises that a provider asking
    for time uses no attempt (as a webhook's 429 did). Now FCM's and Web Push's 429s are hand-backs too."""
    sid, token = "AC" + "0123456789abcdef" * 2, "twilio-auth-token"
    async with (
        LocalTwilio(sid, token) as twilio,
        Bus.connect(nats_server.url, name="sms-429") as bus,
        open_store(f"sqlite:///{tmp_path}/d.db") as store,
    ):
        twilio.fail_next_429 = 6  # more than the attempts the action has
        settings = load_settings(
            TwilioSettings,
            {"CDP_TWILIO_ACCOUNT_SID": sid, "CDP_TWILIO_AUTH_TOKEN": token, "CDP_TWILIO_FROM": "+14155550100",
             "CDP_TWILIO_API_URL": twilio.base_url},
        )  # fmt: skip
        await streams.ensure_streams(bus.js)
        await bus.ensure_streams(dead_letter_stream())
        message = pb.ActionMessage(action_id="act-sms", person_id="person-1", channel="sms", content={"body": "Hi"})
        message.address.update({"phone": "+14155550199", "user_id": "u-1"})
        subject = subjects.actions("sms", partition_for("person-1", 4))
        [result] = await bus.publisher.publish_batch([OutMessage(subject, message.SerializeToString(), "act-sms")])
        assert result.ok
        channel = SmsChannel(settings)
        task = asyncio.create_task(dispatcher(bus, store, channel, max_attempts=2, backoff=(0.1,)).run())
        try:

            async def recorded() -> dict | None:
                stored = await store.get(SENDS, "act-sms")
                return stored.doc if stored is not None and stored.doc["status"] != PENDING else None

            record = await eventually(recorded, timeout=20)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close()
    assert (record["status"], record["attempts"], record["deferrals"]) == ("accepted", 1, 6)
    assert len(twilio.messages) == 1
