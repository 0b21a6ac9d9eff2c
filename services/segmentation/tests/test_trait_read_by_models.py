"""A computed trait a deployed model reads is not deleted from under it. Scoring defines on the profile
service the computed traits its models' features read; an admin deleting one succeeded, and every deployed
model reading it then scored on the feature's default, silently. Now segmentation's
ListComputedTraitReaders names the model versions whose features read `computed.<name>` (asked of scoring,
ListModels), so the profile service refuses the deletion naming them, unless forced; a scoring service that
cannot be asked is UNAVAILABLE, never a blind deletion. Real profile, segmentation and scoring services on a
real nats-server, each with its own token, and a model the project trains itself (the shipped `clv`)."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream, segments_stream
from cdp_kit.natsserver import free_port
from cdp_kit.service import serving
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings
from cdp_scoring.__main__ import setup as scoring_setup
from cdp_scoring.modelstore import shipped_models
from cdp_scoring.settings import ScoringSettings
from cdp_segmentation.__main__ import setup as segmentation_setup
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.onnx_models import logistic_model

ADMIN = [("authorization", "Bearer admin-token")]
TICKETS = profile_pb2.ComputedTraitDefinition(name="tickets", op="count", event_names=["Ticket Opened"])


def _tokens(path):
    write_tokens_file(
        path,
        [
            ("admin", "admin-token", ["*"]),
            ("profile", "profile-token", ["identity:read", "segmentation:read"]),
            ("segmentation", "segmentation-token", ["profile:read", "profile:admin", "scoring:read"]),
            ("scoring", "scoring-token", ["profile:read", "profile:admin"]),
        ],
    )
    return path


@contextlib.asynccontextmanager
async def _profile(nats_server, tmp_path, tokens, segmentation_address: str):
    settings = ProfileSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="tokens", auth_tokens_file=tokens,
        partitions=1, store_url=f"sqlite:///{tmp_path / 'profile.db'}", shutdown_grace=1.0,
        identity_address=f"127.0.0.1:{free_port()}",  # LookupProfile only; not asked here
        segmentation_address=segmentation_address, segmentation_token="profile-token",
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="trait-read-by-models-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), identity_stream(), segments_stream())
    async with serving(settings, profile_setup) as runtime:
        yield f"127.0.0.1:{runtime.grpc.port}"


def _scoring(nats_server, tmp_path, tokens, port: int, profile_address: str) -> ScoringSettings:
    return ScoringSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=port, auth_mode="tokens",
        auth_tokens_file=tokens, partitions=1, shutdown_grace=1.0, store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        model_store=str(tmp_path / "models"), ship_models=False,
        profile_address=profile_address, profile_token="scoring-token",
    )  # fmt: skip


def _clv() -> bytes:
    """The shipped customer lifetime value model, as `make models` trains it."""
    [path] = [p for p in shipped_models() if p.name == "clv.onnx"]
    return path.read_bytes()


async def _names(profiles) -> set[str]:
    listed = await profiles.ListComputedTraits(profile_pb2.ListComputedTraitsRequest(), metadata=ADMIN)
    return {t.definition.name for t in listed.traits}


async def _delete(profiles, name: str, *, force: bool = False):
    return await profiles.DeleteComputedTrait(
        profile_pb2.DeleteComputedTraitRequest(name=name, force=force), metadata=ADMIN
    )


async def test_a_trait_a_deployed_model_reads_is_not_deleted_unless_forced(nats_server, tmp_path):
    tokens = _tokens(tmp_path / "tokens.json")
    segmentation_port, scoring_port = free_port(), free_port()
    segmentation_address, scoring_address = f"127.0.0.1:{segmentation_port}", f"127.0.0.1:{scoring_port}"
    async with contextlib.AsyncExitStack() as stack:
        profile_address = await stack.enter_async_context(_profile(nats_server, tmp_path, tokens, segmentation_address))
        segmentation = SegmentationSettings(
            nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=segmentation_port, auth_mode="tokens",
            auth_tokens_file=tokens, partitions=1, shutdown_grace=1.0, store_url="memory://",
            profile_address=profile_address, profile_token="segmentation-token",
            scoring_address=scoring_address, scoring_token="segmentation-token",
            # Asked on every call: the end checks what a scoring service that just stopped gives (a kept
            # answer would refuse for a few seconds more, naming the models: test_trait_readers_cache.py).
            readers_cache_seconds=0,
        )  # fmt: skip
        await stack.enter_async_context(serving(segmentation, segmentation_setup))
        profiles = profile_pb2_grpc.ProfileServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(profile_address))
        )
        readers = segmentation_pb2_grpc.SegmentationServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(segmentation_address))
        )
        async with serving(_scoring(nats_server, tmp_path, tokens, scoring_port, profile_address), scoring_setup):
            async with grpc.aio.insecure_channel(scoring_address) as channel:
                models = scoring_pb2_grpc.ScoringServiceStub(channel)
                # Deploying the model defines the computed traits it reads on the profile service.
                clv = await models.DeployModel(scoring_pb2.DeployModelRequest(onnx=_clv()), metadata=ADMIN)
                [version] = clv.versions
                assert version.role == scoring_pb2.ROLE_LIVE
                read = {
                    f.path.removeprefix("computed.") for f in version.spec.features if f.path.startswith("computed.")
                }
                assert {"orders_total", "signed_up_at"} <= read <= await _names(profiles)
                # A second model whose features read one of them (its spec defines none of its own), kept
                # inactive: a promotion would make it score again.
                await models.DeployModel(
                    scoring_pb2.DeployModelRequest(
                        onnx=logistic_model(
                            "repeat_buyer",
                            features=[{"name": "orders", "path": "computed.orders_total", "default": 0}],
                            weights=[0.5],
                        )
                    ),
                    metadata=ADMIN,
                )
                await models.DeployModel(
                    scoring_pb2.DeployModelRequest(
                        onnx=logistic_model(
                            "repeat_buyer",
                            version="2.0.0",
                            features=[{"name": "sessions", "path": "traits.sessions", "default": 0}],
                            weights=[0.25],
                        )
                    ),
                    metadata=ADMIN,
                )
                await models.Promote(scoring_pb2.PromoteRequest(name="repeat_buyer", version="2.0.0"), metadata=ADMIN)

            answer = await readers.ListComputedTraitReaders(
                segmentation_pb2.ListComputedTraitReadersRequest(name="orders_total"), metadata=ADMIN
            )
            assert answer.models_checked
            assert [(m.name, m.version, m.role) for m in answer.models] == [
                ("clv", version.spec.version, "live"),
                ("repeat_buyer", "1.0.0", "inactive"),
            ]

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _delete(profiles, "signed_up_at")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = refused.value.details()
            assert f"deployed models 'clv' {version.spec.version} (live)" in details
            assert "force" in details and "segments" not in details
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _delete(profiles, "orders_total")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"'clv' {version.spec.version} (live), 'repeat_buyer' 1.0.0 (inactive)" in refused.value.details()
            assert {"signed_up_at", "orders_total"} <= await _names(profiles)

            # A trait no model reads is deleted: scoring was asked and names none.
            await profiles.DefineComputedTrait(
                profile_pb2.DefineComputedTraitRequest(definition=TICKETS), metadata=ADMIN
            )
            await _delete(profiles, "tickets")
            assert "tickets" not in await _names(profiles)

            # Forced: deleted, read or not.
            await _delete(profiles, "signed_up_at", force=True)
            assert "signed_up_at" not in await _names(profiles)

        # Scoring cannot be asked: nothing is deleted blindly.
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await _delete(profiles, "orders_total")
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "scoring service could not be asked" in unavailable.value.details()
        assert "orders_total" in await _names(profiles)
        await _delete(profiles, "orders_total", force=True)
        assert "orders_total" not in await _names(profiles)
