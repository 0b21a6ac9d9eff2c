"""Nothing is sent to a person whose deletion profile accepted (its notice stored in PRIVACY), though the
privacy handler learns of it later: after a bus outage its consumer may fetch two seconds after the
dispatchers do (the fetch loop's back-off), and it withdraws the person's actions only once their engine
forgot them. A dispatcher that sent in between sent a deleted person their journey's email."""

from __future__ import annotations

import asyncio

import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import OutMessage, privacy_stream, subjects
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Put
from cdp_kit.storage.memory import MemoryStore
from cdp_orchestration.channels import Channel, Outcome
from cdp_orchestration.dispatch import dispatcher
from cdp_orchestration.privacy import DELETED, Deletions, PrivacyHandler, TombstoneSweeper, consumer_spec
from cdp_orchestration.state import SENDS, prepare_store

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
            "template": {"subject": "Your cart", "body": "Write to {{ traits.email }}"},
        }
    ],
}


class Mailbox(Channel):
    name = "email"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, action) -> Outcome:
        self.sent.append(action.person_id)
        return Outcome.accepted(provider_id=f"m-{action.action_id}")


async def _platform(world_factory):
    world = await world_factory()
    await world.bus.ensure_streams(privacy_stream())
    await prepare_store(world.store)
    await world.publish_journey(MAIL)
    engine = await world.start()
    return world, engine


async def _queue_email(world, person: str, n: int) -> None:
    """The person enters the journey; their email waits in ACTIONS (no dispatcher runs yet)."""
    before = sum(1 for a in await world.actions() if a.person_id == person)
    await world.profile(person, consent={"purpose:Marketing": True}, email=f"{person}-secret@example.com")
    await world.event(person, "Cart Abandoned", f"e-cart-{person}-{n}", user_id=f"{person}-uid")

    async def queued() -> bool:
        return sum(1 for a in await world.actions() if a.person_id == person) > before

    await world.eventually(queued)


async def _accept_deletion(world, request_id: str, person: str) -> None:
    """What profile does when it answers a deletion OK: the notice is stored in PRIVACY."""
    notice = privacy_pb2.PrivacyDeleted(request_id=request_id, person_id=person)
    [stored] = await world.bus.publisher.publish_batch(
        [
            OutMessage(
                subject=subjects.PRIVACY_DELETED, payload=notice.SerializeToString(), msg_id=f"privacy:{request_id}"
            )
        ]
    )
    assert stored.ok


async def _dispatch_until_done(world, mailbox: Mailbox, *, sent: list[str]) -> None:
    runner = asyncio.create_task(dispatcher(world.bus, world.store, mailbox).run())
    try:

        async def settled() -> bool:  # every email message worked through (erased once recorded)
            return sorted(mailbox.sent) == sent and not [a for a in await world.actions() if a.channel == "email"]

        await world.eventually(settled)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_deletion_accepted_before_the_handler_fetched_it_stops_the_persons_queued_email(world_factory):
    world, engine = await _platform(world_factory)
    await _queue_email(world, "ada", 1)
    await _queue_email(world, "bob", 1)
    [ada_email] = [a for a in await world.actions() if a.person_id == "ada"]
    # The handler's consumer exists and has not fetched yet (its back-off after the outage).
    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
    await world.bus.consumer(consumer_spec(), handler.handle).provision()
    await _accept_deletion(world, "req-1", "ada")

    mailbox = Mailbox()
    await _dispatch_until_done(world, mailbox, sent=["bob"])

    assert "ada" not in mailbox.sent
    assert (await world.store.get(SENDS, ada_email.action_id)).doc["status"] == "withdrawn"


async def test_a_deletion_accepted_while_a_slow_batch_is_worked_stops_a_later_send_of_it(world_factory):
    """The batch's look at the unhandled notices is taken again once it is LOOK_EVERY old: a provider
    taking its time on one send does not let the next go out on a look from before the deletion."""
    world, engine = await _platform(world_factory)
    await _queue_email(world, "bob", 1)
    await _queue_email(world, "ada", 1)
    [ada_email] = [a for a in await world.actions() if a.person_id == "ada"]
    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
    await world.bus.consumer(consumer_spec(), handler.handle).provision()

    class SlowMailbox(Mailbox):
        async def send(self, action) -> Outcome:
            if action.person_id == "bob":  # Ada's deletion is accepted while Bob's provider answers
                await _accept_deletion(world, "req-5", "ada")
                await asyncio.sleep(0.5)
            return await super().send(action)

    mailbox = SlowMailbox()
    runner = asyncio.create_task(dispatcher(world.bus, world.store, mailbox, concurrency=1).run())
    try:

        async def settled() -> bool:
            return not [a for a in await world.actions() if a.channel == "email"]

        await world.eventually(settled)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    assert mailbox.sent == ["bob"]
    assert (await world.store.get(SENDS, ada_email.action_id)).doc["status"] == "withdrawn"


