"""Segmentation's receivers of core subjects take only what was published on each: a push consumer aimed at
one (cdp_testing.core_subjects) would make every replica reload a "segment" named by whatever bytes the
stream held (`segmentation.segments.changed`), or drop its cache of a computed trait's readers for nothing."""

from __future__ import annotations

import sys

import pytest

from cdp_kit.bus import Bus, profiles_stream, subjects
from cdp_kit.service import serving
from cdp_segmentation.__main__ import setup
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.core_subjects import pushed_then_published, reloads_taken, taken


async def test_messages_a_push_consumer_delivers_onto_segment_changes_reload_nothing(nats_server, monkeypatch):
    settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=1,
        shutdown_grace=1.0, store_url="memory://",
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="core-subject-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(settings, setup) as runtime:
            reloaded = await reloads_taken(
                bus, monkeypatch, runtime.parts["engine"], "reload", subjects.SEGMENTATION_SEGMENTS_CHANGED
            )
            assert reloaded == ["control"]


@pytest.mark.parametrize(
    ("subject", "cache"),
    [
        (subjects.ORCHESTRATION_JOURNEYS_CHANGED, "readers_journeys"),
        (subjects.SCORING_MODELS_CHANGED, "readers_models"),
    ],
)
async def test_messages_a_push_consumer_delivers_onto_journey_or_model_changes_keep_the_readers_cached(
    nats_server, monkeypatch, subject, cache
):
    """The computed traits' readers (live journeys, deployed models) are cached a few seconds and forgotten
    when a journey or a model changes: a pushed message forgets nothing, an announcement does."""
    settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=1,
        shutdown_grace=1.0, store_url="memory://",
        # Never called here: the caches exist once the services that answer them are configured.
        scoring_address="127.0.0.1:9", orchestration_address="127.0.0.1:9",
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="core-subject-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(settings, setup) as runtime:
            cached = getattr(runtime.parts["engine"], cache)
            forgotten: list[str] = []
            forget = cached.forget

            def recording() -> None:
                # Which message made the receiver forget: its callback's `msg` (forget takes no argument).
                forgotten.append(sys._getframe(1).f_locals["msg"].data.decode())
                forget()

            monkeypatch.setattr(cached, "forget", recording)
            await pushed_then_published(
                bus,
                stream=subjects.PROFILES,
                stream_subject=subjects.profiles_changed(0),
                subject=subject,
                pushed=b"pushed",
                published=b"control",
            )
            assert await taken(lambda: forgotten, "control") == ["control"]
