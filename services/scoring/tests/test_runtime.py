"""DeployModel's gate: a file that does not load, does not match its spec, or gives wrong or non-finite
scores on its test vector is refused with the reason; a good one scores exactly."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_kit.errors import InvalidArgument
from cdp_scoring.runtime import load_model
from cdp_testing.onnx_models import expected, logistic_model


def test_a_good_model_scores_rows_exactly():
    model = load_model(logistic_model(weights=[0.5, -0.25], bias=0.1))
    rows = np.asarray([[1, 2], [0, 0], [4, 1]], dtype=np.float32)
    scores = model.run(rows)
    assert scores.shape == (3, 1)
    for row, score in zip(rows, scores[:, 0], strict=True):
        assert score == pytest.approx(expected([0.5, -0.25], row, 0.1), abs=1e-6)
    assert model.spec.name == "churn_risk" and len(model.sha256) == 64


def refused(data) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        load_model(data)
    return caught.value


def test_garbage_and_empty_files_are_refused():
    assert "not a loadable ONNX model" in refused(b"this is not onnx").description
    assert refused(b"").field == "onnx"


def test_a_model_without_its_spec_is_refused():
    error = refused(logistic_model(metadata=""))
    assert "carries no 'cdp.model' metadata" in error.description


def test_a_spec_that_does_not_fit_the_graph_is_refused():
    error = refused(logistic_model(width=3, weights=[1, 1, 1]))
    assert error.field == "spec.features" and "takes 3 columns" in error.description
    error = refused(
        logistic_model(spec_overrides={"outputs": [{"score": "churn_risk", "output": "label", "index": 0}]})
    )
    assert error.field == "spec.outputs[0].output" and "no output 'label'" in error.description
    error = refused(logistic_model(spec_overrides={"input": "x"}))
    assert error.field == "spec.input"
    error = refused(
        logistic_model(spec_overrides={"outputs": [{"score": "churn_risk", "output": "probability", "index": 3}]})
    )
    assert error.field == "spec.outputs[0].index"


def test_a_test_vector_that_the_file_does_not_reproduce_is_refused():
    good = expected([0.5, 0.5], [1, 1])
    load_model(logistic_model(spec_overrides={"test_vector": {"features": [1, 1], "expected": {"churn_risk": good}}}))
    error = refused(
        logistic_model(spec_overrides={"test_vector": {"features": [1, 1], "expected": {"churn_risk": 0.1}}})
    )
    assert error.field == "spec.test_vector.expected.churn_risk"
    assert "do not belong together" in error.description


def test_non_finite_scores_on_the_default_vector_are_refused():
    # A NaN default feeds NaN through a linear model: the model cannot score a person without that field.
    error = refused(
        logistic_model(features=[{"name": "orders", "path": "computed.orders_90d", "default": None}], weights=[1.0])
    )
    assert "score 'churn_risk' is nan" in error.description
