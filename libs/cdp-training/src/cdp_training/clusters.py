"""Behavioural clusters (micro-segments): k-means on scaled behavioural features, served as `scores.cluster`.

    python -m cdp_training clusters describe [--model FILE.onnx]       what each cluster is, for naming it
    python -m cdp_training clusters train --store URL --cutoff DATE    a version from the platform's own data

The features (`traits.CLUSTER_FEATURES`: sessions, views, cart adds, orders, spend, recency, tenure,
support tickets, answers per channel) are counts, amounts and days: all >= 0 and heavy-tailed. Each is
read as log(1 + max(x, 0)) and standardised with the training rows' mean and standard deviation, so one
whale's revenue does not decide the clusters; k-means (scikit-learn, k-means++ with several starts) runs
on that. The ONNX graph does the same arithmetic (float32) and returns `cluster`, the nearest centroid's
number as int64 (the scoring service serves it as the score `cluster`, so a segment says
`scores.cluster = 3`), and `distances` to every centroid.

Cluster numbers are ordered by size (0 is the largest) so the same data gives the same numbering. A new
version trained beside a live one is renumbered to match live's centroids (the assignment of least total
distance between centroids in log space): cluster 3 keeps meaning what it meant where the data allows. Even
so a retrained clustering moves people and meanings, and segments are written against the numbers, so a
candidate is never promoted automatically: it goes to shadow with the reason, and a person promotes it
once the descriptions have been read.

Each cluster is described by its centroid: the share of people in it, and the three features whose
centroid coordinate (a z-score: how many population standard deviations the cluster's mean log value is
from the population's) is largest in size, with the cluster's and the population's medians in the
features' own units. The descriptions are kept in the version's spec (`training.clusters`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import kmeans_plusplus
from sklearn.metrics import adjusted_rand_score, silhouette_score

from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_scoring.domain import ModelSpec
from cdp_scoring.drift import build_reference
from cdp_training.graphs import OPSET, run
from cdp_training.pointintime import StoredProfile
from cdp_training.traits import CLUSTER_FEATURES, traits_for

NAME = "clusters"
VERSION = "1.1.0"  # 1.1.0: retrained with every shipped model (models.VERSION)
DEFAULT_K = 6
TOP = 3  # distinguishing features per cluster
SILHOUETTE_SAMPLE = 3000
STARTS = 10  # k-means++ starts; the fit of least inertia is kept
MAX_ITERATIONS = 300
INPUT = "features"
OUTPUTS = [
    {"score": "cluster", "output": "cluster", "index": 0, "meaning": "behavioural cluster number (0 = the largest)"}
]
DESCRIPTION = (
    "Behavioural clusters: k-means on log-scaled, standardised sessions, views, cart adds, orders, spend, "
    "recency, tenure, support tickets and answers per channel. The score is the cluster's number; each "
    "cluster's distinguishing features are in training.clusters (python -m cdp_training clusters describe)."
)


@dataclass(slots=True)
class Clustering:
    """A fitted clustering: the scaling and the centroids (in standardised log space), numbered by size."""

    names: tuple[str, ...]
    mean: np.ndarray  # [F] of log1p(max(x, 0)) over the training rows
    std: np.ndarray  # [F], 1 where a feature does not vary
    centroids: np.ndarray  # [k, F], standardised
    inertia: float

    @property
    def k(self) -> int:
        return len(self.centroids)

    def scale(self, X: np.ndarray) -> np.ndarray:
        return (np.log1p(np.maximum(np.asarray(X, dtype=np.float64), 0.0)) - self.mean) / self.std

    def assign(self, X: np.ndarray) -> np.ndarray:
        Z = self.scale(X)
        d2 = ((Z[:, None, :] - self.centroids[None, :, :]) ** 2).sum(axis=2)
        return d2.argmin(axis=1)


def _check(X: np.ndarray, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 50:
        raise InvalidArgument("k", f"{k!r} must be a whole number of clusters from 2 to 50")
    if len(X) < 10 * k:
        raise InvalidArgument("k", f"{len(X)} rows are too few for {k} clusters: at least {10 * k} (10 a cluster)")


def _lloyd(Z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's iterations from `centroids` to convergence: centroids, labels, inertia. Plain numpy on one
    thread, so the same rows and starts give the same bytes on any machine (scikit-learn's KMeans sums
    in OpenMP threads)."""
    for _ in range(MAX_ITERATIONS):
        d2 = ((Z[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        labels = d2.argmin(axis=1)
        moved = centroids.copy()
        for c in range(len(centroids)):
            members = Z[labels == c]
            if len(members):
                moved[c] = members.mean(axis=0)
        if np.allclose(moved, centroids, rtol=0.0, atol=1e-10):
            centroids = moved
            break
        centroids = moved
    d2 = ((Z[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    labels = d2.argmin(axis=1)
    return centroids, labels, float(d2[np.arange(len(Z)), labels].sum())


def fit(X: np.ndarray, names: Sequence[str], *, k: int = DEFAULT_K, seed: int = 7) -> Clustering:
    """k-means (k-means++ starts, Lloyd's iterations) on the scaled rows; clusters numbered by size,
    largest first (ties: by centroid), so the numbering depends on the data only."""
    _check(X, k)
    logs = np.log1p(np.maximum(np.asarray(X, dtype=np.float64), 0.0))
    mean = logs.mean(axis=0)
    std = logs.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    Z = (logs - mean) / std
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(STARTS):
        start, _indices = kmeans_plusplus(Z, k, random_state=int(rng.integers(2**31 - 1)))
        result = _lloyd(Z, start)
        if best is None or result[2] < best[2]:
            best = result
    assert best is not None
    centroids, labels, inertia = best
    sizes = np.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], tuple(np.round(centroids[c], 9))))
    return Clustering(tuple(names), mean, std, centroids[order], inertia)


def renumber_like(new: Clustering, live: Clustering) -> Clustering:
    """`new` with its clusters renumbered so each takes the number of the live cluster whose centroid is
    nearest (in log space, least total distance); clusters beyond live's count keep the next numbers."""
    if new.names != live.names:
        return new
    ours = new.centroids * new.std + new.mean
    theirs = live.centroids * live.std + live.mean
    cost = np.sqrt(((ours[:, None, :] - theirs[None, :, :]) ** 2).sum(axis=2))
    rows, cols = linear_sum_assignment(cost)
    target = dict(zip(rows.tolist(), cols.tolist(), strict=True))
    spare = iter(sorted(set(range(new.k)) - set(target.values())))
    numbers = [target[c] if c in target else next(spare) for c in range(new.k)]
    order = np.argsort(numbers)
    return Clustering(new.names, new.mean, new.std, new.centroids[order], new.inertia)


def from_spec(spec: ModelSpec) -> Clustering:
    """The clustering a version's spec records (`training.clustering`)."""
    stored = spec.training.get("clustering")
    if not isinstance(stored, Mapping):
        raise InvalidArgument("model", f"{spec.key} records no clustering (training.clustering): not a clusters model")
    return Clustering(
        tuple(f.name for f in spec.features),
        np.asarray(stored["mean"], dtype=np.float64),
        np.asarray(stored["std"], dtype=np.float64),
        np.asarray(stored["centroids"], dtype=np.float64),
        float(stored.get("inertia", 0.0)),
    )


def describe(clustering: Clustering, X: np.ndarray, top: int = TOP) -> list[dict[str, Any]]:
    """Per cluster: size, share, and the `top` features that set its centroid apart (largest |z|), with
    the cluster's and the population's medians in the feature's own units."""
    labels = clustering.assign(X)
    population = np.median(X, axis=0)
    out = []
    for c in range(clustering.k):
        members = X[labels == c]
        z = clustering.centroids[c]
        ranked = sorted(range(len(z)), key=lambda j: (-abs(z[j]), j))[:top]
        features = []
        for j in ranked:
            features.append(
                {
                    "feature": clustering.names[j],
                    "z": round(float(z[j]), 3),
                    "direction": "high" if z[j] > 0 else "low",
                    "cluster_median": round(float(np.median(members[:, j])), 3) if len(members) else None,
                    "population_median": round(float(population[j]), 3),
                }
            )
        out.append(
            {
                "cluster": c,
                "rows": len(members),
                "share": round(len(members) / max(1, len(X)), 4),
                "distinguishing": features,
                "summary": ", ".join(f"{f['direction']} {f['feature']}" for f in features),
            }
        )
    return out


def render(descriptions: Sequence[Mapping[str, Any]]) -> str:
    """The descriptions as a text table, a cluster to a block."""
    lines = []
    for item in descriptions:
        lines.append(f"cluster {item['cluster']}: {item['share']:.1%} of people ({item['rows']}) - {item['summary']}")
        for f in item["distinguishing"]:
            lines.append(
                f"    {f['feature']:<26} z {f['z']:+.2f}   median {f['cluster_median']} (everyone: {f['population_median']})"
            )
    return "\n".join(lines)


def _const(name: str, value: Any, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def graph(clustering: Clustering, *, input_name: str = INPUT) -> onnx.ModelProto:
    """features [N, F] -> cluster int64 [N] (nearest centroid), distances float [N, k] (Euclidean, scaled)."""
    width, k = len(clustering.names), clustering.k
    C = clustering.centroids.astype(np.float32)
    nodes = [
        helper.make_node("Max", [input_name, "zero"], ["nonneg"]),
        helper.make_node("Add", ["nonneg", "one"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["logs"]),
        helper.make_node("Sub", ["logs", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["z"]),
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2
        helper.make_node("Mul", ["z", "z"], ["z_sq"]),
        helper.make_node("ReduceSum", ["z_sq", "axis1"], ["z_norm"], keepdims=1),
        helper.make_node("MatMul", ["z", "centroids_t"], ["dot"]),
        helper.make_node("Mul", ["dot", "minus_two"], ["dot2"]),
        helper.make_node("Add", ["dot2", "z_norm"], ["partial"]),
        helper.make_node("Add", ["partial", "centroid_norms"], ["d2_raw"]),
        helper.make_node("Max", ["d2_raw", "zero"], ["d2"]),
        helper.make_node("Sqrt", ["d2"], ["distances"]),
        helper.make_node("ArgMin", ["d2"], ["cluster"], axis=1, keepdims=0),
    ]
    initializers = [
        _const("zero", 0.0),
        _const("one", 1.0),
        _const("minus_two", -2.0),
        _const("mean", clustering.mean),
        _const("std", clustering.std),
        _const("centroids_t", C.T),
        _const("centroid_norms", (C.astype(np.float64) ** 2).sum(axis=1)[None, :]),
        _const("axis1", [1], np.int64),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            NAME,
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", width])],
            [
                helper.make_tensor_value_info("cluster", TensorProto.INT64, ["N"]),
                helper.make_tensor_value_info("distances", TensorProto.FLOAT, ["N", k]),
            ],
            initializers,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def spec_template() -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "name": NAME,
            "version": "draft",
            "features": CLUSTER_FEATURES,
            "outputs": OUTPUTS,
            "computed_traits": traits_for(CLUSTER_FEATURES),
        }
    )


def record(clustering: Clustering) -> dict[str, Any]:
    """What a version keeps of its clustering (enough to recompute every assignment from the spec)."""
    return {
        "k": clustering.k,
        "transform": "z = (log(1 + max(x, 0)) - mean) / std; cluster = the nearest centroid of z",
        "mean": [float(v) for v in clustering.mean],
        "std": [float(v) for v in clustering.std],
        "centroids": [[float(v) for v in row] for row in clustering.centroids],
        "inertia": round(clustering.inertia, 3),
    }


def quality(clustering: Clustering, model: onnx.ModelProto, X_test: np.ndarray, *, seed: int) -> dict[str, Any]:
    """On rows the clustering never saw: does the graph agree with the arithmetic, how well separated are
    the clusters (silhouette on a sample), and would a fresh fit find the same groups (adjusted Rand index
    between this clustering's labels and a fit on the held-out rows alone)?"""
    expected = clustering.assign(X_test)
    served = run(model, X_test)["cluster"].astype(np.int64)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(X_test), size=min(SILHOUETTE_SAMPLE, len(X_test)), replace=False)
    Z = clustering.scale(X_test)
    refit = fit(X_test, clustering.names, k=clustering.k, seed=seed + 1)
    return {
        "holdout_rows": len(X_test),
        "onnx_agreement": round(float(np.mean(served == expected)), 5),
        "silhouette": round(float(silhouette_score(Z[sample], expected[sample])), 4),
        "stability_adjusted_rand": round(float(adjusted_rand_score(expected, refit.assign(X_test))), 4),
        "holdout_shares": [round(float(np.mean(expected == c)), 4) for c in range(clustering.k)],
    }


def version_name(cutoff: float, data_hash: str, k: int, seed: int) -> str:
    fitted = hashlib.sha256(f"{data_hash} k={k} seed={seed}".encode()).hexdigest()
    return f"t{datetime.fromtimestamp(cutoff, UTC):%Y%m%d}-{fitted[:10]}"


def data_hash(person_ids: Sequence[str], X: np.ndarray, cutoff: float) -> str:
    digest = hashlib.sha256(f"clusters cutoff={cutoff!r}".encode())
    digest.update("\x00".join(person_ids).encode())
    digest.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    return digest.hexdigest()


def default_cutoff(profiles: Sequence[StoredProfile]) -> float:
    """The UTC midnight before the last event the store holds (a clustering needs no label window)."""
    from cdp_training.pointintime import observed_until

    end = observed_until(profiles)
    if not math.isfinite(end):
        raise FailedPrecondition("the profile store holds no events to cluster", reason="no_data")
    return float(end - end % 86_400)


@dataclass(slots=True)
class ClusterRun:
    """A clustering version trained on the platform's own profiles, and what it says about itself."""

    data: bytes
    spec: ModelSpec
    decision: dict[str, Any]
    record: dict[str, Any]

    @property
    def version(self) -> str:
        return self.spec.version


def train_run(
    profiles: Sequence[StoredProfile],
    *,
    cutoff: float,
    k: int = DEFAULT_K,
    seed: int = 7,
    live: ModelSpec | None = None,
    holdout_share: float = 0.25,
) -> ClusterRun:
    """A clustering of the persons' behaviour as known at `cutoff` (point in time, `pointintime.feature_rows`).

    A quarter of the persons (by a hash of their id) are held out of the fit to judge it (`quality`). With a
    live version, clusters are renumbered to match it and the candidate stays in shadow: see the module
    docstring."""
    from cdp_training.learn import iso
    from cdp_training.models import OWNER, _finish, population_row
    from cdp_training.pointintime import feature_rows

    if not 0.0 < holdout_share < 0.9:
        raise InvalidArgument("holdout_share", f"{holdout_share!r} must be between 0 and 0.9")
    template = spec_template()
    person_ids, X, unborn = feature_rows(profiles, spec=template, cutoff=cutoff)
    held = np.array(
        [int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < holdout_share for p in person_ids],
        dtype=bool,
    )
    X_fit, X_test = X[~held], X[held]
    if len(X_test) < 2 * k:
        raise InvalidArgument("cutoff", f"{len(X)} persons had been seen by the cut-off: too few to cluster")
    names = [f.name for f in template.features]
    fitted = fit(X_fit, names, k=k, seed=seed)
    previous = from_spec(live) if live is not None and "clustering" in live.training else None
    if previous is not None:
        fitted = renumber_like(fitted, previous)
    model = graph(fitted)
    judged = quality(fitted, model, X_test, seed=seed)
    hashed = data_hash(person_ids, X, cutoff)
    version = version_name(cutoff, hashed, k, seed)
    if live is None:
        decision = {"promote": True, "reason": "no live version: the candidate is the model's first version"}
    else:
        decision = {
            "promote": False,
            "live_version": live.version,
            "reason": "a clustering is promoted by hand: segments name cluster numbers, so read the descriptions "
            f"(renumbered to match live {live.version}'s centroids) and Promote it when they still hold",
        }
    training = {
        "algorithm": f"k-means (k={k}, k-means++ starts, Lloyd's iterations) on log(1 + x), standardised",
        "data": "this platform's profile store, point in time (cdp_training.pointintime)",
        "window": {"history_until": iso(cutoff)},
        "rows": len(X_fit),
        "holdout_rows": len(X_test),
        "skipped": {"not_yet_seen": unborn},
        "data_hash": hashed,
        "seed": seed,
        "promotion": decision,
        "clustering": record(fitted),
        "clusters": describe(fitted, X_fit),
        "reference": build_reference(names, X_fit, {"cluster": fitted.assign(X_fit).astype(np.float64)}),
    }
    built = _finish(
        model,
        name=NAME,
        description=DESCRIPTION,
        features=[f.to_dict() for f in template.features],
        outputs=[o.to_dict() for o in template.outputs],
        training=training,
        quality=judged,
        test_row=population_row(X_fit),  # no customer's own row: it stays with the model for good
        version=version,
        computed_traits=list(template.computed_traits),
    )
    run_record = {"model": NAME, "version": version, "owner": OWNER, "training": training, "quality": judged}
    return ClusterRun(built.data, built.spec, decision, run_record)
