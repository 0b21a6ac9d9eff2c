"""The `training.algorithm` line a model carries (its ONNX metadata, and report.json) says the trees it
was trained with: the 1.1.0 churn, propensity and next-best-channel models said 400 trees and 200 rounds
while they had 150 and 80."""

from __future__ import annotations

import pytest

from cdp_training import models
from cdp_training.models import NBC_TREES, TREES, Data


@pytest.fixture(scope="module")
def data(population, fields) -> Data:
    return Data(population, population, fields, fields, 11)


@pytest.mark.parametrize("builder", [models.churn_risk, models.purchase_propensity])
def test_the_engagement_models_say_the_trees_they_have(data, builder):
    algorithm = builder(data).spec.training["algorithm"]
    assert f"({TREES['n_estimators']} trees)" in algorithm


def test_next_best_channel_says_its_rounds_and_leaves(data):
    algorithm = models.next_best_channel(data).spec.training["algorithm"]
    assert f"({NBC_TREES['n_estimators']} rounds of {NBC_TREES['num_leaves']}-leaf trees)" in algorithm


def test_the_text_follows_the_parameters_not_a_copy_of_them(data, monkeypatch):
    monkeypatch.setitem(TREES, "n_estimators", 7)
    assert "(7 trees)" in models.churn_risk(data).spec.training["algorithm"]
    assert "(300 trees)" in models.fraud_risk(data).spec.training["algorithm"]  # its own, slower fit
