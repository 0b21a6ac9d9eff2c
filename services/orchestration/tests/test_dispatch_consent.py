"""A person who withdraws their consent after the arbiter let an email through gets no email: not while it
waits in ACTIONS, not on its next attempt after a failed one. The dispatcher asks their consent again right
before each attempt, as the arbiter asked it, and ends the action unsent with a recorded outcome. A real
nats-server, orchestration's engine (the profile's changes published as profile publishes them) and a
local SMTP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cdp_kit.bus import dead_letter_stream, subjects
from cdp_kit.settings import load_settings
from cdp_orchestration.channels.email import EmailChannel
from cdp_orchestration.channels.settings import SmtpSettings
from cdp_orchestration.consent import SendConsent
from cdp_orchestration.dispatch import PENDING, SENDS, dispatcher
from cdp_orchestration.state import PERSONS, prepare_store
from cdp_testing.channels.smtp import LocalSmtpServer

MAIL = {
    "id": "mail",
    "version": 1,
    "name": "Mail",
    "priority": 50,
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "nodes": [
        {
            "id": "mail",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {"subject": "Your cart", "body": "Your cart misses you"},
        }
    ],
}
DURABLE = "orchestration-dispatch-email"


def email(server: LocalSmtpServer) -> EmailChannel:
    environ = {
        "CDP_SMTP_HOST": server.host,
        "CDP_SMTP_PORT": str(server.port),
        "CDP_SMTP_SECURITY": "none",
        "CDP_SMTP_FROM": "Shop <hello@shop.example>",
        "CDP_SMTP_TIMEOUT": "5",
    }
    return EmailChannel(load_settings(SmtpSettings, environ))


async def _platform(world_factory):
    world = await world_factory()
    await prepare_store(world.store)
    await world.bus.ensure_streams(dead_letter_stream())
    await world.publish_journey(MAIL)
    await world.start()
    return world


async def _queue_email(world, person: str) -> str:
    """The person (consenting to Marketing) enters the journey; their email waits in ACTIONS. Its id."""
    await world.profile(person, consent={"purpose:Marketing": True}, email=f"{person}@example.com")
    await world.event(person, "Cart Abandoned", f"e-cart-{person}", user_id=f"{person}-uid")

    async def queued() -> bool:
        return any(a.person_id == person for a in await world.actions())

    await world.eventually(queued)
    [action] = [a for a in await world.actions() if a.person_id == person]
    return action.action_id


async def _set_consent(world, person: str, key: str, value: bool) -> None:
    """The profile's change of the person's consent, applied by orchestration's engine."""
    await world.profile(person, consent={key: value})

    async def applied() -> bool:
        stored = await world.store.get(PERSONS, person)
        return stored is not None and stored.doc["fields"].get(f"consent.{key}") is value

    await world.eventually(applied)


@asynccontextmanager
async def dispatching(world, server: LocalSmtpServer, **options) -> AsyncIterator[None]:
    consent = SendConsent(world.store, world.journeys, world.rules)
    runner = dispatcher(world.bus, world.store, email(server), consent=consent, **options)
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _all_worked(world) -> None:
    async def settled() -> bool:  # every email message worked through (erased once recorded)
        return not [a for a in await world.actions() if a.channel == "email"]

    await world.eventually(settled)


async def _dead_letters(world) -> int:
    subject = subjects.dead_letter(subjects.ACTIONS, DURABLE)
    try:
        info = await world.bus.js.stream_info(subjects.DLQ, subjects_filter=subject)
    except Exception:
        return 0
    return (info.state.subjects or {}).get(subject, 0)


async def test_a_consent_withdrawn_after_the_arbiter_let_the_email_through_stops_it(world_factory):
    world = await _platform(world_factory)
    ada = await _queue_email(world, "ada")
    bob = await _queue_email(world, "bob")
    await _set_consent(world, "ada", "purpose:Marketing", False)  # while her email waits to be sent

    async with LocalSmtpServer() as server, dispatching(world, server):
        await _all_worked(world)

    assert [mail.rcpt_tos for mail in server.mailbox] == [["bob@example.com"]]
    record = (await world.store.get(SENDS, ada)).doc
    assert (record["status"], record["reason"], record["by"]) == ("withdrawn", "consent_withdrawn", "purpose:Marketing")
    assert record["dead_lettered"] is False and "event" not in record
    assert (await world.store.get(SENDS, bob)).doc["status"] == "accepted"
    assert await _dead_letters(world) == 0


