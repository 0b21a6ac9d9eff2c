"""Collector → identity → profile → scoring → profile, with a real nats-server: a model deployed over gRPC
gets the computed traits it reads defined on the profile service, every event that moves them re-scores
the person, and the score lands on the profile as a field with its model and version.

The model is an exact logistic model (cdp_testing.onnx_models), so the score on the profile is checked
to the number against the events that were sent.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.service import serving
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings
from cdp_scoring.__main__ import setup as scoring_setup
from cdp_scoring.settings import ScoringSettings
from cdp_testing.onnx_models import expected, logistic_model

W = [0.4, -0.3]
TRAITS = [
    {"name": "orders_90d", "op": "count", "event_names": ["Order Completed"], "window": "90d"},
    {"name": "pages_30d", "op": "count", "event_type": "page", "window": "30d"},
]
FEATURES = [
    {"name": "orders", "path": "computed.orders_90d", "default": 0},
    {"name": "pages", "path": "computed.pages_30d", "default": 0},
]


def model(version: str = "1.0.0", weights=W) -> bytes:
    return logistic_model(
        "churn_risk", version, features=FEATURES, weights=weights, spec_overrides={"computed_traits": TRAITS}
    )


class Platform:
    def __init__(self, edge, identity, profile, scoring, scoring_runtime) -> None:
        self.edge = edge
        self.identity = identity
        self.profile = profile
        self.scoring = scoring
        self.scoring_runtime = scoring_runtime

    async def person_of(self, user_id: str) -> str:
        for _ in range(300):
            try:
                request = identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="user_id", value=user_id))
                return (await self.identity.Lookup(request)).person_id
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            await asyncio.sleep(0.05)
        raise AssertionError(f"no person for {user_id}")

    async def profile_when(self, person: str, ready, timeout: float = 20.0) -> profile_pb2.Profile:
        last = None
        for _ in range(int(timeout / 0.05)):
            try:
                last = await self.profile.GetProfile(profile_pb2.GetProfileRequest(person_id=person))
                if ready(last):
                    return last
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            await asyncio.sleep(0.05)
        raise AssertionError(f"profile never got ready: {last}")


@pytest.fixture
async def platform(edge, tmp_path):
    profile = ProfileSettings(
        **edge.common,
        store_url=f"sqlite:///{tmp_path / 'profile.db'}",
        identity_address=f"127.0.0.1:{edge.identity.grpc.port}",
    )
    async with serving(profile, profile_setup) as p:
        scoring = ScoringSettings(
            **edge.common,
            store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
            model_store=str(tmp_path / "models"),
            ship_models=False,
            profile_address=f"127.0.0.1:{p.grpc.port}",
            snapshot_interval=0.5,
        )
        async with serving(scoring, scoring_setup) as s:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc.port}") for r in (edge.identity, p, s)]
            try:
                yield Platform(
                    edge,
                    identity=identity_pb2_grpc.IdentityServiceStub(channels[0]),
                    profile=profile_pb2_grpc.ProfileServiceStub(channels[1]),
                    scoring=scoring_pb2_grpc.ScoringServiceStub(channels[2]),
                    scoring_runtime=s,
                )
            finally:
                for channel in channels:
                    await channel.close()


def track(message_id: str, user: str, event: str, **properties) -> dict:
    return {"type": "track", "messageId": message_id, "userId": user, "event": event, "properties": properties}


def page(message_id: str, user: str, name: str) -> dict:
    return {"type": "page", "messageId": message_id, "userId": user, "name": name}


async def test_events_move_the_score_on_the_profile(platform):
    deployed = await platform.scoring.DeployModel(scoring_pb2.DeployModelRequest(onnx=model()))
    assert deployed.live_version == "1.0.0"
    definitions = await platform.profile.ListComputedTraits(profile_pb2.ListComputedTraitsRequest())
    assert {t.definition.name for t in definitions.traits} == {"orders_90d", "pages_30d"}

    await platform.edge.send(
        page("m1", "ada", "Pricing"), page("m2", "ada", "Docs"), track("m3", "ada", "Order Completed", total=10)
    )
    person = await platform.person_of("ada")
    want = expected(W, [1, 2])
    profile = await platform.profile_when(
        person, lambda p: "churn_risk" in p.scores and abs(p.scores["churn_risk"].value - want) < 1e-6
    )
    score = profile.scores["churn_risk"]
    assert (score.model, score.version) == ("churn_risk", "1.0.0")

    # A second order moves the input, so the score follows; Score over gRPC agrees with the profile.
    await platform.edge.send(track("m4", "ada", "Order Completed", total=20))
    want = expected(W, [2, 2])
    await platform.profile_when(person, lambda p: abs(p.scores["churn_risk"].value - want) < 1e-6)
    reply = await platform.scoring.Score(scoring_pb2.ScoreRequest(person_id=person))
    assert reply.results[0].scores["churn_risk"] == pytest.approx(want, abs=1e-6)


async def test_a_shadow_version_never_reaches_the_profile_until_promoted(platform):
    await platform.scoring.DeployModel(scoring_pb2.DeployModelRequest(onnx=model()))
    await platform.scoring.DeployModel(
        scoring_pb2.DeployModelRequest(onnx=model("2.0.0", [1.0, 1.0]), role=scoring_pb2.ROLE_SHADOW)
    )
    await platform.edge.send(track("s1", "bob", "Order Completed", total=5))
    person = await platform.person_of("bob")
    await platform.profile_when(
        person, lambda p: p.scores["churn_risk"].version == "1.0.0" if "churn_risk" in p.scores else False
    )
    shadow = await platform.scoring.GetModel(scoring_pb2.GetModelRequest(name="churn_risk"))
    stats = {v.spec.version: v for v in shadow.versions}
    assert stats["2.0.0"].rows_scored >= 1 and stats["2.0.0"].mean_abs_diff_to_live > 0

    # Promoted, it reaches the profile at once (every held person is scored with a version made live), then
    # follows bob's next change.
    await platform.scoring.Promote(scoring_pb2.PromoteRequest(name="churn_risk", version="2.0.0"))
    profile = await platform.profile_when(person, lambda p: p.scores["churn_risk"].version == "2.0.0")
    assert profile.scores["churn_risk"].value == pytest.approx(expected([1.0, 1.0], [1, 0]), abs=1e-6)
    await platform.edge.send(track("s2", "bob", "Order Completed", total=5))
    want = expected([1.0, 1.0], [2, 0])
    profile = await platform.profile_when(person, lambda p: abs(p.scores["churn_risk"].value - want) < 1e-6)
    assert profile.scores["churn_risk"].version == "2.0.0"


async def test_a_deleted_person_leaves_scoring_too(platform):
    await platform.scoring.DeployModel(scoring_pb2.DeployModelRequest(onnx=model()))
    await platform.edge.send(track("d1", "cy", "Order Completed", total=5))
    person = await platform.person_of("cy")
    await platform.profile_when(person, lambda p: "churn_risk" in p.scores)
    engine = platform.scoring_runtime.parts["engine"]
    assert person in engine.fields
    await platform.profile.Delete(profile_pb2.DeleteRequest(person_id=person, mode=profile_pb2.DELETE_MODE_DELETE))
    for _ in range(200):
        if person not in engine.fields:
            break
        await asyncio.sleep(0.05)
    assert person not in engine.fields
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await platform.scoring.Score(scoring_pb2.ScoreRequest(person_id=person))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
