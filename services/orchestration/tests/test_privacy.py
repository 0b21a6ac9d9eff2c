"""privacy.deleted: the person's instances end, their timers are cancelled, and their records, decisions,
approvals, held actions, inbox and sends are gone from the store, down to the bytes in its files; anyone
else is untouched."""

from __future__ import annotations

import asyncio

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import OutMessage, privacy_stream, subjects
from cdp_kit.storage import Put
from cdp_orchestration import streams
from cdp_orchestration.channels import Action, Channel, Content, Outcome
from cdp_orchestration.channels.inapp import COLLECTION, InboxChannel
from cdp_orchestration.dispatch import dispatcher
from cdp_orchestration.privacy import PrivacyHandler, consumer_spec
from cdp_orchestration.state import APPROVALS, ENROLLMENTS, FORGOTTEN, PERSONS, SENDS, STATS, prepare_store

GATED = {
    "id": "win-back",
    "version": 1,
    "name": "Win back",
    "priority": 50,
    "category": "offer",
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "nodes": [
        {
            "id": "remind",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {"subject": "{{ traits.first_name }}, your cart", "body": "{{ traits.email }}"},
            "next": "bonus",
        },
        {
            "id": "bonus",
            "type": "action",
            "channel": "inapp",
            "purpose": "Marketing",
            "approval": True,
            "template": {"title": "A bonus", "body": "for you"},
        },
    ],
}


async def _awaiting(world, person):
    approvals = await world.store.find(APPROVALS, "person_id", person)
    return approvals if approvals and approvals[0].doc["state"] == "pending" else None


async def test_a_deleted_person_leaves_nothing_readable_and_others_are_untouched(world_factory, tmp_path):
    world = await world_factory()
    await world.bus.ensure_streams(privacy_stream())
    await prepare_store(world.store)
    await world.publish_journey(GATED)
    await world.start()
    inbox = InboxChannel(world.store)
    for person in ("ada", "bob"):
        email = f"{person}-secret@example.com"
        await world.profile(person, consent={"purpose:Marketing": True}, first_name=person.title(), email=email)
        await world.event(person, "Cart Abandoned", f"e-cart-{person}", user_id=f"{person}-uid")
        await world.eventually(lambda p=person: _awaiting(world, p))
        # What the dispatchers keep: an inbox message and a send record.
        await inbox.add(Action(f"in-{person}", person, "inapp", Content(body=email, title="Hi")))
        await world.store.bulk_write([Put(SENDS, f"send-{person}", {"person_id": person, "event": {"e": email}})])
    [running] = [i for i in await world.instances("ada") if i["status"] == "running"]
    assert running["pending"]  # waiting for approval, with the arbiter holding its action and a wake timer
    wake, _at = (await world.store.get(PERSONS, "ada")).doc["wake"]

    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=world.engine, inbox=inbox)
    handled = asyncio.Event()

    async def handle(batch) -> None:
        await handler.handle(batch)
        handled.set()

    task = asyncio.create_task(world.bus.consumer(consumer_spec(), handle).run())
    try:
        request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="ada")
        [result] = await world.bus.publisher.publish_batch(
            [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "privacy:req-1")]
        )
        assert result.ok
        await asyncio.wait_for(handled.wait(), timeout=30)
        assert await world.store.get(FORGOTTEN, "req-1:ada") is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    store = world.store
    # The approval's expiry timer is cancelled (its schedule rolled away).
    timer = subjects.orchestration_timer(world.partition("ada"), wake)
    cancelled = await world.bus.js.get_last_msg(subjects.ORCHESTRATION_TIMERS, timer)
    assert (cancelled.headers or {}).get("Nats-Rollup") == "sub"
    assert await store.get(PERSONS, "ada") is None
    assert await world.instances("ada") == []
    assert await world.decisions("ada") == []
    assert await store.find(APPROVALS, "person_id", "ada") == []
    assert await store.find(SENDS, "person_id", "ada") == []
    assert [r async for r in store.scan_all(COLLECTION, prefix="ada/")] == []
    # The ended instance is counted, so the journey's active count stays true.
    stats = [r.doc async for r in store.scan_all(STATS)]
    assert sum(s["ended"].get("deleted", 0) for s in stats) == 1
    # Bob is untouched.
    assert (await store.get(PERSONS, "bob")).doc["fields"]["traits.email"] == "bob-secret@example.com"
    assert len(await world.instances("bob")) == 1 and len(await world.decisions("bob")) >= 2
    assert await store.find(APPROVALS, "person_id", "bob") and await store.find(SENDS, "person_id", "bob")
    assert [r async for r in store.scan_all(COLLECTION, prefix="bob/")]
    # Nothing of Ada is left in the store's files (deleted pages zeroed, the write-ahead log truncated).
    files = b"".join(path.read_bytes() for path in tmp_path.glob("orchestration-0.db*"))
    assert b"bob-secret@example.com" in files
    assert b"ada-secret@example.com" not in files and b"ada-uid" not in files


