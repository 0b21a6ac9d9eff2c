"""Behavioural clusters: the served graph gives the clustering's own assignments, the score works in a
segment condition, each cluster is described by what sets it apart, numbers keep their meaning across
versions, and a clustering trained on the profile store sees only what was known at the cut-off."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import MemoryStore
from cdp_lang import ProfileView, compile_condition
from cdp_scoring.runtime import load_model
from cdp_training import clusters
from cdp_training.__main__ import main
from cdp_training.models import Data
from cdp_training.models import clusters as build_shipped
from cdp_training.platformdata import write_population
from cdp_training.pointintime import read_profiles
from cdp_training.traits import CLUSTER_FEATURES, COMPUTED_TRAITS

from .conftest import profiles_in

NAMES = [f["name"] for f in CLUSTER_FEATURES]
DAY = 86_400.0


def planted(rng: np.random.Generator, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Three groups of shoppers: browsers (many sessions, no orders), buyers (orders and revenue), app
    users (app sessions and in-app clicks); everything else small noise."""
    X = rng.poisson(0.3, size=(n, len(NAMES))).astype(np.float32)
    group = np.arange(n) % 3
    col = {name: j for j, name in enumerate(NAMES)}
    X[group == 0, col["sessions_30d"]] += rng.poisson(25, (group == 0).sum())
    X[group == 1, col["orders_365d"]] += rng.poisson(12, (group == 1).sum())
    X[group == 1, col["revenue_365d"]] += rng.gamma(20, 40, (group == 1).sum()).astype(np.float32)
    X[group == 2, col["app_sessions_30d"]] += rng.poisson(20, (group == 2).sum())
    X[group == 2, col["inapp_clicks_90d"]] += rng.poisson(15, (group == 2).sum())
    return X, group


def test_the_graph_assigns_what_the_clustering_assigns_and_describes_what_sets_each_cluster_apart():
    rng = np.random.default_rng(3)
    X, group = planted(rng)
    fitted = clusters.fit(X, NAMES, k=3, seed=1)
    model = clusters.graph(fitted)
    from cdp_training.graphs import run

    served = run(model, X)["cluster"]
    assert served.dtype == np.int64
    assert np.array_equal(served, fitted.assign(X))
    # the planted groups are found, one cluster each
    assert {len(set(served[group == g])) for g in range(3)} == {1}
    described = {item["cluster"]: item for item in clusters.describe(fitted, X)}
    tops = {
        g: [f["feature"] for f in described[int(served[group == g][0])]["distinguishing"] if f["direction"] == "high"]
        for g in range(3)
    }
    assert "sessions_30d" in tops[0]
    assert {"orders_365d", "revenue_365d"} <= set(tops[1])
    assert {"app_sessions_30d", "inapp_clicks_90d"} <= set(tops[2])
    assert sum(item["share"] for item in described.values()) == pytest.approx(1.0, abs=1e-3)
    # largest first
    assert [item["rows"] for item in described.values()] == sorted(
        (i["rows"] for i in described.values()), reverse=True
    )


def test_a_new_version_keeps_the_live_numbers_where_the_clusters_are_the_same():
    rng = np.random.default_rng(5)
    X1, _ = planted(rng)
    X2, _ = planted(rng, 900)
    live = clusters.fit(X1, NAMES, k=3, seed=1)
    # a fit on other data that happens to number its clusters differently
    new = clusters.fit(X2, NAMES, k=3, seed=9)
    shuffled = clusters.Clustering(new.names, new.mean, new.std, new.centroids[[2, 0, 1]], new.inertia)
    renumbered = clusters.renumber_like(shuffled, live)
    assert np.array_equal(renumbered.assign(X1), live.assign(X1))


def test_k_is_checked_by_name():
    X, _ = planted(np.random.default_rng(1), 50)
    with pytest.raises(InvalidArgument) as caught:
        clusters.fit(X, NAMES, k=8)
    assert caught.value.field == "k"
    with pytest.raises(InvalidArgument):
        clusters.fit(X, NAMES, k=1)