async def test_a_channel_refused_between_two_attempts_stops_the_next_attempt(world_factory):
    world = await _platform(world_factory)
    ada = await _queue_email(world, "ada")

    async with LocalSmtpServer() as server:
        server.fail_next_data = 1  # the first attempt fails for now (451): the action is tried again later
        async with dispatching(world, server, backoff=(1.0,)):

            async def first_failed() -> bool:
                stored = await world.store.get(SENDS, ada)
                return stored is not None and stored.doc["status"] == PENDING and stored.doc["attempts"] == 1

            await world.eventually(first_failed)
        # Between the attempts the person refuses email altogether.
        await _set_consent(world, "ada", "channel:email", False)
        async with dispatching(world, server, backoff=(1.0,)):
            await _all_worked(world)

    assert server.mailbox == []
    record = (await world.store.get(SENDS, ada)).doc
    assert (record["status"], record["reason"], record["by"]) == ("withdrawn", "consent_withdrawn", "channel:email")
    assert record["attempts"] == 1  # the one made; none after the refusal
    assert await _dead_letters(world) == 0


async def test_a_consent_still_given_sends_as_before(world_factory):
    """The check changes nothing for a person whose consent for this email's purpose and channel stands."""
    world = await _platform(world_factory)
    ada = await _queue_email(world, "ada")
    await _set_consent(world, "ada", "purpose:Analytics", False)  # another purpose: not this email's

    async with LocalSmtpServer() as server, dispatching(world, server):
        await _all_worked(world)

    assert [mail.rcpt_tos for mail in server.mailbox] == [["ada@example.com"]]
    assert (await world.store.get(SENDS, ada)).doc["status"] == "accepted"


CART = {
    "id": "abandoned-cart",
    "version": 1,
    "name": "Abandoned cart",
    "priority": 50,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "nodes": [
        {"id": "wait", "type": "delay", "duration": "1s", "next": "remind"},
        {
            "id": "remind",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {"subject": "Your cart", "body": "Your cart misses you"},
        },
    ],
}
VIP = {
    "id": "vip-care",
    "version": 1,
    "name": "VIP care",
    "priority": 60,
    "category": "transactional",
    "timezone": "UTC",
    "entry": {"segment": "vips", "on": "entered"},
    "reentry": "always",
    "nodes": [
        {
            "id": "mail",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {"subject": "Welcome VIP", "body": "Hello"},
        }
    ],
}


async def test_a_vip_whose_consent_stands_gets_the_cart_reminder(world_factory):
    """Two journeys emailing the same people (the README's abandoned cart on an event, a transactional one on
    entering a segment): the consent granted on the identify (Segment's context.consent.categoryPreferences,
    carried by the profile's change for it) stands, and the dispatcher's second look agrees with the arbiter.
    Each person's record is first written by their identify event, before the profile's change brings the
    consent: the dispatcher reads the record as rewritten since (a store that kept only the first write of a
    key made this a `consent_withdrawn` for every such person)."""
    world = await world_factory()
    await prepare_store(world.store)
    await world.bus.ensure_streams(dead_letter_stream())
    await world.publish_journey(CART)
    await world.publish_journey(VIP)
    await world.start()
    for person in ("carla", "bruno"):
        await world.event(person, "Identified", f"e-id-{person}", user_id=person, profiled=False)

        # The identify reaches orchestration first (their record is written, without consent) and the
        # profile's change for it next. Their identifiers are known before anything is sent to them (an
        # exempt send made before a person's first identifier is attributed on `actions..<p>`, which no
        # stream takes: not this test's subject).
        async def identified(person: str = person) -> bool:
            stored = await world.store.get(PERSONS, person)
            return stored is not None and stored.doc.get("ids") == {"user_id": person}

        await world.eventually(identified)
        await world.profile_applied(
            person, [f"e-id-{person}"], consent={"purpose:Marketing": True}, email=f"{person}@example.com"
        )
    await world.segment("carla", "vips", wait=False)
    for person in ("carla", "bruno"):
        await world.event(person, "Cart Abandoned", f"e-cart-{person}", user_id=person)

    async def reminded() -> list[str]:
        return [a.action_id for a in await world.actions() if a.journey_id == "abandoned-cart"]

    async def both() -> bool:
        return len(await reminded()) == 2

    await world.eventually(both)
    reminders = await reminded()
    for person in ("carla", "bruno"):
        fields = (await world.store.get(PERSONS, person)).doc["fields"]
        assert fields["consent.purpose:Marketing"] is True
    async with LocalSmtpServer() as server, dispatching(world, server):
        await _all_worked(world)

    assert sorted(mail.rcpt_tos[0] for mail in server.mailbox) == [
        "bruno@example.com",
        "carla@example.com",
        "carla@example.com",
    ]
    for action_id in reminders:
        assert (await world.store.get(SENDS, action_id)).doc["status"] == "accepted"