REACH = {
    "id": "reach",
    "version": 1,
    "name": "Reach",
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
            "next": "text",
        },
        {
            "id": "text",
            "type": "action",
            "channel": "sms",
            "purpose": "Marketing",
            "template": {"body": "We call {{ traits.phone }}"},
        },
    ],
}


class Mailbox(Channel):
    name = "email"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, action) -> Outcome:
        self.sent.append(action.person_id)
        return Outcome.accepted(provider_id=f"m-{action.action_id}")


def _actions_files(nats_dir) -> bytes:
    """Every byte of the ACTIONS stream's files in the nats-server's JetStream file store."""
    [stream] = [p for p in nats_dir.rglob("ACTIONS") if p.is_dir() and p.parent.name == "streams"]
    return b"".join(p.read_bytes() for p in stream.rglob("*") if p.is_file())


async def test_the_actions_stream_keeps_no_content_of_a_deleted_person(world_factory, tmp_path):
    world = await world_factory()
    await world.bus.ensure_streams(privacy_stream())
    await prepare_store(world.store)
    await world.publish_journey(REACH)
    engine = await world.start()
    mailbox = Mailbox()
    # The email dispatcher runs; no SMS provider is configured, so SMS actions wait in ACTIONS.
    runner = asyncio.create_task(dispatcher(world.bus, world.store, mailbox).run())
    try:
        for person, phone in (("ada", "+15550001111"), ("bob", "+15550002222")):
            consent = {"purpose:Marketing": True}
            await world.profile(person, consent=consent, email=f"{person}-secret@example.com", phone=phone)
            await world.event(person, "Cart Abandoned", f"e-cart-{person}", user_id=f"{person}-uid")
        await world.eventually(lambda: sorted(mailbox.sent) == ["ada", "bob"])
        await world.eventually(lambda: _in_actions(world, "sms", 2))
        # A sent email's message goes once its outcome is recorded: no address or body stays behind.
        await world.eventually(lambda: _in_actions(world, "email", 0))
        [ada_sms] = [a for a in await world.actions() if a.person_id == "ada"]

        handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
        assert await handler.apply(privacy_pb2.PrivacyDeleted(request_id="req-2", person_id="ada"))
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    # Ada's SMS, never sent, is withdrawn: gone from the stream, and no dispatcher will send it.
    assert [a.person_id for a in await world.actions()] == ["bob"]
    assert (await world.store.get(SENDS, ada_sms.action_id)).doc["status"] == "withdrawn"
    files = _actions_files(tmp_path / "nats")
    assert b"+15550002222" in files  # bob's SMS waits for its provider
    for secret in (b"ada-secret@example.com", b"+15550001111", b"bob-secret@example.com"):
        assert secret not in files, secret


async def _in_actions(world, channel: str, count: int) -> bool:
    """Whether ACTIONS holds `count` messages of the channel."""
    return sum(1 for a in await world.actions() if a.channel == channel) == count


