"""Orchestration's receiver of `orchestration.journeys.changed` (another replica changed a journey: read it
again) takes only what was published on that subject: a push consumer aimed at it
(cdp_testing.core_subjects) would make every replica reload a "journey" named by whatever bytes the stream
held."""

from __future__ import annotations

from cdp_kit.bus import Bus, events_resolved_stream, profiles_stream, segments_stream, subjects
from cdp_testing.core_subjects import pushed_then_published, taken

from .test_api import served


async def test_messages_a_push_consumer_delivers_onto_journey_changes_reload_nothing(
    nats_server, tmp_path, monkeypatch
):
    async with Bus.connect(nats_server.url, name="core-subject-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
        async with served(nats_server, tmp_path) as (_channel, runtime):
            journeys = runtime.parts["journeys"]
            reloaded: list[str] = []
            reload = journeys.reload

            async def recording(journey_id: str) -> None:
                reloaded.append(journey_id)
                await reload(journey_id)

            monkeypatch.setattr(journeys, "reload", recording)
            await pushed_then_published(
                bus,
                stream=subjects.PROFILES,
                stream_subject=subjects.profiles_changed(0),
                subject=subjects.ORCHESTRATION_JOURNEYS_CHANGED,
                pushed=b"pushed-journey",
                published=b"control-journey",
            )
            assert await taken(lambda: reloaded, "control-journey") == ["control-journey"]
