"""Why a person did not get a journey's messages when no action was ever proposed: the journey's trigger
reached them but its entry rules kept them out. Before, `ListDecisions` (`cdpctl decisions`) listed nothing
and the operator read "no journey has tried to reach them". Each such refusal is now a NOT_ENTERED decision
naming the journey, the rule and when: re-entry (never, cooldown), max_concurrent, the entry's `if`, a
paused journey. One is kept per journey per person (the latest), so a busy trigger cannot fill the store.
On a real nats-server."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import DECISIONS

from .conftest import journey_document


def journey(journey_id: str, entry: dict, **rules) -> dict:
    return journey_document(journey_id, entry, **rules)


async def listed(world, person: str, **filters) -> list[pb.Decision]:
    api = OrchestrationApi(journeys=Journeys(world.store), store=world.store, bus=None, partitions=2)
    return list((await api.ListDecisions(pb.ListDecisionsRequest(person_id=person, **filters), None)).decisions)


async def refusal(world, person: str, journey_id: str) -> pb.Decision | None:
    found = [
        d for d in await listed(world, person) if d.journey_id == journey_id and d.kind == pb.DECISION_KIND_NOT_ENTERED
    ]
    return found[0] if found else None


async def started(world, person: str, journey_id: str, count: int) -> bool:
    return len([i for i in await world.instances(person) if i["journey_id"] == journey_id]) == count


async def test_a_cooldown_and_a_never_reentry_name_the_rule_and_the_last_entry(world_factory):
    world = await world_factory()
    await world.publish_journey(journey("winback", {"event": "Visited"}, reentry={"cooldown": "30d"}))
    await world.publish_journey(journey("welcome", {"segment": "new", "on": "entered"}, reentry="never"))
    await world.start()
    await world.profile("ada", plan="free")

    await world.event("ada", "Visited", "v1")
    await world.eventually(lambda: started(world, "ada", "winback", 1))
    await world.event("ada", "Visited", "v2")
    refused = await world.eventually(lambda: refusal(world, "ada", "winback"))
    assert refused.rule == "cooldown"
    assert refused.reason.startswith("not entered: re-entry allowed once every 30 days, last entered 20")
    assert refused.decided_at.ToSeconds() > 0 and refused.action_id == "" and refused.person_id == "ada"

    await world.segment("ada", "new")
    await world.eventually(lambda: started(world, "ada", "welcome", 1))
    await world.segment("ada", "new", entered=False)
    await world.segment("ada", "new")
    refused = await world.eventually(lambda: refusal(world, "ada", "welcome"))
    assert refused.rule == "reentry"
    assert refused.reason.startswith("not entered: re-entry is never allowed, last entered 20")
    # Newest first, with the person's other decisions; filtered by journey like them.
    assert [d.journey_id for d in await listed(world, "ada")] == ["welcome", "winback"]
    assert [d.journey_id for d in await listed(world, "ada", journey_id="winback")] == ["winback"]
    assert await listed(world, "ada", action_id="a-none") == []


async def test_max_concurrent_names_the_cap(world_factory):
    world = await world_factory()
    await world.publish_journey(journey("browse", {"event": "Viewed"}, reentry="always", max_concurrent=1))
    await world.start()
    await world.event("bo", "Viewed", "b1")
    await world.eventually(lambda: started(world, "bo", "browse", 1))
    await world.event("bo", "Viewed", "b2")
    refused = await world.eventually(lambda: refusal(world, "bo", "browse"))
    assert refused.rule == "max_concurrent"
    assert refused.reason == "not entered: already in the journey 1 time at once, its max_concurrent is 1"


async def test_a_false_entry_condition_is_recorded_once_per_journey(world_factory):
    world = await world_factory()
    await world.publish_journey(journey("pro", {"event": "Upgraded", "if": 'traits.plan = "pro"'}))
    await world.publish_journey(journey("marker", {"event": "Ping"}))
    await world.start()
    await world.profile("cy", plan="free")
    for n in range(5):
        await world.event("cy", "Upgraded", f"u{n}")
    refused = await world.eventually(lambda: refusal(world, "cy", "pro"))
    assert refused.rule == "entry_if"
    assert refused.reason.startswith('not entered: entry condition `traits.plan = "pro"` was false at 20')
    await world.event("cy", "Ping", "ping")  # applied after the five (one person's events keep their order)
    await world.eventually(lambda: started(world, "cy", "marker", 1))
    # A busy trigger keeps one record per journey per person, not one per event.
    stored = [r.doc async for r in world.store.scan_all(DECISIONS, prefix="cy:")]
    assert [(d["journey_id"], d["kind"]) for d in stored] == [("pro", "not_entered")]
    assert await started(world, "cy", "pro", 0)


async def test_a_paused_journey_says_so(world_factory):
    world = await world_factory()
    await world.publish_journey(journey("cart", {"event": "Cart Abandoned"}))
    await world.publish_journey(journey("vip", {"segment": "vip", "on": "entered"}))
    for journey_id in ("cart", "vip"):
        await world.journeys.save(lifecycle.pause(world.journeys.get(journey_id)))
    await world.start()
    await world.event("dee", "Cart Abandoned", "c1")
    await world.event("dee", "Other", "o1")
    await world.segment("dee", "vip")
    refused = await world.eventually(lambda: refusal(world, "dee", "cart"))
    assert (refused.rule, refused.reason) == ("paused", "not entered: journey paused")
    refused = await world.eventually(lambda: refusal(world, "dee", "vip"))
    assert (refused.rule, refused.reason) == ("paused", "not entered: journey paused")
    assert not await world.instances("dee")


async def test_refused_entries_page_with_the_decisions_newest_first():
    from cdp_kit.storage import open_store
    from cdp_orchestration.state import decision_order, not_entered_key

    def doc(kind: str, journey_id: str, at: float, action_id: str = "") -> dict:
        return {
            "action_id": action_id,
            "journey_id": journey_id,
            "instance_id": "",
            "person_id": "gus",
            "node_id": "",
            "channel": "",
            "category": "",
            "kind": kind,
            "reason": "",
            "rule": "",
            "until": None,
            "at": at,
        }

    async with open_store("memory://") as store:
        for at, action_id in ((100.0, "a1"), (300.0, "a3"), (500.0, "a5")):
            await store.put(DECISIONS, f"gus:{decision_order(at)}:{action_id}:sent:0", doc("sent", "j", at, action_id))
        for at, journey_id in ((200.0, "j2"), (400.0, "j4")):
            await store.put(DECISIONS, not_entered_key("gus", journey_id), doc("not_entered", journey_id, at))
        api = OrchestrationApi(journeys=Journeys(store), store=store, bus=None, partitions=2)
        seen, token = [], ""
        while True:
            request = pb.ListDecisionsRequest(person_id="gus", page_size=2, page_token=token)
            page = await api.ListDecisions(request, None)
            seen += [d.decided_at.ToSeconds() for d in page.decisions]
            token = page.next_page_token
            if not token:
                break
        assert seen == [500, 400, 300, 200, 100]


async def test_a_privacy_deletion_takes_the_refused_entries_with_the_decisions(world_factory):
    import asyncio

    from cdp.privacy.v1 import privacy_pb2
    from cdp_kit.bus import OutMessage, privacy_stream, subjects
    from cdp_orchestration.channels.inapp import InboxChannel
    from cdp_orchestration.privacy import PrivacyHandler, consumer_spec
    from cdp_orchestration.state import prepare_store

    world = await world_factory()
    await world.bus.ensure_streams(privacy_stream())
    await prepare_store(world.store)
    await world.publish_journey(journey("pro", {"event": "Upgraded", "if": 'traits.plan = "pro"'}))
    await world.start()
    for person in ("hal", "ivy"):
        await world.profile(person, plan="free")
        await world.event(person, "Upgraded", f"u-{person}")
        await world.eventually(lambda p=person: refusal(world, p, "pro"))

    handler = PrivacyHandler(world.bus, world.store, partitions=2, engine=world.engine, inbox=InboxChannel(world.store))
    handled = asyncio.Event()

    async def handle(batch) -> None:
        await handler.handle(batch)
        handled.set()

    task = asyncio.create_task(world.bus.consumer(consumer_spec(), handle).run())
    try:
        request = privacy_pb2.PrivacyDeleted(request_id="req-hal", person_id="hal")
        [result] = await world.bus.publisher.publish_batch(
            [OutMessage(subjects.PRIVACY_DELETED, request.SerializeToString(), "privacy:req-hal")]
        )
        assert result.ok
        await asyncio.wait_for(handled.wait(), timeout=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [r.key async for r in world.store.scan_all(DECISIONS, prefix="hal:")] == []
    assert await refusal(world, "ivy", "pro") is not None
