"""privacy.deleted: the person's instances end, their timers are cancelled, and their records, decisions,
approvals, held actions, inbox and sends are gone from the store, down to the bytes in its files; anyone
else is untouched."""

from __future__ import annotations

import asyncio

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import OutMessage, privacy_stream, subjects
from cdp_kit.storage import Put
from cdp_orchestration.channels import Action, Content
from cdp_orchestration.channels.inapp import COLLECTION, InboxChannel
from cdp_orchestration.privacy import PrivacyHandler, consumer_spec
from cdp_orchestration.state import APPROVALS, FORGOTTEN, PERSONS, SENDS, STATS, prepare_store

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
