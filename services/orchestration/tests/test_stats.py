"""GetJourneyStats from the engine's counters: entries, goal conversions per split variant against control."""

from __future__ import annotations

import collections

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.domain.instance import split_point

EXPERIMENT = {
    "id": "nudge",
    "version": 1,
    "name": "Nudge",
    "priority": 5,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "goal": {"event": "Order Completed", "within": "1d", "exit": True},
    "start": "split",
    "nodes": [
        {
            "id": "split",
            "type": "split",
            "variants": [
                {"name": "nudge", "weight": 50, "next": "wait"},
                {"name": "control", "weight": 50, "control": True, "next": "wait"},
            ],
        },
        {"id": "wait", "type": "delay", "duration": "1h"},
    ],
}


async def test_stats_count_entries_and_conversions_per_variant(world_factory):
    world = await world_factory()
    await world.publish_journey(EXPERIMENT)
    await world.start()
    people = [f"s{i}" for i in range(16)]
    buyers = people[::2]
    for person in people:
        await world.event(person, "Cart Abandoned", f"cart-{person}")
    for person in people:
        await world.eventually(lambda p=person: world.instances(p))
    for person in buyers:
        await world.event(person, "Order Completed", f"order-{person}")
    for person in buyers:
        await world.eventually(lambda p=person: _ended(world, p))

    api = OrchestrationApi(journeys=world.journeys, store=world.store, bus=world.bus, partitions=2)
    stats = await api.GetJourneyStats(pb.GetJourneyStatsRequest(journey_id="nudge"), None)
    assert stats.entered == 16 and stats.converted == len(buyers) and stats.active == 16 - len(buyers)
    assert dict(stats.ended) == {"goal": len(buyers)}
    variant_of = {p: "nudge" if split_point(p, "nudge", "split") < 0.5 else "control" for p in people}
    entered = collections.Counter(variant_of.values())
    converted = collections.Counter(variant_of[p] for p in buyers)
    rows = {row.variant: row for row in stats.variants}
    assert set(rows) == {"nudge", "control"} and rows["control"].control
    for name, row in rows.items():
        assert (row.split_node, row.entered, row.converted) == ("split", entered[name], converted[name])
    nudge, control = rows["nudge"], rows["control"]
    assert abs(nudge.uplift - (nudge.conversion_rate - control.conversion_rate)) < 1e-9


async def _ended(world, person):
    return [i for i in await world.instances(person) if i["status"] == "ended"]
