"""Defects found by trying the platform as a customer, an operator and an attacker would (session 42): the
scoring service's side."""

from __future__ import annotations

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.service import serving
from cdp_scoring.__main__ import setup
from cdp_testing.onnx_models import logistic_model

from .conftest import settings


@pytest.fixture
async def scoring(nats_server, tmp_path):
    async with serving(settings(nats_server, tmp_path), setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield scoring_pb2_grpc.ScoringServiceStub(channel)


def _model_of(size: int) -> bytes:
    """A valid model carrying an unused initializer that makes it about `size` bytes."""
    model = onnx.load_from_string(logistic_model(weights=[0.5, -0.25]))
    padding = np.zeros(size // 4, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(padding, name="s42_padding"))
    return model.SerializeToString()


async def test_a_model_under_the_stated_64_mb_is_deployed_and_one_over_it_refused_naming_the_limit(scoring):
    """DeployModel takes a model of up to 64 MB (MAX_MODEL_BYTES, refused over it naming `onnx` and the
    limit), but the gRPC port took no request over 16 MiB: a 20 MB model (a boosted model of many trees)
    was refused RESOURCE_EXHAUSTED 'Received message larger than max', naming neither field nor limit."""
    deployed = await scoring.DeployModel(scoring_pb2.DeployModelRequest(onnx=_model_of(20 * 1024 * 1024)), timeout=60)
    assert deployed.live_version == "1.0.0"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await scoring.DeployModel(scoring_pb2.DeployModelRequest(onnx=_model_of(64 * 1024 * 1024 + 4096)), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "at most 67108864 per model" in refused.value.details()
