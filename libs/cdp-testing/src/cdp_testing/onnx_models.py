"""Small, exact ONNX models for tests: a logistic model y = sigmoid(x·w + b), built with onnx.helper,
carrying a cdp spec. Tests know the weights, so they know every score the service must produce."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

METADATA_KEY = "cdp.model"  # cdp_scoring.domain.METADATA_KEY (the test kit does not import services)


def logistic_model(
    name: str = "churn_risk",
    version: str = "1.0.0",
    *,
    features: Sequence[dict[str, Any]] = (
        {"name": "orders", "path": "computed.orders_90d", "default": 0},
        {"name": "sessions", "path": "computed.sessions_30d", "default": 0},
    ),
    weights: Sequence[float] | None = None,
    bias: float = 0.0,
    score: str | None = None,
    spec_overrides: dict[str, Any] | None = None,
    metadata: str | None = None,
    width: int | None = None,
    output: str = "probability",
) -> bytes:
    """A model whose one score is sigmoid(x·weights + bias), output tensor [n, 1]."""
    weights = list(weights if weights is not None else [0.5] * len(features))
    columns = width if width is not None else len(features)
    w = numpy_helper.from_array(np.asarray(weights, dtype=np.float32).reshape(columns, 1), "w")
    b = numpy_helper.from_array(np.asarray([bias], dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["features", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], [output]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", columns])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n", 1])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = {
        "name": name,
        "version": version,
        "owner": "tests",
        "input": "features",
        "features": list(features),
        "outputs": [{"score": score or name, "output": "probability", "index": 0, "meaning": "test score"}],
    }
    spec.update(spec_overrides or {})
    text = metadata if metadata is not None else json.dumps(spec)
    if text:
        helper.set_model_props(model, {METADATA_KEY: text})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected(weights: Sequence[float], values: Sequence[float], bias: float = 0.0) -> float:
    z = sum(w * v for w, v in zip(weights, values, strict=True)) + bias
    return 1.0 / (1.0 + math.exp(-z))
