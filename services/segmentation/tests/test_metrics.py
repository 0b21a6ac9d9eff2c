"""What an operator's dashboard reads from segmentation: its metrics under the OpenTelemetry dotted names
(`cdp.segmentation.<thing>`, the unit in the instrument's unit), counting what the engine did."""

from __future__ import annotations

import pytest

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, profiles_stream, segments_stream, subjects
from cdp_kit.storage import open_store
from cdp_kit.timestamps import set_seconds
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import SegmentationEngine
from cdp_testing.fakes import T0, Clock, Delivery
from cdp_testing.metrics import MetricsCapture


def change(person: str, at: float, **traits: str | float) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    set_seconds(message.at, at)
    for name, value in traits.items():
        if isinstance(value, str):
            message.traits[name].string_value = value
        else:
            message.traits[name].number_value = value
    return message


async def test_transitions_evaluations_members_timers_and_builds_are_measured_under_dotted_names(nats_server):
    captured = MetricsCapture("segmentation")
    telemetry = captured.telemetry
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="metrics-test") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = SegmentationEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            telemetry=telemetry,
            snapshot_interval=3600,
            timer_resolution=3600,
            clock=clock,
        )
        await engine.start()
        try:
            for segment_id, text in (("pro", 'traits.plan = "pro"'), ("recent", "traits.last_seen_at > now - 14d")):
                await engine.wait_live((await engine.create(segment_id, parse(text))).id)
            batch = profile_pb2.ProfileChangedBatch(
                changes=[change("p1", T0, plan="pro", last_seen_at=T0 - 86_400), change("p2", T0, plan="free")]
            )
            clock.advance(0.25)  # the changes were made a quarter of a second ago
            await engine.handle([Delivery(batch, subjects.profiles_changed(0), seq=1)])
            metrics = captured.collected()
        finally:
            await engine.stop()

    assert not [name for name in metrics if not name.startswith("cdp.segmentation.")]
    unit, (entered,) = metrics["cdp.segmentation.transitions"]
    assert unit == "{transition}" and entered.value == 2 and dict(entered.attributes) == {"direction": "entered"}
    unit, (evaluations,) = metrics["cdp.segmentation.evaluations"]
    # Each new person against the segments that can hold for them: p1 both, p2 (no last_seen_at, plan free:
    # not the word pro needs) neither.
    assert unit == "{evaluation}" and evaluations.value == 2
    unit, (freshness,) = metrics["cdp.segmentation.freshness"]
    assert unit == "ms" and freshness.count == 1 and freshness.sum == pytest.approx(250)
    unit, builds = metrics["cdp.segmentation.population.duration"]
    assert unit == "ms" and sum(p.count for p in builds) == 2  # one whole-population build per segment
    unit, members = metrics["cdp.segmentation.members"]
    assert unit == "{person}" and {p.attributes["segment"]: p.value for p in members} == {"pro": 1, "recent": 1}
    unit, (timers,) = metrics["cdp.segmentation.timers"]
    assert unit == "{person}" and timers.value == 1  # p1 leaves "recent" when last_seen_at is 14 days old