@pytest.fixture(scope="module")
def shipped_like(population, fields):
    """The shipped builder on the small shared population (trained and judged on the same people here)."""
    return build_shipped(Data(population, population, fields, fields, 11))


def test_the_shipped_builder_makes_a_file_the_scoring_service_serves_and_a_segment_can_read(
    shipped_like, population, fields
):
    loaded = load_model(shipped_like.data)  # scoring's deploy gate
    assert loaded.spec.score_names == ("cluster",)
    rows = loaded.assembler.matrix(fields.at_cutoff, population.cutoff)
    scores = loaded.run(rows)[:, 0]  # what the scoring service writes as scores.cluster
    assert set(np.unique(scores)) <= set(range(clusters.DEFAULT_K))
    assert np.array_equal(scores, scores.round())
    three = compile_condition("scores.cluster = 3")
    chosen = [three.evaluate(ProfileView.of(scores={"cluster": float(s)}), population.cutoff) for s in scores]
    assert np.array_equal(np.array(chosen), scores == 3) and any(chosen)
    quality = shipped_like.spec.quality
    assert quality["onnx_agreement"] == 1.0
    assert len(shipped_like.spec.training["clusters"]) == clusters.DEFAULT_K
    # the spec says how to recompute every assignment
    again = clusters.from_spec(shipped_like.spec)
    assert np.array_equal(again.assign(rows), scores.astype(int))


def test_describe_prints_each_cluster_of_a_file(tmp_path, shipped_like, capsys):
    path = tmp_path / "clusters.onnx"
    path.write_bytes(shipped_like.data)
    assert main(["clusters", "describe", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    for c in range(clusters.DEFAULT_K):
        assert f"cluster {c}: " in out
    assert main(["clusters", "describe", "--model", str(path), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert [len(item["distinguishing"]) for item in described] == [clusters.TOP] * clusters.DEFAULT_K


@pytest.fixture(scope="module")
def store_world(platform_store):
    """500 simulated customers' profiles as the profile service stores them (written once a run: conftest)."""
    population, url = platform_store(500, 23)
    return population, profiles_in(url)


def test_a_clustering_trained_on_the_store_sees_nothing_after_its_cutoff(store_world):
    population, profiles = store_world
    cutoff = population.cutoff - 30 * DAY
    first = clusters.train_run(profiles, cutoff=cutoff, k=4)
    assert first.decision["promote"] is True
    # the same store holding only what happened by the cut-off gives the same clustering, byte for byte
    early = MemoryStore()
    asyncio.run(write_population(early, population, list(COMPUTED_TRAITS.values()), until=cutoff))
    again = clusters.train_run(asyncio.run(read_profiles(early)), cutoff=cutoff, k=4)
    assert again.data == first.data and again.version == first.version
    # a later version is renumbered to live's clusters and waits in shadow for a person to promote it
    later = clusters.train_run(profiles, cutoff=population.cutoff, k=4, live=first.spec)
    assert later.decision["promote"] is False and first.version in later.decision["reason"]
    assert load_model(later.data).spec.training["clusters"]


def test_clusters_train_command_writes_the_version_and_its_record(store_world, tmp_path, monkeypatch, capsys):
    population, profiles = store_world

    async def read_store(url: str):
        assert url == "memory://"
        return profiles

    monkeypatch.setattr("cdp_training.learn.read_store", read_store)
    cutoff = f"{np.datetime64(int(population.cutoff), 's')}Z"
    assert (
        main(["clusters", "train", "--store", "memory://", "--cutoff", cutoff, "--k", "4", "--out", str(tmp_path)]) == 0
    )
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and written[0].startswith("clusters-t") and written[0].endswith(".json")
    record = json.loads((tmp_path / written[0]).read_text())
    assert record["training"]["clustering"]["k"] == 4
    assert "keep in shadow" not in capsys.readouterr().out
