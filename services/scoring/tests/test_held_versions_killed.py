"""A scoring process SIGKILLed right after a version made live scored the persons it holds: the stamps that
pass handed out (published.py: a person's stamps never go backwards) must survive, or a change the profile
applied before the promotion and scoring applies only after the restart is stamped before the promotion's
update and refused by the profile (`Profile.take_scores`), the person keeping the promotion's score computed
without the change until their next change.

The periodic snapshot is set to an hour, so the only snapshot the restarted process can find is one the
pass took itself: the kill never races a timer."""

from __future__ import annotations

import asyncio
import time

import grpc
import nats
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.bus import profiles_stream
from cdp_kit.bus.streams import ensure_stream
from cdp_testing.onnx_models import expected, logistic_model
from cdp_testing.processes import ScoringProcess

from .test_engine import T0_MS, W, published
from .test_held_versions import W2, held_by_profile

# What scoring logs once a version made live has scored the persons it holds (deployments.py).
HELD_SCORED = "held persons scored with a version made live"


def orders_and_sessions(orders: float, sessions: float, at_ms: int) -> bytes:
    change = profile_pb2.ProfileChanged(person_id="p1", cause="event")
    change.computed["orders_90d"].number_value = orders
    change.computed["sessions_30d"].number_value = sessions
    change.at.FromMilliseconds(at_ms)
    return profile_pb2.ProfileChangedBatch(changes=[change]).SerializeToString()


async def until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"{what}; see scoring.log"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
async def test_the_stamps_of_a_promotion_survive_a_kill_right_after_it(nats_server, tmp_path):
    service = ScoringProcess(
        nats_server.url,
        tmp_path,
        store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        partitions=1,
        CDP_SCORING_SHIP_MODELS="false",
        CDP_SCORING_SNAPSHOT_SECONDS="3600",
        CDP_LOG_LEVEL="INFO",  # the promotion's scoring of the persons held is read from the log
    )

    def scored(count: int):
        async def enough() -> bool:
            return len(await published(nats_server.url)) >= count

        return enough

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await ensure_stream(js, profiles_stream())
        service.start()
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W)), timeout=30)
            await service.logged(HELD_SCORED)  # the deploy's scoring of the persons held
            await js.publish("profiles.changed.0", orders_and_sessions(1, 1, T0_MS + 1000))

            await until(scored(1), "p1's change was never scored")
            await stub.DeployModel(
                scoring_pb2.DeployModelRequest(
                    onnx=logistic_model(version="2.0.0", weights=W2), role=scoring_pb2.ROLE_INACTIVE
                ),
                timeout=30,
            )
            before = service.logged_count(HELD_SCORED)
            # The profile applies p1's next change at T0 + 5 s; scoring has not applied it yet when 2.0.0 is
            # promoted and the persons held are scored with the service's clock (later): p1 without the change.
            await stub.Promote(scoring_pb2.PromoteRequest(name="churn_risk", version="2.0.0"), timeout=30)
            await service.logged(HELD_SCORED, before + 1)  # the promotion's
        service.kill()  # before any periodic snapshot: an hour away
        updates = await published(nats_server.url)
        assert [(u.person_id, u.version) for u in updates] == [("p1", "1.0.0"), ("p1", "2.0.0")]
        assert updates[1].at > T0_MS / 1000 + 5, "the promotion is stamped with the service's clock"

        service.start()
        await js.publish("profiles.changed.0", orders_and_sessions(7, 1, T0_MS + 5000))
        await until(scored(3), "p1's change in flight was never scored after the restart")
        updates = await published(nats_server.url)
        assert [u.version for u in updates] == ["1.0.0", "2.0.0", "2.0.0"]
        assert updates[2].scores["churn_risk"] == pytest.approx(expected(W2, [7, 1]), abs=1e-6)
        assert updates[2].at > updates[1].at, "the change's score is stamped after the promotion's"
        assert held_by_profile(updates, "p1") == pytest.approx(expected(W2, [7, 1]), abs=1e-6)
    finally:
        service.stop()
        await nc.close()