async def test_an_action_for_a_person_already_forgotten_is_not_sent(world_factory):
    """The handler applied the deletion, then an action for the person reached ACTIONS: another replica's
    engine publishing its outbox late, or a dead letter replayed."""
    world, engine = await _platform(world_factory)
    await _queue_email(world, "ada", 1)
    [ada_email] = [a for a in await world.actions() if a.person_id == "ada"]
    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
    assert await handler.apply(privacy_pb2.PrivacyDeleted(request_id="req-2", person_id="ada"))
    assert [a for a in await world.actions() if a.person_id == "ada"] == []  # withdrawn by the handler
    late = type(ada_email).FromString(ada_email.SerializeToString())
    late.action_id = f"{ada_email.action_id}-late"
    [stored] = await world.bus.publisher.publish_batch(
        [
            OutMessage(
                subject=subjects.actions("email", world.partition("ada")),
                payload=late.SerializeToString(),
                msg_id=late.action_id,
            )
        ]
    )
    assert stored.ok
    await _queue_email(world, "bob", 1)

    mailbox = Mailbox()
    await _dispatch_until_done(world, mailbox, sent=["bob"])

    assert (await world.store.get(SENDS, late.action_id)).doc["status"] == "withdrawn"


async def test_whom_deletions_were_accepted_for_cannot_be_known_without_the_handlers_consumer(world_factory):
    """A first start: the dispatchers run before the handler's consumer is created. With notices stored,
    nobody can tell which the handler took: nothing is sent (the batch is handed back) until it exists."""
    world, engine = await _platform(world_factory)
    deletions = Deletions(world.store, world.bus.js)
    assert await deletions.unhandled() == frozenset()  # no notice: nothing to know
    await _accept_deletion(world, "req-3", "ada")
    with pytest.raises(Unavailable):
        await deletions.unhandled()
    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
    consumer = world.bus.consumer(consumer_spec(), handler.handle)
    await consumer.provision()
    assert await deletions.unhandled() == {"ada"}
    await _accept_deletion(world, "req-4", "bob")
    assert await deletions.unhandled() == {"ada", "bob"}
    # Once the handler has acknowledged them, the markers answer for them.
    running = asyncio.create_task(consumer.run())
    try:

        async def handled() -> bool:
            return await deletions.unhandled() == frozenset()

        await world.eventually(handled, timeout=30)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert await deletions.marked("ada") and await deletions.marked("bob")
    assert not await deletions.marked("cy")


async def test_the_markers_age_out_with_the_tombstones():
    now, day = 1_900_000_000.0, 86_400.0
    store = MemoryStore()
    await store.bulk_write(
        [
            Put(DELETED, "deleted-long-ago", {"at": now - 36 * day, "request_id": "r1"}),
            Put(DELETED, "deleted-today", {"at": now - 60, "request_id": "r2"}),
        ]
    )
    assert await TombstoneSweeper(store, days=35, clock=lambda: now).sweep() == 1
    assert {record.key async for record in store.scan_all(DELETED)} == {"deleted-today"}


async def test_a_send_the_provider_had_when_the_deletion_was_accepted_reports_nothing_and_keeps_nothing(
    world_factory,
):
    """A privacy trial's relay took the email, hung, and answered 7 s after the deletion was confirmed: the
    dispatcher then recorded the send under the person and posted its "Message Sent" event under their user
    id, and identity made a new person of the deleted one. What went out cannot be recalled; nothing of it
    may be kept or posted."""
    world, engine = await _platform(world_factory)
    await _queue_email(world, "ada", 1)
    [ada_email] = [a for a in await world.actions() if a.person_id == "ada"]
    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
    await world.bus.consumer(consumer_spec(), handler.handle).provision()
    posted: list[dict] = []

    async def report(events) -> bool:
        posted.extend(events)
        return True

    class HangingRelay(Mailbox):
        async def send(self, action) -> Outcome:
            outcome = await super().send(action)  # the relay has the message ...
            await _accept_deletion(world, "req-9", action.person_id)  # ... when the deletion is accepted
            await asyncio.sleep(0.2)
            return outcome

    mailbox = HangingRelay()
    runner = asyncio.create_task(dispatcher(world.bus, world.store, mailbox, report=report).run())
    try:

        async def settled() -> bool:
            return not [a for a in await world.actions() if a.channel == "email"]

        await world.eventually(settled)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    assert mailbox.sent == ["ada"] and posted == []
    record = (await world.store.get(SENDS, ada_email.action_id)).doc
    assert record["status"] == "accepted" and record["reported"] == "person_deleted"
    assert "ada" not in str(record) and "event" not in record
