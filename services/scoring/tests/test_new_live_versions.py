"""A version that becomes live (deployed as a model's first version, promoted, rolled back) scores the persons
every replica holds, once, published as `ScoreAll` publishes: not only on the replica the call reached, and
not only when each person next changes. The other replicas learn of it from the announcement on
`scoring.models.changed` (deployments.py). Without it, a model deployed or promoted through one replica left
the persons the others held - and the ones it held itself - with no score or the old version's until they
changed again: a dormant customer, the one a churn model is for, could keep them for months."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import nats
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.bus import Bus, partition_for, profiles_stream, subjects
from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_scoring.__main__ import setup
from cdp_scoring.engine import ScoringEngine
from cdp_scoring.modelstore import FolderModelStore
from cdp_testing.onnx_models import logistic_model

from .conftest import settings

PARTITIONS = 2
FEATURES = ({"name": "orders", "path": "computed.orders_90d", "default": 0},)
# Three persons held by each replica (static ownership: partition p on replica p % 2).
PERSONS = {
    ordinal: [f"p_{ordinal}_{n}" for n in range(100) if partition_for(f"p_{ordinal}_{n}", PARTITIONS) == ordinal][:3]
    for ordinal in (0, 1)
}


def model(version: str, weight: float) -> bytes:
    return logistic_model(version=version, features=FEATURES, weights=[weight], bias=0.0)


def replica(nats_server, tmp_path, ordinal: int):
    # One registry and one model bucket, shared: a change made through one replica is announced to the other.
    return settings(
        nats_server, tmp_path, partitions=PARTITIONS, replicas=2, pod_ordinal=ordinal,
        model_store="nats://cdp-models-new-live", store_url=f"sqlite:///{tmp_path / 'shared.db'}",
    )  # fmt: skip


async def last_published(nats_url: str) -> dict[str, str]:
    """The churn_risk version last published on SCORES, by person."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.SCORES)
        found: dict[str, str] = {}
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                batch = scoring_pb2.ScoresUpdatedBatch.FromString((await js.get_msg(subjects.SCORES, seq)).data)
                for part in (batch, *batch.more):
                    if part.model == "churn_risk":
                        found.update(dict.fromkeys(part.person_ids, part.version))
        return found
    finally:
        await nc.close()


async def until_published(nats_url: str, persons: list[str], version: str) -> None:
    """Until every one of `persons` was last published under churn_risk `version` (nobody changes meanwhile)."""
    deadline = time.monotonic() + 30
    while True:
        found = await last_published(nats_url)
        if all(found.get(person) == version for person in persons):
            return
        assert time.monotonic() < deadline, f"{version} not the last published for everyone: {found}"
        await asyncio.sleep(0.2)


async def changed_orders(bus, persons) -> None:
    """A profile change of each person (computed.orders_90d = their position), on their partition."""
    for n, person in enumerate(persons):
        change = profile_pb2.ProfileChanged(person_id=person, cause="event")
        change.at.GetCurrentTime()
        change.computed["orders_90d"].number_value = n
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await bus.js.publish(subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString())


@pytest.mark.timeout(120)
async def test_a_version_made_live_through_one_replica_scores_every_held_person_on_both(nats_server, tmp_path):
    everyone = PERSONS[0] + PERSONS[1]
    async with Bus.connect(nats_server.url, name="new-live-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with (
            serving(replica(nats_server, tmp_path, 0), setup) as r0,
            serving(replica(nats_server, tmp_path, 1), setup) as r1,
        ):
            engines = [r0.parts["engine"], r1.parts["engine"]]
            await changed_orders(bus, everyone)
            deadline = time.monotonic() + 15
            while not all(set(PERSONS[i]) <= set(engines[i].fields) for i in (0, 1)):
                assert time.monotonic() < deadline, "the changes were not applied"
                await asyncio.sleep(0.02)
            assert await last_published(nats_server.url) == {}  # held, and no model to score them with

            async with grpc.aio.insecure_channel(f"127.0.0.1:{r0.grpc.port}") as channel:
                stub = scoring_pb2_grpc.ScoringServiceStub(channel)
                # A model's first version goes live: every held person gets its score, on both replicas.
                await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=model("1.0.0", 0.5)))
                await until_published(nats_server.url, everyone, "1.0.0")
                # A later version deployed inactive is scored for nobody; promoted, it reaches everyone.
                await stub.DeployModel(
                    scoring_pb2.DeployModelRequest(onnx=model("2.0.0", -0.5), role=scoring_pb2.ROLE_INACTIVE)
                )
                await stub.Promote(scoring_pb2.PromoteRequest(name="churn_risk", version="2.0.0"))
                await until_published(nats_server.url, everyone, "2.0.0")
                # A rollback brings the version before it back to everyone.
                await stub.Rollback(scoring_pb2.RollbackRequest(name="churn_risk"))
                await until_published(nats_server.url, everyone, "1.0.0")
            assert [engine.registry.get("churn_risk").live.version for engine in engines] == ["1.0.0", "1.0.0"]


async def versions_published(nats_url: str) -> list[tuple[str, str]]:
    """Every (person, churn_risk version) published on SCORES, in stream order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.SCORES)
        found = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                batch = scoring_pb2.ScoresUpdatedBatch.FromString((await js.get_msg(subjects.SCORES, seq)).data)
                for part in (batch, *batch.more):
                    found.extend((person, part.version) for person in part.person_ids)
        return found
    finally:
        await nc.close()


@pytest.mark.timeout(120)
async def test_a_replica_down_when_a_version_was_made_live_scores_its_persons_once_when_it_starts(
    nats_server, tmp_path, caplog
):
    """Its partitions keep a record of the versions their persons were scored with (deployments.py): one whose
    record is not what is live now when it arrives scores the persons held. Its two partitions are taken one
    after the other, and scored in one pass."""
    everyone = PERSONS[0] + PERSONS[1]  # both partitions, on the one replica
    one = settings(nats_server, tmp_path, partitions=PARTITIONS)
    async with Bus.connect(nats_server.url, name="down-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(one, setup) as running:
            engine = running.parts["engine"]
            await engine.deploy(model("1.0.0", 0.5), role=None)
            await engine.deploy(model("2.0.0", -0.5), role=None)  # inactive
            await changed_orders(bus, everyone)
            await until_published(nats_server.url, everyone, "1.0.0")
        # While it is down, 2.0.0 is promoted through another replica, which holds none of these persons.
        async with open_store(one.store_url) as store:
            other = ScoringEngine(
                store, FolderModelStore(tmp_path / "models"), bus.publisher, partitions=PARTITIONS,
                telemetry=bus.telemetry,
            )  # fmt: skip
            await other.start()
            await other.promote("churn_risk", "2.0.0")
            await other.held_scored()
            await other.stop()
        assert {v for _p, v in await versions_published(nats_server.url)} == {"1.0.0"}
        caplog.clear()
        caplog.set_level(logging.INFO, logger="cdp.scoring.engine")
        async with serving(one, setup) as running:
            # Nobody changes: the start scores them.
            await until_published(nats_server.url, everyone, "2.0.0")
            await running.parts["engine"].held_scored()
        published = await versions_published(nats_server.url)
        assert sorted(p for p, v in published if v == "2.0.0") == sorted(everyone), "each person once"
        # In one pass over both partitions: a pass per partition publishes each person once too (only the
        # persons whose version moves are published), but reads and checks every person held each time.
        passes = [r for r in caplog.records if r.getMessage() == "held persons scored with a version made live"]
        assert [(r.persons, r.published) for r in passes] == [(len(everyone), len(everyone))], "one pass"
