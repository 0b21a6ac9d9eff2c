"""The shipped models' drift references: the distribution of each one's training rows and of its scores
on them (`cdp_scoring.drift`), written to `models/reference.json` beside the files.

    python -m cdp_training reference [--seed 7] [--population 16000] [--workers N]

A version trained on the platform's own data carries its reference in its spec (`learn.train_run`).
The shipped files predate that, and their bytes (hence their versions) must not change for it, so their
references are computed again from their training population: the same simulated customers (seed and
size of the shipped run, `report.json`), the same profile fields, each model's rows as its builder in
`models.py` takes them (engagement and CLV models at the cut-off, the fraud models at each person's
fraud scoring moment, next best channel for the persons who answered), scored by the shipped file
itself. A reference names its model's version; the scoring service uses it only for that version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cdp_scoring.drift import build_reference
from cdp_scoring.runtime import load_model
from cdp_training.dataset import PopulationFields, matrix, population_fields
from cdp_training.pipeline import DEFAULT_POPULATION, DEFAULT_SEED, MODELS_DIR
from cdp_training.simulator import Population, simulate
from cdp_training.traits import all_features, traits_for

REFERENCES = "reference.json"


def _rows(name: str, spec, fields: PopulationFields, population: Population) -> np.ndarray:
    """The training rows of shipped model `name`, as its builder in models.py takes them."""
    if name in ("fraud_risk", "fraud_anomaly"):
        return matrix(spec, fields.at_fraud, population.fraud_at)
    people = fields.at_cutoff
    if name == "next_best_channel":
        people = [people[i] for i in np.flatnonzero(population.outcomes.response_channel >= 0)]
    return matrix(spec, people, population.cutoff)


def shipped_references(
    *,
    seed: int = DEFAULT_SEED,
    population: int = DEFAULT_POPULATION,
    workers: int | None = None,
    models_dir: Path = MODELS_DIR,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """{"command", "seed", "population", "models": {name: {"version", "sha256", "reference"}}}."""
    train = simulate(population, seed)
    definitions: dict[str, Any] = {}
    for features in all_features():
        for trait in traits_for(features):
            definitions.setdefault(trait["name"], trait)
    fields = population_fields(train, list(definitions.values()), workers=workers)
    log(f"computed the fields of {population} simulated customers (seed {seed})")
    models: dict[str, Any] = {}
    for path in sorted(models_dir.glob("*.onnx")):
        data = path.read_bytes()
        loaded = load_model(data)
        spec = loaded.spec
        X = _rows(spec.name, spec, fields, train)
        scores = loaded.run(X)
        reference = build_reference(
            [f.name for f in spec.features], X, {name: scores[:, j] for j, name in enumerate(spec.score_names)}
        )
        models[spec.name] = {
            "version": spec.version,
            "sha256": hashlib.sha256(data).hexdigest(),
            "reference": reference,
        }
        log(f"{spec.name} {spec.version}: {len(X)} rows")
    return {
        "command": f"python -m cdp_training reference --seed {seed} --population {population}",
        "seed": seed,
        "population": population,
        "models": models,
    }


def write_references(references: dict[str, Any], models_dir: Path = MODELS_DIR) -> Path:
    path = models_dir / REFERENCES
    path.write_text(json.dumps(references, indent=1) + "\n")
    return path