async def test_what_reaches_a_forgotten_person_afterwards_never_fills_their_record_again(world_factory, tmp_path):
    world = await world_factory()
    await world.bus.ensure_streams(privacy_stream())
    await prepare_store(world.store)
    await world.publish_journey(GATED)
    engine = await world.start()
    # A witness on Ada's partition: once its later inputs from each stream are applied, so are Ada's.
    witness = next(p for p in (f"wit-{n}" for n in range(100)) if world.partition(p) == world.partition("ada"))
    consent = {"purpose:Marketing": True}
    await world.profile("ada", consent=consent, first_name="Ada", email="ada-secret@example.com")
    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
    assert await handler.apply(privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="ada"))

    async def late(n: int) -> None:
        """What was published before the deletion and sourced after it: a profile change, an event, a
        segment entry; then the witness's, to know they were applied."""
        await world.profile("ada", consent=consent, email=f"ada-late-{n}@example.com", wait=False)
        await world.event("ada", "Cart Abandoned", f"e-late-{n}", user_id=f"ada-uid-{n}")
        await world.segment("ada", "vip", wait=False)
        await world.profile(witness, first_name=f"Wit{n}")
        await world.segment(witness, f"seen-{n}")
        await world.event(witness, "Page Viewed", f"e-wit-{n}", user_id=f"wit-uid-{n}")

        async def witness_event_applied() -> bool:
            stored = await world.store.get(PERSONS, witness)
            return (stored.doc.get("ids") or {}).get("user_id") == f"wit-uid-{n}"  # absent until one is known

        await world.eventually(witness_event_applied)

    await late(1)
    assert await world.store.get(PERSONS, "ada") is None
    assert await world.instances("ada") == [] and await world.decisions("ada") == []
    # An Enroll for the forgotten person is answered, not left waiting: not entered, "deleted".
    body = {"person_id": "ada", "journey_id": "win-back", "idempotency_key": "k1", "properties": {}}
    [sent] = await world.bus.publisher.publish_batch(
        [streams.command(world.partition("ada"), "enroll", body, "enroll:win-back:k1")]
    )
    assert sent.ok
    answer = await world.eventually(lambda: world.store.get(ENROLLMENTS, "win-back:k1"))
    assert (answer.doc["entered"], answer.doc["reason"]) == (False, "deleted")
    # Also when the engine reads the person from the store again (another replica, a restart).
    await world.stop()
    await world.start()
    await late(2)
    assert await world.store.get(PERSONS, "ada") is None
    assert await world.instances("ada") == [] and await world.decisions("ada") == []
    files = b"".join(path.read_bytes() for path in tmp_path.glob("orchestration-0.db*"))
    assert b"Wit2" in files  # the scan sees what is there
    for value in (b"ada-secret@example.com", b"ada-late-1@example.com", b"ada-late-2@example.com", b"ada-uid-"):
        assert value not in files, value


LATER_ON_CALL = {
    "id": "note",
    "version": 1,
    "name": "Note",
    "priority": 10,
    "category": "offer",
    "timezone": "UTC",
    "entry": {"api": True},
    "reentry": "always",
    "max_concurrent": 5,
    "nodes": [{"id": "later", "type": "delay", "duration": "30d"}],
}


async def test_a_deleted_persons_enroll_answers_go_with_them(world_factory, tmp_path):
    """An Enroll answer is kept under the caller's idempotency key, which may carry personal data (an email
    address here): it names its person now, and the deletion deletes the person's answers. The answer an
    Enroll for them gets afterwards ("deleted") names no one."""
    world = await world_factory()
    await world.bus.ensure_streams(privacy_stream())
    await prepare_store(world.store)
    await world.publish_journey(LATER_ON_CALL)
    engine = await world.start()

    async def enroll(person: str, key: str):
        body = {"person_id": person, "journey_id": "note", "idempotency_key": key, "properties": {}}
        [sent] = await world.bus.publisher.publish_batch(
            [streams.command(world.partition(person), "enroll", body, f"enroll:note:{key}")]
        )
        assert sent.ok
        return (await world.eventually(lambda: world.store.get(ENROLLMENTS, f"note:{key}"))).doc

    for person in ("ada", "bob"):
        await world.profile(person, first_name=person.title())
        answer = await enroll(person, f"{person}-secret@example.com")
        assert answer["entered"] and answer["person_id"] == person

    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=engine)
    assert await handler.apply(privacy_pb2.PrivacyDeleted(request_id="req-1", person_id="ada"))
    assert await world.store.get(ENROLLMENTS, "note:ada-secret@example.com") is None
    assert (await world.store.get(ENROLLMENTS, "note:bob-secret@example.com")).doc["person_id"] == "bob"
    after = await enroll("ada", "k-after")
    assert (after["entered"], after["reason"]) == (False, "deleted") and "person_id" not in after
    files = b"".join(path.read_bytes() for path in tmp_path.glob("orchestration-0.db*"))
    assert b"bob-secret@example.com" in files
    assert b"ada-secret@example.com" not in files
