"""Scoring's receiver of `scoring.models.changed` (another replica deployed or rolled back a model: reload
it) takes only what was published on that subject.

Any NATS user that may create a consumer on a stream it reads can make it a push consumer whose deliver
subject is this core subject; nats-server then publishes the stream's messages onto it (an open
nats-server issue: the deliver subject is not checked against the creator's publish permission). Each such
message would make every scoring replica reload a "model" named by whatever bytes the stream held. A pushed
message keeps its stream subject (`cdp_kit.bus.subjects.published_on`), and the receiver drops it."""

from __future__ import annotations

import asyncio
import time

from nats.js.api import ConsumerConfig, DeliverPolicy

from cdp_kit.bus import Bus, profiles_stream, subjects
from cdp_kit.service import serving
from cdp_scoring.__main__ import setup

from .conftest import settings


async def test_messages_a_push_consumer_delivers_onto_the_subject_reload_nothing(nats_server, tmp_path, monkeypatch):
    config = settings(nats_server, tmp_path)
    async with Bus.connect(nats_server.url, name="core-subject-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(config, setup) as runtime:
            engine = runtime.parts["engine"]
            reloaded: list[str] = []
            reload = engine.reload

            async def recording(name: str) -> None:
                reloaded.append(name)
                await reload(name)

            monkeypatch.setattr(engine, "reload", recording)
            await bus.js.publish(subjects.profiles_changed(0), b"pushed-model")
            await bus.js.add_consumer(
                subjects.PROFILES,
                ConsumerConfig(
                    durable_name="aimed-at-scoring",
                    deliver_subject=subjects.SCORING_MODELS_CHANGED,
                    deliver_policy=DeliverPolicy.ALL,
                ),
            )
            # Delivered (nats-server published it onto the core subject) before the control below is sent:
            # the receiver's subscription handles both in that order.
            deadline = time.monotonic() + 10
            while (await bus.js.consumer_info(subjects.PROFILES, "aimed-at-scoring")).delivered.stream_seq < 1:
                assert time.monotonic() < deadline, "nats-server did not push the message"
                await asyncio.sleep(0.02)
            # The control: a replica's own announcement, published on the subject, is taken.
            await bus.nc.publish(subjects.SCORING_MODELS_CHANGED, b"control-model")
            deadline = time.monotonic() + 10
            while "control-model" not in reloaded:
                assert time.monotonic() < deadline, f"the announcement was not taken: {reloaded}"
                await asyncio.sleep(0.02)
            assert reloaded == ["control-model"]
