"""The whole training run: simulate two populations, compute their features through the profile domain,
train and judge every model, write the ONNX files and `report.json`.

The training population and the held-out one come from different seeds (seed and seed + 1), so every
figure is measured on people the model never saw. One seed gives the same populations, features and
models, hence the same report.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cdp_scoring
from cdp_training.dataset import population_fields
from cdp_training.models import BUILDERS, Built, Data
from cdp_training.simulator import simulate
from cdp_training.traits import all_features, traits_for

# Where the scoring service loads its shipped models from (`cdp_scoring.modelstore.SHIPPED`); the workspace
# installs cdp-scoring editable, so this is the folder in the repository. Not imported from modelstore:
# that module pulls in the kit's storage port, which training has no use for.
MODELS_DIR = Path(cdp_scoring.__file__).resolve().parent / "models"
REPORT = "report.json"
DEFAULT_SEED = 7
DEFAULT_POPULATION = 16_000
DEFAULT_HOLDOUT = 8_000

# What the shipped models must reach on held-out data: (model, path in its quality figures, min or max, bound).
FLOORS: tuple[tuple[str, str, str, float], ...] = (
    ("churn_risk", "auc", "min", 0.75),
    ("churn_risk", "holdout.ece_10_bins", "max", 0.05),
    ("purchase_propensity", "auc", "min", 0.75),
    ("purchase_propensity", "holdout.ece_10_bins", "max", 0.05),
    ("fraud_risk", "auc", "min", 0.90),
    ("fraud_risk", "precision_at_recall_0.8", "min", 0.50),
    ("fraud_anomaly", "auc", "min", 0.70),
    ("clv", "bgnbd_parameter_recovery.max_relative_error", "max", 0.10),
    ("clv", "onnx_vs_reference_max_error", "max", 1e-4),
    ("clv", "hyp2f1_series.max_relative_error_vs_scipy", "max", 1e-4),
    ("next_best_channel", "top1_gain_over_baseline", "min", 0.0),
    ("next_best_channel", "send_hour_gain_over_baseline", "min", 0.0),
    # the served graph assigns what the clustering assigns; a fit on the held-out people finds the same groups
    ("clusters", "onnx_agreement", "min", 0.999),
    ("clusters", "stability_adjusted_rand", "min", 0.7),
)


def lookup(quality: Mapping[str, Any], path: str) -> Any:
    """A value in nested quality figures by dotted path; keys may contain dots themselves (greedy match)."""
    if path in quality:
        return quality[path]
    head, _, rest = path.partition(".")
    while rest:
        if head in quality and isinstance(quality[head], Mapping):
            return lookup(quality[head], rest)
        more, _, rest = rest.partition(".")
        head = f"{head}.{more}"
    raise KeyError(path)


def check_floors(models: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each floor with the value reached and whether it holds."""
    out = {}
    for model, path, kind, bound in FLOORS:
        value = lookup(models[model]["quality"], path)
        met = value >= bound if kind == "min" else value <= bound
        out[f"{model}.{path}"] = {kind: bound, "value": value, "met": bool(met)}
    return out


def train_all(
    *,
    seed: int = DEFAULT_SEED,
    population: int = DEFAULT_POPULATION,
    holdout: int = DEFAULT_HOLDOUT,
    out_dir: Path | None = MODELS_DIR,
    workers: int | None = None,
    recovery_customers: int = 50_000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every model; write `<model>.onnx` and report.json to `out_dir` (None: write nothing)."""
    started = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - started:6.1f}s] {message}")

    train = simulate(population, seed)
    test = simulate(holdout, seed + 1)
    step(f"simulated {population} + {holdout} people ({train.table['t'].size + test.table['t'].size} events)")
    definitions: dict[str, Any] = {}
    for features in all_features():
        for trait in traits_for(features):
            definitions.setdefault(trait["name"], trait)
    train_fields = population_fields(train, list(definitions.values()), workers=workers)
    test_fields = population_fields(test, list(definitions.values()), workers=workers)
    step(f"computed {len(definitions)} computed traits through the profile domain")
    data = Data(train, test, train_fields, test_fields, seed, recovery_customers)
    built: dict[str, Built] = {}
    for builder in BUILDERS:
        model = builder(data)
        built[model.spec.name] = model
        step(f"trained {model.spec.name}")
    report = build_report(built, data, definitions)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, model in built.items():
            (out_dir / f"{name}.onnx").write_bytes(model.data)
        (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        step(f"wrote {len(built)} models and {REPORT} to {out_dir}")
    report["_built"] = built  # for callers in-process; not written
    return report


def build_report(built: Mapping[str, Built], data: Data, definitions: Mapping[str, Any]) -> dict[str, Any]:
    models: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for name, model in built.items():
        spec = model.spec
        models[name] = {
            "file": f"{name}.onnx",
            "sha256": hashlib.sha256(model.data).hexdigest(),
            "version": spec.version,
            "description": spec.description,
            "features": [{"name": f.name, "path": f.path, "transform": f.transform} for f in spec.features],
            "computed_traits": [trait["name"] for trait in spec.computed_traits],
            "scores": list(spec.score_names),
            "training": dict(spec.training),
            "quality": dict(spec.quality),
        }
        for output in spec.outputs:
            scores[output.score] = {
                "model": name,
                "output": output.output,
                "index": output.index,
                "meaning": output.meaning,
            }
    return {
        "command": (
            f"python -m cdp_training --seed {data.seed} --population {data.train.size} --holdout {data.test.size}"
        ),
        "seed": data.seed,
        "populations": {
            "train": {"seed": data.train.seed, "people": data.train.size, "events": int(data.train.table["t"].size)},
            "holdout": {"seed": data.test.seed, "people": data.test.size, "events": int(data.test.table["t"].size)},
        },
        "floors": check_floors(models),
        "scores": scores,
        "computed_traits": dict(definitions),
        "models": models,
    }
