"""Scoring's receiver of `scoring.models.changed` (another replica deployed or rolled back a model: reload
it) takes only what was published on that subject: a push consumer aimed at it (cdp_testing.core_subjects)
would make every replica reload a "model" named by whatever bytes the stream held."""

from __future__ import annotations

from cdp_kit.bus import Bus, profiles_stream, subjects
from cdp_kit.service import serving
from cdp_scoring.__main__ import setup
from cdp_testing.core_subjects import reloads_taken

from .conftest import settings


async def test_messages_a_push_consumer_delivers_onto_the_subject_reload_nothing(nats_server, tmp_path, monkeypatch):
    async with Bus.connect(nats_server.url, name="core-subject-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(settings(nats_server, tmp_path), setup) as runtime:
            reloaded = await reloads_taken(
                bus, monkeypatch, runtime.parts["engine"], "reload", subjects.SCORING_MODELS_CHANGED
            )
            assert reloaded == ["control"]
