"""(for libs/cdp-training/tests) A trained version's spec names no customer: its test vector is no one's row."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_training import learn

from .conftest import profiles_in

DAY = 86_400.0


@pytest.fixture(scope="module")
def world(platform_store):
    """The 500 people test_clusters and test_monitoring read (written once a run: conftest). Any population
    with a positive in its evaluation slice shows the leak: the spec took that person's row as it was."""
    population, url = platform_store(500, 23)
    return population, profiles_in(url)


def test_a_trained_versions_test_vector_is_no_customers_feature_row(world):
    """The spec a training run registers (kept with every version for good, shown by GetModel, in the
    model file) carried spec.test_vector.features = evaluation.X[first positive]: one real customer's
    feature row at the cut-off (their orders, spend, recency, ...), which no deletion of that person
    removes and docs/privacy.md does not list."""
    population, profiles = world
    cutoff = population.cutoff - 30 * DAY
    result = learn.train_run("purchase_propensity", profiles, cutoff=cutoff, until=population.end, log=lambda _: None)
    vector = np.array([np.nan if v is None else v for v in result.built.spec.test_vector["features"]], dtype=np.float32)
    rows = np.concatenate([result.train.X, result.evaluation.X]).astype(np.float32)
    same = np.all((rows == vector) | (np.isnan(rows) & np.isnan(vector)), axis=1)
    assert not same.any(), f"the test vector is the feature row of {int(same.sum())} training/evaluation row(s)"


def test_a_trained_clusterings_test_vector_is_no_customers_feature_row(world):
    """The same for the clustering a training run fits on the store (it took the first row of the first
    row's cluster)."""
    from cdp_training import clusters
    from cdp_training.pointintime import feature_rows

    population, profiles = world
    cutoff = population.cutoff - 30 * DAY
    result = clusters.train_run(profiles, cutoff=cutoff, k=4)
    vector = np.array([np.nan if v is None else v for v in result.spec.test_vector["features"]], dtype=np.float32)
    rows = feature_rows(profiles, spec=clusters.spec_template(), cutoff=cutoff)[1].astype(np.float32)
    same = np.all((rows == vector) | (np.isnan(rows) & np.isnan(vector)), axis=1)
    assert not same.any(), f"the test vector is the feature row of {int(same.sum())} row(s)"
