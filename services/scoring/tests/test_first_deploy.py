"""The shipped models are deployed in the background at a first start (they need the profile service to
define their computed traits, which may still be starting). A person whose profile changed in that window
was held with no score, and kept none until they changed again: on a fresh `make up`, the first customers
went unscored. Once the shipped models are deployed, the persons already held are scored with them."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Bus, partition_for, profiles_stream, subjects
from cdp_kit.service import serving
from cdp_scoring.__main__ import _prepare_models, setup

from .conftest import settings

PERSONS = ("p_ann", "p_ben", "p_cat")


def change(person: str) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.GetCurrentTime()
    message.traits["city"].string_value = "Paris"
    message.computed["orders_30d"].number_value = 2
    return message


async def published_scores(nats_url: str) -> dict[str, set[str]]:
    """Every score name published on SCORES, by person."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.SCORES)
        found: dict[str, set[str]] = {}
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                message = await js.get_msg(subjects.SCORES, seq)
                batch = scoring_pb2.ScoresUpdatedBatch.FromString(message.data)
                for part in (batch, *batch.more):
                    for person in part.person_ids:
                        found.setdefault(person, set()).update(part.scores)
        return found
    finally:
        await nc.close()


@pytest.mark.timeout(120)
async def test_persons_held_before_the_shipped_models_were_deployed_are_scored_once_they_are(nats_server, tmp_path):
    config = settings(nats_server, tmp_path)
    async with Bus.connect(nats_server.url, name="first-deploy-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(config, setup) as runtime:
            engine = runtime.parts["engine"]
            for person in PERSONS:
                batch = profile_pb2.ProfileChangedBatch(changes=[change(person)])
                await bus.js.publish(
                    subjects.profiles_changed(partition_for(person, config.partitions)), batch.SerializeToString()
                )
            deadline = time.monotonic() + 30
            while not set(PERSONS) <= set(engine.fields):
                assert time.monotonic() < deadline, "the changes were not applied"
                await asyncio.sleep(0.02)
            assert not engine.registry.models  # held, and nothing to score them with yet
            await _prepare_models(engine, ship=True)  # what a first start runs in the background
            live = {entry.live.spec.name for entry in engine.registry if entry.live is not None}
            assert "churn_risk" in live
            expected = {score for entry in engine.registry for score in entry.live.spec.score_names}
            deadline = time.monotonic() + 60
            while True:
                found = await published_scores(nats_server.url)
                if all(found.get(person, set()) >= expected for person in PERSONS):
                    break
                assert time.monotonic() < deadline, f"not scored with the shipped models: {found}"
                await asyncio.sleep(0.2)
