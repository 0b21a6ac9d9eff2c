"""Orchestration's receiver of `orchestration.journeys.changed` (another replica changed a journey: read it
again) takes only what was published on that subject: a push consumer aimed at it
(cdp_testing.core_subjects) would make every replica reload a "journey" named by whatever bytes the stream
held."""

from __future__ import annotations

from cdp_kit.bus import Bus, events_resolved_stream, profiles_stream, segments_stream, subjects
from cdp_testing.core_subjects import reloads_taken

from .test_api import served


async def test_messages_a_push_consumer_delivers_onto_journey_changes_reload_nothing(
    nats_server, tmp_path, monkeypatch
):
    async with Bus.connect(nats_server.url, name="core-subject-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
        async with served(nats_server, tmp_path) as (_channel, runtime):
            reloaded = await reloads_taken(
                bus, monkeypatch, runtime.parts["journeys"], "reload", subjects.ORCHESTRATION_JOURNEYS_CHANGED
            )
            assert reloaded == ["control"]
