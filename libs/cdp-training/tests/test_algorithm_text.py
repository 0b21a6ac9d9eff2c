"""The `training.algorithm` line a model carries (its ONNX metadata, and report.json) says the trees it
was trained with: the 1.1.0 churn, propensity and next-best-channel models said 400 trees and 200 rounds
while they had 150 and 80."""

from __future__ import annotations

from types import ModuleType

import pytest

# cdp_training.models imports LightGBM, scikit-learn and onnxmltools (~2.5 s): imported when a test here
# runs, not when every test worker collects this module.


@pytest.fixture(scope="module")
def models() -> ModuleType:
    from cdp_training import models

    return models


@pytest.fixture(scope="module")
def data(models, population, fields):
    return models.Data(population, population, fields, fields, 11)


@pytest.mark.parametrize("builder", ["churn_risk", "purchase_propensity"])
def test_the_engagement_models_say_the_trees_they_have(models, data, builder):
    algorithm = getattr(models, builder)(data).spec.training["algorithm"]
    assert f"({models.TREES['n_estimators']} trees)" in algorithm


def test_next_best_channel_says_its_rounds_and_leaves(models, data):
    algorithm = models.next_best_channel(data).spec.training["algorithm"]
    trees = models.NBC_TREES
    assert f"({trees['n_estimators']} rounds of {trees['num_leaves']}-leaf trees)" in algorithm


def test_the_text_follows_the_parameters_not_a_copy_of_them(models, data, monkeypatch):
    monkeypatch.setitem(models.TREES, "n_estimators", 7)
    assert "(7 trees)" in models.churn_risk(data).spec.training["algorithm"]
    assert "(300 trees)" in models.fraud_risk(data).spec.training["algorithm"]  # its own, slower fit
