"""bench/models — the shipped models' quality on a held-out simulated population, each against a transparent
heuristic a CRM team would use without ML, computed from the same profile fields, in the same run.

The population is fresh (seed 11: training used 7, its held-out figures 8), simulated by the training
package, and its profile fields are computed by the profile domain with the computed-trait definitions the
shipped specs carry (`cdp_training.dataset`). Every score comes from the shipped ONNX file as the
service serves it: `cdp_scoring.runtime.load_model`, rows from its `assembler`, scores from its `run`. Each
model is scored at the moment the training package evaluates it: churn, propensity, CLV and next best
channel at the cutoff; fraud at the person's fraud moment (the order being placed; a fraudster's last
order of the burst), one `now` per row.

A heuristic baseline is the best of a few single-field rules (listed in each result's params), chosen on
this same population: the choice flatters the baseline, never the model.

model-churn          AUC of churn_risk on the label it was trained for, lapsed a month on (`Outcomes.lapsed`: no
                     activity in the 60 days after the next 30); baseline: recency of the last session, or
                     fewest sessions in 90 days, or recency of the last order (the strongest)
model-propensity     AUC of purchase_propensity; baseline: product views in 7 days, cart adds in 7 days,
                     orders in 90 days, or recency of the last order (the strongest)
model-fraud          AUC of fraud_risk; baseline: devices_24h + geo_mismatch_24h, or the strongest single
                     24-hour signal
model-fraud-anomaly  AUC of fraud_anomaly (unsupervised isolation forest), same baseline as model-fraud
model-clv            MAE of BG/NBD expected orders in the 90 days after the cutoff (the shipped parameters;
                     the served graph checked against them) vs actual orders, buyers only; baseline: the
                     naive run rate (past orders per day x 90 days, the best of three rates); params: the
                     BG/NBD and Gamma-Gamma parameter-recovery errors on a fresh seed
model-nbc            top-1 accuracy of next_best_channel among people who answer in the 30 days after the
                     cutoff; baseline: the channel answered most in the last 90 days (email when none)
training-set         seconds to build a point-in-time training set (`cdp_training.pointintime`: churn_risk's
                     features at the cutoff, labelled with the lapse the product trains and judges churn on,
                     no activity in the 60 days after the next 30 (`learn.TRAINABLE`)) from a profile store
                     holding a simulated population (seed 11, CDP_BENCH_TRAINING_SET_PERSONS persons, default
                     5,000; the issue's figure is 100,000) in a SQLite file in the temporary folder (written
                     once per size, seed and simulator source, then reused; CDP_BENCH_TRAINING_SET_STORE
                     another store URL), read as it streams (`training_set_from_store`: 500 profiles at a
                     time; params.peak_rss_mb / build_memory_mb: the process's peak while it runs); up to
                     CDP_BENCH_WHOLE_STORE_PERSONS (20,000) the whole-store read it replaced runs too
                     (params.whole_store_seconds, same data hash asserted); baseline: DuckDB computing the same
                     rows over the same events, trait and consent histories held as in-memory tables (windowed
                     conditional aggregates, ASOF joins for plan and consent): the physical floor for the
                     job. The rows of both are compared cell by cell and their labels (the bench fails
                     unless 0 cells differ: params.mismatched_cells, labels_equal)
model-regime         AUC of churn_risk retrained on the platform's own data after a regime change half-way
                     through a simulated population's span (`cdp_training.regime`: app users' dropout hazard x4,
                     everyone else's x0.4, abrupt), on the slice after the change; baseline: the same run on a
                     population that always lived in the new regime, scored on the same rows. params: the
                     frozen model's AUC after the change and on the twin population in which nothing changed
                     (same persons and cut-off). CDP_BENCH_REGIME_PERSONS a population

clv-cdnow-holdout    CLV on real transactions (`cdp_training.clvfit`) on the CDNOW sample that the `lifetimes`
                     package ships (6,919 orders of 2,357 customers, Fader, Hardie & Lee 2005; a dev dependency,
                     only its data file is read), read as a transaction export: BG/NBD + Gamma-Gamma fitted on
                     weeks 1-39, MAE per customer of the repeat transactions in weeks 40-78; baseline: the naive
                     run rate (calibration repeat transactions / T x 39 weeks). params: each parameter's relative
                     error against the published table (BG/NBD r, alpha, a, b; Gamma-Gamma p, q, gamma), the
                     holdout predicted / actual, the by-frequency table and the tracking's end points
clv-cdnow-fit        seconds to fit both models on those summaries (median of CDP_BENCH_CLV_REPEATS runs);
                     baseline: lifetimes' BetaGeoFitter + GammaGammaFitter on the same summaries in the same run
                     (the reference implementation a data scientist would reach for), or, when it cannot be
                     imported, the same likelihood summed by a plain Python loop per customer in the same optimiser

    make bench-models     # writes bench/results/model-*.json, training-set.json and clv-cdnow-*.json; needs make models
    .venv/bin/python bench/bench_models.py --only training-set
    .venv/bin/python bench/bench_models.py --only regime
    .venv/bin/python bench/bench_models.py --only clv      # seconds; needs neither make models nor a simulation
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from benchlib import write_result

from cdp_kit.storage import Store, open_store
from cdp_scoring.domain import ModelSpec
from cdp_scoring.modelstore import SHIPPED
from cdp_scoring.runtime import LoadedModel, load_model
from cdp_training import metrics
from cdp_training import simulator as simulator_module
from cdp_training.bgnbd import BgNbd, GammaGamma, summaries
from cdp_training.dataset import population_fields
from cdp_training.graphs import reference_clv
from cdp_training.labels import LabelSpec
from cdp_training.learn import TRAINABLE
from cdp_training.models import CLV_HORIZON_DAYS, FRAUD_RECALL, parameter_recovery
from cdp_training.platformdata import write_population
from cdp_training.pointintime import StoredProfile, iter_profiles, read_profiles, training_set, training_set_from_store
from cdp_training.simulator import CHANNELS, CHURN_DAYS, LAPSE_GRACE_DAYS, Population, simulate
from cdp_training.traits import ENGAGEMENT_FEATURES, traits_for

SEED = 11  # never used by training (7: train, 8: held-out figures in report.json)
PEOPLE = 12_000  # 80-90 s of profile-domain work on two cores; ~300 fraudsters, ~9,000 buyers, ~5,500 responders
RECOVERY_CUSTOMERS = 50_000  # as many as training checks recovery with
MODELS = ("churn_risk", "purchase_propensity", "clv", "fraud_risk", "fraud_anomaly", "next_best_channel")
DAY = 86_400.0
NEVER = 1e6  # days since an event that never happened: later than any real one (AUC reads ranks only)
HOLDOUT_DAYS = CHURN_DAYS  # the simulation's outcome window: orders after the cutoff are known for 90 days
TRAINING_SET_PERSONS = int(os.environ.get("CDP_BENCH_TRAINING_SET_PERSONS", "5000"))  # ~1 min on 2 cores
# Where the simulated profile store lives: by default a SQLite file in the temporary folder, named by the
# size, the seed and the simulator's source (written once, reused while those stay). A memory:// store
# holds every timeline record in the process (about 0.5 GB a 1,000 persons): it does not fit 100,000.
TRAINING_SET_STORE = os.environ.get("CDP_BENCH_TRAINING_SET_STORE", "")
# Up to this many persons the whole-store read (read_profiles, then training_set) runs too, for comparison
WHOLE_STORE_PERSONS = int(os.environ.get("CDP_BENCH_WHOLE_STORE_PERSONS", "20000"))
# Processes turning streamed batches into rows while the store is read (1: all in this process)
TRAINING_SET_WORKERS = int(os.environ.get("CDP_BENCH_TRAINING_SET_WORKERS", "1"))
REGIME_PERSONS = int(os.environ.get("CDP_BENCH_REGIME_PERSONS", "4000"))  # per population; ~3 min a 1,000


def shipped_models() -> dict[str, LoadedModel]:
    missing = [name for name in MODELS if not (SHIPPED / f"{name}.onnx").exists()]
    if missing:
        raise SystemExit(
            f"missing shipped model(s) {', '.join(missing)} in {SHIPPED}: run `make models` first, then this again"
        )
    return {name: load_model((SHIPPED / f"{name}.onnx").read_bytes()) for name in MODELS}


def computed_definitions(models: Mapping[str, LoadedModel]) -> list[dict[str, Any]]:
    """The computed traits the shipped specs ask the profile service to define (one definition per name)."""
    definitions: dict[str, dict[str, Any]] = {}
    for model in models.values():
        for trait in model.spec.computed_traits:
            definitions.setdefault(trait["name"], dict(trait))
    return list(definitions.values())


def served(model: LoadedModel, fields: Sequence[Mapping[str, Any]], now: float | np.ndarray) -> dict[str, np.ndarray]:
    """Scores by name, as the service computes them: the model's own assembler at `now` (one per row when an
    array), then its run()."""
    assembler = model.assembler
    if np.ndim(now) == 0:
        rows = assembler.matrix(fields, float(now))
    else:
        rows = np.array([assembler.row(person, float(at)) for person, at in zip(fields, now, strict=True)])
    scores = model.run(rows.astype(np.float32))
    return {name: scores[:, j] for j, name in enumerate(model.spec.score_names)}


# --- the heuristics: one number per person from the flat profile fields ---------------------------------


def count(fields: Sequence[Mapping[str, Any]], trait: str) -> np.ndarray:
    return np.array([float(person.get(f"computed.{trait}", 0.0)) for person in fields])


def days_since(fields: Sequence[Mapping[str, Any]], trait: str, now: float) -> np.ndarray:
    """Days from the trait's time to `now`; NEVER when the person has none."""
    at = np.array([float(person.get(f"computed.{trait}", np.nan)) for person in fields])
    return np.where(np.isnan(at), NEVER, (now - at) / DAY)


def strongest(y: np.ndarray, candidates: Mapping[str, np.ndarray]) -> tuple[str, float, dict[str, float]]:
    """The candidate score with the best AUC on `y`: its name, its AUC, and every candidate's AUC."""
    aucs = {name: round(metrics.auc(y, score), 4) for name, score in candidates.items()}
    best = max(aucs, key=aucs.__getitem__)
    return best, metrics.auc(y, candidates[best]), aucs


# --- the models --------------------------------------------------------------------------------------


def bench_engagement(
    model: LoadedModel, population: Population, fields: Sequence[Mapping[str, Any]], label: np.ndarray, candidates
) -> dict[str, Any]:
    p = served(model, fields, population.cutoff)[model.spec.score_names[0]]
    y = label.astype(int)
    baseline, baseline_auc, aucs = strongest(y, candidates)
    return {
        "value": metrics.auc(y, p),
        "baseline": baseline_auc,
        "params": {
            **metrics.binary_report(y, p),
            "rows": len(y),
            "scored_at": "the cutoff (2025-06-01), as training evaluates it",
            "baseline_heuristic": baseline,
            "baseline_candidates_auc": aucs,
            "report_json_auc": model.spec.quality.get("auc"),
        },
    }


def bench_churn(model: LoadedModel, population: Population, fields: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    cutoff = population.cutoff
    candidates = {  # higher = more likely to churn
        "days since the last session": days_since(fields, "last_session_at", cutoff),
        "fewest sessions in 90 days (-sessions_90d)": -count(fields, "sessions_90d"),
        "days since the last order": days_since(fields, "last_order_at", cutoff),
    }
    # judged on what it was trained to predict (models.churn_risk, learn.TRAINABLE): a lapse a month on, not
    # "no activity in the next 90 days", for which its probabilities are not calibrated
    result = bench_engagement(model, population, fields, population.outcomes.lapsed, candidates)
    result["params"]["label"] = (
        f"lapsed: no activity in the {CHURN_DAYS - LAPSE_GRACE_DAYS} days after the first {LAPSE_GRACE_DAYS} "
        "after the cutoff"
    )
    return result


def bench_propensity(model: LoadedModel, population: Population, fields: Sequence[Mapping[str, Any]]) -> dict:
    cutoff = population.cutoff
    candidates = {  # higher = more likely to order in the next 30 days
        "product views in 7 days": count(fields, "product_views_7d"),
        "cart adds in 7 days": count(fields, "cart_adds_7d"),
        "orders in 90 days": count(fields, "orders_90d"),
        "recency of the last order (-days since)": -days_since(fields, "last_order_at", cutoff),
    }
    return bench_engagement(model, population, fields, population.outcomes.purchased, candidates)


def bench_fraud(models: Mapping[str, LoadedModel], population: Population, fields) -> tuple[dict, dict]:
    """fraud_risk and fraud_anomaly, each person scored at their fraud moment (per-row now), as training does."""
    y = population.outcomes.is_fraudster.astype(int)
    risk = served(models["fraud_risk"], fields, population.fraud_at)["fraud_risk"]
    anomaly = served(models["fraud_anomaly"], fields, population.fraud_at)["fraud_anomaly"]
    signals = {
        name: count(fields, name)
        for name in (
            "devices_24h",
            "geo_mismatch_24h",
            "cards_24h",
            "countries_24h",
            "accounts_24h",
            "shared_device_accounts_24h",
        )
    }
    candidates = {"devices_24h + geo_mismatch_24h": signals["devices_24h"] + signals["geo_mismatch_24h"], **signals}
    baseline, baseline_auc, aucs = strongest(y, candidates)
    baseline_precision, _ = metrics.precision_at_recall(y, candidates[baseline], FRAUD_RECALL)
    precision, threshold = metrics.precision_at_recall(y, risk, FRAUD_RECALL)
    common = {
        "rows": len(y),
        "fraudsters": int(y.sum()),
        "base_rate": round(float(y.mean()), 4),
        "scored_at": "the person's fraud moment: the order being placed (fraudsters: the last order of their burst)",
        "baseline_heuristic": baseline,
        "baseline_candidates_auc": aucs,
        f"baseline_precision_at_recall_{FRAUD_RECALL}": round(baseline_precision, 4),
    }
    fraud = {
        "value": metrics.auc(y, risk),
        "baseline": baseline_auc,
        "params": {
            **common,
            f"precision_at_recall_{FRAUD_RECALL}": round(precision, 4),
            "threshold_at_that_recall": round(threshold, 4),
            "brier": round(metrics.brier(y, risk), 4),
            "ece_10_bins": round(metrics.expected_calibration_error(y, risk), 4),
            "fraud_anomaly_auc": round(metrics.auc(y, anomaly), 4),
            "report_json_auc": models["fraud_risk"].spec.quality.get("auc"),
            f"report_json_precision_at_recall_{FRAUD_RECALL}": models["fraud_risk"].spec.quality.get(
                f"precision_at_recall_{FRAUD_RECALL}"
            ),
        },
    }
    anomaly_precision, _ = metrics.precision_at_recall(y, anomaly, FRAUD_RECALL)
    anomaly_result = {
        "value": metrics.auc(y, anomaly),
        "baseline": baseline_auc,
        "params": {
            **common,
            f"precision_at_recall_{FRAUD_RECALL}": round(anomaly_precision, 4),
            "note": "unsupervised (trained without labels); AUC against the simulated truth",
            "report_json_auc": models["fraud_anomaly"].spec.quality.get("auc"),
        },
    }
    return fraud, anomaly_result


def bench_clv(model: LoadedModel, population: Population, fields: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Expected orders in the 90 days after the cutoff (all the simulation can check; the served score is for
    365 days) from the shipped BG/NBD parameters, on the served model's own rows; the served graph is checked
    to give the same BG/NBD outputs as those parameters, so the figure is the shipped model's."""
    cutoff = population.cutoff
    rows = model.assembler.matrix(fields, cutoff).astype(np.float64)
    scores = served(model, fields, cutoff)
    bgnbd = BgNbd(**model.spec.quality["bgnbd"])
    reference = reference_clv(bgnbd, GammaGamma(**model.spec.quality["gamma_gamma"]), rows, CLV_HORIZON_DAYS)
    served_error = max(  # as training measures it: relative above 1, absolute below
        float(np.max(np.abs(scores[f"clv_{name}"] - reference[output]) / np.maximum(1.0, np.abs(reference[output]))))
        for name, output in (
            ("p_alive", "p_alive"),
            ("expected_purchases_365d", "expected_purchases"),
            ("expected_order_value", "expected_order_value"),
            ("value_365d", "clv"),
        )
    )
    x, t_x, T = summaries(rows[:, 0], rows[:, 1], rows[:, 2])
    buyers = rows[:, 0] > 0
    predicted = bgnbd.expected(HOLDOUT_DAYS / 7, x[buyers], t_x[buyers], T[buyers])
    actual = population.outcomes.orders_after[buyers].astype(np.float64)
    buyer_fields = [person for person, bought in zip(fields, buyers, strict=True) if bought]
    orders_total = count(buyer_fields, "orders_total")
    since_first = days_since(buyer_fields, "first_order_at", cutoff)
    run_rates = {  # orders per day in the past, carried forward over the holdout window
        "orders in the last 365 days / 365": count(buyer_fields, "orders_365d") / 365,
        "orders in the last 90 days / 90": count(buyer_fields, "orders_90d") / 90,
        "orders since the first order / max(days since it, 90)": orders_total / np.maximum(since_first, 90),
    }
    maes = {name: round(float(np.mean(np.abs(rate * HOLDOUT_DAYS - actual))), 4) for name, rate in run_rates.items()}
    baseline = min(maes, key=maes.__getitem__)
    naive = run_rates[baseline] * HOLDOUT_DAYS
    recovery = parameter_recovery(SEED, RECOVERY_CUSTOMERS)
    report = model.spec.quality.get("holdout_next_90_days", {})
    return {
        "value": float(np.mean(np.abs(predicted - actual))),
        "baseline": float(np.mean(np.abs(naive - actual))),
        "params": {
            "buyers": int(buyers.sum()),
            "window_days": HOLDOUT_DAYS,
            "predicted_orders": round(float(predicted.sum()), 1),
            "actual_orders": int(actual.sum()),
            "baseline_orders": round(float(naive.sum()), 1),
            "correlation": round(float(np.corrcoef(predicted, actual)[0, 1]), 4),
            "baseline_correlation": round(float(np.corrcoef(naive, actual)[0, 1]), 4),
            "rmse": round(float(np.sqrt(np.mean((predicted - actual) ** 2))), 4),
            "baseline_rmse": round(float(np.sqrt(np.mean((naive - actual) ** 2))), 4),
            "scored_at": "the cutoff; actual = orders in the 90 days after it (people with an order before it)",
            "method": "BgNbd.expected(90 days) with the shipped spec's BG/NBD parameters on the served rows",
            "served_graph_vs_spec_parameters_max_error": float(f"{served_error:.3g}"),
            "baseline_heuristic": f"run rate: {baseline} x {HOLDOUT_DAYS} days",
            "baseline_candidates_mae": maes,
            "report_json_mae": report.get("mean_absolute_error"),
            "report_json_correlation": report.get("correlation"),
            "bgnbd_parameter_recovery": {
                "customers": recovery["customers"],
                "seed": recovery["seed"],
                "bgnbd_relative_error": recovery["bgnbd_relative_error"],
                "gamma_gamma_relative_error": recovery["gamma_gamma_relative_error"],
                "max_relative_error": recovery["max_relative_error"],
                "report_json_max_relative_error": model.spec.quality.get("bgnbd_parameter_recovery", {}).get(
                    "max_relative_error"
                ),
            },
        },
    }


def bench_nbc(model: LoadedModel, population: Population, fields: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Among the people who answer in the 30 days after the cutoff: the channel they answered most, and the
    local hour of their first answer on it."""
    outcomes = population.outcomes
    who = np.flatnonzero(outcomes.response_channel >= 0)
    responders = [fields[i] for i in who]
    y = outcomes.response_channel[who]
    hours = outcomes.response_hour[who]
    scores = served(model, responders, population.cutoff)
    predicted = np.stack([scores[f"nbc_{channel}"] for channel in CHANNELS], axis=1).argmax(axis=1)
    answers_90d = np.stack(
        [
            count(responders, trait)
            for trait in ("email_opens_90d", "sms_clicks_90d", "push_opens_90d", "inapp_clicks_90d")
        ],
        axis=1,
    )
    baseline = answers_90d.argmax(axis=1)  # ties (and no answers): the first channel, email
    # the served model's own hour for someone without a known hour: the training population's usual one
    fallback = int(served(model, [{}], population.cutoff)["best_send_hour"][0])
    hour_accuracy = metrics.hour_accuracy(scores["best_send_hour"], hours, 1)
    hour_baseline = metrics.hour_accuracy(np.full(len(hours), fallback), hours, 1)
    return {
        "value": float(np.mean(predicted == y)),
        "baseline": float(np.mean(baseline == y)),
        "params": {
            "responders": len(y),
            "channel_shares": {channel: round(float(np.mean(y == k)), 4) for k, channel in enumerate(CHANNELS)},
            "scored_at": "the cutoff; label: the channel answered most in the 30 days after it",
            "baseline_heuristic": "the channel with the most answers in the last 90 days (email when none)",
            "send_hour_accuracy_within_1h": round(hour_accuracy, 4),
            "send_hour_baseline_accuracy_within_1h": round(hour_baseline, 4),
            "send_hour_baseline": f"everyone at {fallback}h (the served model's hour when none is known)",
            "report_json_top1_accuracy": model.spec.quality.get("top1_accuracy"),
            "report_json_send_hour_accuracy_within_1h": model.spec.quality.get("send_hour_accuracy_within_1h"),
        },
    }


# --- point-in-time training set ---------------------------------------------------------------------------

CHURN_SPEC = ModelSpec.from_dict(
    {
        "name": "churn_risk",
        "version": "bench",
        "features": ENGAGEMENT_FEATURES,
        "outputs": [{"score": "churn_risk", "output": "probabilities", "index": 1}],
        "computed_traits": traits_for(ENGAGEMENT_FEATURES),
    }
)
# The label the product trains and judges churn_risk on: lapsed a month on, no activity in (T + 30d, T + 90d].
CHURN_LABEL = dict(TRAINABLE["churn_risk"].label)


def duckdb_tables(con: duckdb.DuckDBPyConnection, batches: Iterable[Sequence[StoredProfile]]) -> int:
    """The stored events, plan history and consent history as DuckDB tables (what an as-of join reads),
    from batches of stored profiles (a list of them, or a store read batch by batch), appended a batch at
    a time: this process holds one batch's columns, DuckDB the tables."""
    properties = sorted({t["property"] for t in traits_for(ENGAGEMENT_FEATURES) if t.get("property", "$at") != "$at"})
    created: set[str] = set()
    total = 0
    for profiles in batches:
        events: dict[str, list] = {"person": [], "ts": [], "type": [], "name": [], **{p: [] for p in properties}}
        plans: dict[str, list] = {"person": [], "ts": [], "plan": []}
        consent: dict[str, list] = {"person": [], "channel": [], "ts": [], "granted": []}
        for stored in profiles:
            person = stored.person_id
            for entry in stored.timeline:
                events["person"].append(person)
                events["ts"].append(entry.at)
                events["type"].append(entry.type)
                events["name"].append(entry.name)
                for prop in properties:
                    value = entry.properties.get(prop)
                    events[prop].append(
                        value if isinstance(value, int | float) and not isinstance(value, bool) else None
                    )
            for part in stored.doc["parts"]:
                for version in part["traits"].get("plan", []):
                    plans["person"].append(person)
                    plans["ts"].append(version[3])
                    plans["plan"].append(version[0] if isinstance(version[0], str) else None)
                for key, history in part["consent"].items():
                    for state in history:
                        consent["person"].append(person)
                        consent["channel"].append(key)
                        consent["ts"].append(state[2])
                        consent["granted"].append(bool(state[0]))
        total += len(events["ts"])
        for name, columns in (("events_raw", events), ("plans_raw", plans), ("consent_raw", consent)):
            if not columns["ts"] and name in created:
                continue
            arrays = {k: np.array(v, dtype=object if k != "ts" else np.float64) for k, v in columns.items()}
            for prop in properties if name == "events_raw" else ():
                arrays[prop] = np.array([np.nan if v is None else v for v in columns[prop]], dtype=np.float64)
            table = name.removesuffix("_raw")
            con.register(name, arrays)
            if name in created:
                con.execute(f"INSERT INTO {table} SELECT * FROM {name}")
            else:
                con.execute(f"CREATE TABLE {table} AS SELECT * FROM {name}")
                created.add(name)
            con.unregister(name)
    return total


def store_batches(store: Store) -> Iterator[list[StoredProfile]]:
    """The store's profiles a batch at a time, for synchronous code (DuckDB's loading)."""
    loop = asyncio.new_event_loop()
    batches = iter_profiles(store, batch=2000)
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(batches))
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def _sql_literal(values: Sequence[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _trait_sql(trait: Mapping[str, Any], cutoff: float) -> str:
    """The computed trait as a DuckDB aggregate over events at or before the cutoff."""
    conditions = [f"ts <= {cutoff!r}"]
    if trait.get("event_type", "track") != "any":
        conditions.append(f"type = '{trait.get('event_type', 'track')}'")
    if trait.get("event_names"):
        conditions.append(f"name IN ({_sql_literal(trait['event_names'])})")
    if trait.get("window"):
        window = float(trait["window"][:-1]) * DAY  # every window here is in days ("90d")
        conditions.append(f"ts > {cutoff - window!r}")
    where = " AND ".join(conditions)
    column = "ts" if trait.get("property", "$at") == "$at" else f'"{trait["property"]}"'
    aggregate = {"count": "count(*)", "sum": f"sum({column})", "avg": f"avg({column})", "min": f"min({column})"}
    return f"{aggregate.get(trait['op'], f'max({column})')} FILTER (WHERE {where})"


def duckdb_training_set(
    con: duckdb.DuckDBPyConnection, cutoff: float, label: LabelSpec
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The same rows as `training_set(CHURN_SPEC, CHURN_LABEL)`, by SQL: person ids, features, labels (1:
    no event at all in (cutoff + after, cutoff + after + window])."""
    opens, closes = cutoff + label.after, cutoff + label.horizon
    traits = traits_for(ENGAGEMENT_FEATURES)
    aggregates = ",\n".join(f'{_trait_sql(t, cutoff)} AS "{t["name"]}"' for t in traits)
    consent_joins, consent_columns = [], []
    for k, feature in enumerate(f for f in ENGAGEMENT_FEATURES if f["path"].startswith("consent.")):
        key = feature["path"].removeprefix("consent.")
        consent_joins.append(
            f"ASOF LEFT JOIN (SELECT * FROM consent WHERE channel = '{key}') c{k} "
            f"ON c{k}.person = spine.person AND spine.t >= c{k}.ts"
        )
        consent_columns.append(f"coalesce(c{k}.granted::DOUBLE, 0.0)")
    columns = []
    for feature in ENGAGEMENT_FEATURES:
        root, name = feature["path"].split(".", 1)
        if root == "computed" and feature["transform"] == "days_since":
            columns.append(f'(spine.t - f."{name}") / {DAY!r}')
        elif root == "computed":
            default = "'NaN'::DOUBLE" if feature["default"] is None else repr(float(feature["default"]))
            columns.append(f'coalesce(f."{name}"::DOUBLE, {default})')
        elif root == "consent":
            columns.append(consent_columns.pop(0))
        else:  # plan, a category
            cases = " ".join(f"WHEN '{c}' THEN {i}" for i, c in enumerate(feature["categories"]))
            columns.append(f"coalesce(CASE p.plan {cases} END, -1)::DOUBLE")
    query = f"""
        WITH spine AS (
            SELECT person, {cutoff!r} AS t,
                   (count(*) FILTER (WHERE ts > {opens!r} AND ts <= {closes!r}) = 0)::DOUBLE AS label
            FROM events GROUP BY person HAVING min(ts) <= {cutoff!r}
        ),
        f AS (SELECT person, {aggregates} FROM events WHERE ts <= {cutoff!r} GROUP BY person)
        SELECT spine.person, spine.label, {", ".join(columns)}
        FROM spine JOIN f USING (person)
        ASOF LEFT JOIN plans p ON p.person = spine.person AND spine.t >= p.ts
        {" ".join(consent_joins)}
        ORDER BY spine.person
    """
    rows = con.execute(query).fetchall()
    persons = [r[0] for r in rows]
    labels = np.array([r[1] for r in rows], dtype=np.float64)
    X = np.array([[np.nan if v is None else v for v in r[2:]] for r in rows], dtype=np.float32)
    return persons, X, labels


def training_set_store(persons: int) -> str:
    """TRAINING_SET_STORE, or a SQLite file in the temporary folder named by what it holds."""
    if TRAINING_SET_STORE:
        return TRAINING_SET_STORE
    simulator = hashlib.sha256(Path(simulator_module.__file__).read_bytes()).hexdigest()[:10]
    return f"sqlite:///{Path(tempfile.gettempdir()) / f'cdp-bench-profiles-{persons}-s{SEED}-{simulator}.db'}"


async def _filled_store(persons: int) -> tuple[Population, Store, float]:
    """The simulated population in a profile store at `training_set_store` (a file store already holding
    exactly these persons is reused: writing 100,000 through the profile domain takes a while)."""
    population = simulate(persons, SEED)
    store = open_store(training_set_store(persons))
    started = time.perf_counter()
    from cdp_profile.records import PROFILES

    if await store.count(PROFILES) != persons:
        await write_population(store, population, traits_for(ENGAGEMENT_FEATURES))
    return population, store, time.perf_counter() - started


def _memory_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_memory() -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5); a no-op where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def bench_training_set(persons: int) -> dict[str, Any]:
    population, store, setup = asyncio.run(_filled_store(persons))
    where = training_set_store(persons)
    print(f"wrote {persons:,} simulated profiles to a profile store ({where}) in {setup:.0f}s", flush=True)
    cutoff, end = population.cutoff, population.end
    del population  # what follows reads the store; the simulation (its event arrays) is not needed
    label = {"spec": CHURN_SPEC, "label": CHURN_LABEL, "cutoff": cutoff, "until": end}

    whole: dict[str, float] = {}
    if persons <= WHOLE_STORE_PERSONS:  # the former way: every timeline in memory, then the rows
        t0, c0 = time.perf_counter(), time.process_time()
        profiles = asyncio.run(read_profiles(store))
        t1 = time.perf_counter()
        before = training_set(profiles, **label)
        whole = {
            "whole_store_seconds": time.perf_counter() - t0,
            "whole_store_read_seconds": t1 - t0,
            "whole_store_cpu_seconds": time.process_time() - c0,
        }
        del profiles
    gc.collect()
    rss_before = _memory_mb("VmRSS")
    _reset_peak_memory()
    t0, c0 = time.perf_counter(), time.process_time()
    ours = asyncio.run(training_set_from_store(store, **label, workers=TRAINING_SET_WORKERS))
    t1, c1 = time.perf_counter(), time.process_time()
    peak = _memory_mb("VmHWM")
    print(
        f"streamed set: {ours.rows:,} rows in {t1 - t0:.1f}s ({c1 - c0:.1f}s CPU), peak RSS {peak:.0f} MB", flush=True
    )
    if whole:
        assert before.data_hash == ours.data_hash, "the streamed set differs from the whole-store one"
        del before

    con = duckdb.connect()
    events = duckdb_tables(con, store_batches(store))
    t2, c2 = time.perf_counter(), time.process_time()
    persons_sql, X_sql, y_sql = duckdb_training_set(con, cutoff, LabelSpec.from_dict(CHURN_LABEL))
    t3, c3 = time.perf_counter(), time.process_time()
    con.close()
    asyncio.run(store.close())

    same_rows = persons_sql == ours.person_ids
    mismatched = int(np.sum(~np.isclose(ours.X, X_sql, rtol=1e-5, atol=1e-4, equal_nan=True))) if same_rows else None
    labels_equal = bool(same_rows and np.array_equal(ours.y[:, 0], y_sql))
    print(f"DuckDB: {len(persons_sql):,} rows, {mismatched} cells differ, labels equal: {labels_equal}", flush=True)
    if not same_rows or mismatched or not labels_equal:
        raise SystemExit(
            f"the training set and DuckDB's rows disagree: same persons {same_rows}, {mismatched} cells differ, "
            f"labels equal {labels_equal}"
        )
    return {
        "value": t1 - t0,
        "baseline": t3 - t2,
        "params": {
            "persons": persons,
            "rows": ours.rows,
            "features": len(CHURN_SPEC.features),
            "events": events,
            "label": CHURN_LABEL,
            "positives": int(ours.y.sum()),
            "how": "streamed: profiles read 500 at a time (each timeline by its origin prefix) and turned into rows",
            "workers": TRAINING_SET_WORKERS,
            # CPU seconds of this process (DuckDB's threads included): on a shared machine wall times swing
            # with the neighbours' load, CPU times much less (workers' CPU is not counted)
            "cpu_seconds": round(c1 - c0, 3),
            "duckdb_query_cpu_seconds": round(c3 - c2, 3),
            "cpu_ratio": round((c1 - c0) / max(c3 - c2, 1e-9), 1),
            **{k: round(v, 3) for k, v in whole.items()},
            "whole_store_ratio": round(whole["whole_store_seconds"] / (t3 - t2), 1) if whole else None,
            "whole_store_cpu_ratio": round(whole["whole_store_cpu_seconds"] / max(c3 - c2, 1e-9), 1) if whole else None,
            "duckdb_load_seconds": round(t2 - t1, 3),
            "duckdb_query_seconds": round(t3 - t2, 3),
            "same_persons": same_rows,
            "mismatched_cells": mismatched,
            "labels_equal": labels_equal,
            "skipped_truncated": ours.skipped_truncated,
            "rss_before_mb": round(rss_before, 1),
            "peak_rss_mb": round(peak, 1),  # of the process while the streamed set was built (VmHWM)
            "build_memory_mb": round(peak - rss_before, 1),
            "store": f"{where.split(':', 1)[0]} (the profile service's collections and encodings)",
            "baseline_heuristic": "DuckDB as-of join over the same events, in memory, query time only",
            "seconds_per_100k_persons": round((t1 - t0) / max(1, persons) * 100_000, 1),
        },
    }


# --- regime change: retraining on the platform's own data --------------------------------------------------


def bench_regime(persons: int) -> dict[str, Any]:
    """The three AUCs of `cdp_training.regime` (frozen, retrained on the platform's data, trained on the new
    regime directly) on the slice after the change, and the frozen model's where nothing changed."""
    from cdp_training.regime import experiment

    figures = experiment(persons, seed=SEED)
    print(
        f"regime change: frozen {figures.frozen_before:.4f} without it, {figures.frozen_after:.4f} with it; retrained "
        f"{figures.retrained:.4f}; new regime directly {figures.new_regime:.4f}"
    )
    return {
        "value": figures.retrained,
        "baseline": figures.new_regime,
        "params": {
            "frozen_auc_without_the_change": figures.frozen_before,
            "frozen_auc_after_the_change": figures.frozen_after,
            "retrained_auc": figures.retrained,
            "new_regime_auc": figures.new_regime,
            "frozen_drop": round(figures.frozen_before - figures.frozen_after, 4),
            "frozen_below_new_regime": round(figures.new_regime - figures.frozen_after, 4),
            "recovered_within_0_02": figures.recovered,
            **figures.params,
            "baseline_heuristic": "churn_risk trained on a population that always lived in the new regime, "
            "judged on the same rows",
        },
    }


# --- CLV on real transactions: the CDNOW sample against the published parameters ------------------------

# Fader, Hardie & Lee (2005): BG/NBD on the CDNOW sample's weeks 1-39 ("Counting your customers the easy way",
# table 1), Gamma-Gamma on its 946 repeat buyers ("RFM and CLV", section 4)
CDNOW_PUBLISHED = {
    "bgnbd": {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426},
    "gamma_gamma": {"p": 6.25, "q": 3.74, "gamma": 15.44},
}
CDNOW_CALIBRATION_END, CDNOW_END = "1997-09-30", "1998-06-30"
CLV_REPEATS = int(os.environ.get("CDP_BENCH_CLV_REPEATS", "5"))


def cdnow_transactions() -> Any:
    """CDNOW_sample.txt (customer index, id, yyyymmdd, CDs, dollars) as the transaction export reader reads a
    file: written to a temporary CSV, read back by `cdp_training.transactions.read_transactions`."""
    import csv
    import tempfile
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path

    from cdp_training.transactions import read_transactions

    try:
        raw = Path(str(distribution("lifetimes").locate_file("lifetimes/datasets/CDNOW_sample.txt")))
    except PackageNotFoundError:
        raise SystemExit("the CDNOW sample comes with the dev dependency lifetimes: run `make env`") from None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cdnow.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["customer_id", "date", "value"])
            for line in raw.read_text().splitlines():
                _, customer, day, _, dollars = line.split()
                writer.writerow([customer, day, dollars])
        return read_transactions(path)


def _loop_fit(x: np.ndarray, t_x: np.ndarray, T: np.ndarray, m: np.ndarray) -> dict[str, float]:
    """The fallback baseline: the same likelihoods and optimiser, summed customer by customer in Python."""
    from math import lgamma, log

    from scipy.optimize import minimize

    def bgnbd(log_params: np.ndarray) -> float:
        r, alpha, a, b = np.exp(log_params)
        total = 0.0
        for xi, ti, Ti in zip(x, t_x, T, strict=True):
            head = lgamma(r + xi) - lgamma(r) + r * log(alpha) + lgamma(a + b) + lgamma(b + xi)
            head -= lgamma(b) + lgamma(a + b + xi)
            a3 = -(r + xi) * log(alpha + Ti)
            if xi > 0:
                a4 = log(a) - log(b + xi - 1) - (r + xi) * log(alpha + ti)
                total += head + max(a3, a4) + log(1 + np.exp(min(a3, a4) - max(a3, a4)))
            else:
                total += head + a3
        return -total / len(x)

    def spend(log_params: np.ndarray) -> float:
        p, q, g = np.exp(log_params)
        total = 0.0
        for xi, mi in zip(x[x > 0], m[x > 0], strict=True):
            total += lgamma(p * xi + q) - lgamma(p * xi) - lgamma(q) + q * log(g) + (p * xi - 1) * log(mi)
            total += p * xi * log(xi) - (p * xi + q) * log(g + mi * xi)
        return -total / int((x > 0).sum())

    one = minimize(bgnbd, np.zeros(4), method="L-BFGS-B", bounds=[(-9.0, 9.0)] * 4).x
    two = minimize(spend, np.log([1.0, 2.0, float(m[x > 0].mean())]), method="L-BFGS-B", bounds=[(-9.0, 12.0)] * 3).x
    return dict(zip(("r", "alpha", "a", "b", "p", "q", "gamma"), np.exp([*one, *two]).tolist(), strict=True))


def _baseline_fit(x: np.ndarray, t_x: np.ndarray, T: np.ndarray, m: np.ndarray) -> tuple[str, Any]:
    """(name, fit function) of the fit-time baseline: lifetimes' fitters when they import, else the loop."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from lifetimes import BetaGeoFitter, GammaGammaFitter
    except Exception as error:  # an old package on new pandas/numpy: fall back, and say so
        return (
            f"plain Python loop over customers (lifetimes did not import: {type(error).__name__})",
            lambda: _loop_fit(x, t_x, T, m),
        )
    buyers = x > 0

    def fit() -> dict[str, float]:
        bg = BetaGeoFitter().fit(x, t_x, T)
        gg = GammaGammaFitter().fit(x[buyers], m[buyers])
        return {**bg.params_.to_dict(), **{"p": gg.params_["p"], "q": gg.params_["q"], "gamma": gg.params_["v"]}}

    return "lifetimes 0.11.3 BetaGeoFitter + GammaGammaFitter", fit


def bench_clv_cdnow() -> list[dict[str, Any]]:
    from cdp_training.clvfit import analyse, fit
    from cdp_training.transactions import parse_day, summarise

    tx = cdnow_transactions()
    report, _ = analyse(tx, unit="weeks", calibration_end=CDNOW_CALIBRATION_END, end=CDNOW_END)
    fitted = report["calibration_fit"]
    errors = {
        model: {
            name: round(abs(fitted[model]["parameters"][name] / value - 1), 5)
            for name, value in CDNOW_PUBLISHED[model].items()
        }
        for model in CDNOW_PUBLISHED
    }
    max_error = max(e for table in errors.values() for e in table.values())
    summary = summarise(
        tx,
        calibration_end=parse_day(CDNOW_CALIBRATION_END, "end"),
        holdout_end=parse_day(CDNOW_END, "end"),
        unit_days=7,
    )
    calibrated = fit(summary)
    predicted = calibrated.bgnbd.expected(summary.holdout_length, summary.x, summary.t_x, summary.T)
    run_rate = np.divide(summary.x, summary.T, out=np.zeros_like(summary.x), where=summary.T > 0)
    naive = run_rate * summary.holdout_length
    actual = summary.x_holdout
    hold, tracking = report["holdout"], report["tracking"]
    common = {
        "data": "CDNOW sample (lifetimes 0.11.3 datasets/CDNOW_sample.txt): 6,919 orders, 2,357 customers",
        "same_day_orders_merged": tx.merged,
        "calibration": f"weeks 1-39 (to {CDNOW_CALIBRATION_END}), holdout weeks 40-78 (to {CDNOW_END})",
        "published": CDNOW_PUBLISHED,
        "fitted": {model: fitted[model]["parameters"] for model in CDNOW_PUBLISHED},
        "parameter_relative_error": errors,
        "max_parameter_relative_error": max_error,
        "converged": all(fitted[model]["converged"] for model in CDNOW_PUBLISHED),
        "at_bound": {model: fitted[model]["at_bound"] for model in CDNOW_PUBLISHED},
        "holdout_predicted_transactions": hold["predicted_transactions"],
        "holdout_actual_transactions": hold["actual_transactions"],
        "holdout_predicted_over_actual": hold["predicted_over_actual"],
    }
    holdout = write_result(
        "clv-cdnow-holdout",
        value=float(np.mean(np.abs(predicted - actual))),
        unit="repeat transactions MAE per customer, 39 weeks",
        baseline=float(np.mean(np.abs(naive - actual))),
        higher_is_better=False,
        params={
            **common,
            "baseline_heuristic": "run rate: calibration repeat transactions / T x 39 weeks",
            "baseline_predicted_over_actual": round(float(naive.sum() / actual.sum()), 4),
            "holdout_transaction_value": hold.get("transaction_value"),
            "by_frequency": report["by_frequency"],
            "tracking_end_of_calibration": tracking[38],
            "tracking_end_of_holdout": tracking[-1],
        },
    )

    baseline_name, baseline_fit = _baseline_fit(summary.x, summary.t_x, summary.T, summary.m)
    ours_seconds, baseline_seconds = [], []
    baseline_parameters: dict[str, float] = {}
    for _ in range(max(1, CLV_REPEATS)):
        started = time.perf_counter()
        fit(summary)
        ours_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        baseline_parameters = baseline_fit()
        baseline_seconds.append(time.perf_counter() - started)
    ours_parameters = {**fitted["bgnbd"]["parameters"], **fitted["gamma_gamma"]["parameters"]}
    fit_time = write_result(
        "clv-cdnow-fit",
        value=float(np.median(ours_seconds)),
        unit="seconds",
        baseline=float(np.median(baseline_seconds)),
        higher_is_better=False,
        params={
            **common,
            "repeats": len(ours_seconds),
            "customers": len(summary.customers),
            "baseline_heuristic": baseline_name,
            "baseline_parameters": {k: round(float(v), 5) for k, v in baseline_parameters.items()},
            "max_relative_difference_to_baseline_parameters": round(
                max(abs(ours_parameters[k] / baseline_parameters[k] - 1) for k in ours_parameters), 6
            ),
        },
    )
    return [holdout, fit_time]


def main() -> None:
    parser = argparse.ArgumentParser(description="the shipped models' quality; the point-in-time training set; CLV")
    parser.add_argument("--only", choices=("models", "training-set", "clv", "regime"), help="run one part")
    args = parser.parse_args()
    if args.only in (None, "regime"):
        figures = bench_regime(REGIME_PERSONS)
        write_result(
            "model-regime",
            value=figures["value"],
            unit="AUC after the change",
            baseline=figures["baseline"],
            higher_is_better=True,
            params={"seed": SEED, **figures["params"]},
        )
        if args.only == "regime":
            return
    if args.only in (None, "clv"):
        bench_clv_cdnow()
        if args.only == "clv":
            return
    if args.only != "training-set":
        bench_models()
    if args.only != "models":
        figures = bench_training_set(TRAINING_SET_PERSONS)
        write_result(
            "training-set",
            value=figures["value"],
            unit="seconds",
            baseline=figures["baseline"],
            higher_is_better=False,
            params={"seed": SEED, **figures["params"]},
        )


def bench_models() -> None:
    started = time.perf_counter()
    models = shipped_models()
    population = simulate(PEOPLE, SEED)
    fields = population_fields(population, computed_definitions(models))
    print(f"simulated and profiled {PEOPLE:,} people (seed {SEED}) in {time.perf_counter() - started:.0f}s")
    fraud, anomaly = bench_fraud(models, population, fields.at_fraud)
    measured = [  # (result, model, unit, higher is better, figures)
        ("model-churn", "churn_risk", "AUC", True, bench_churn(models["churn_risk"], population, fields.at_cutoff)),
        (
            "model-propensity",
            "purchase_propensity",
            "AUC",
            True,
            bench_propensity(models["purchase_propensity"], population, fields.at_cutoff),
        ),
        ("model-fraud", "fraud_risk", "AUC", True, fraud),
        ("model-fraud-anomaly", "fraud_anomaly", "AUC", True, anomaly),
        ("model-clv", "clv", "orders MAE, 90 days", False, bench_clv(models["clv"], population, fields.at_cutoff)),
        (
            "model-nbc",
            "next_best_channel",
            "top-1 accuracy",
            True,
            bench_nbc(models["next_best_channel"], population, fields.at_cutoff),
        ),
    ]
    common = {"population": PEOPLE, "seed": SEED, "events": int(population.table["t"].size)}
    results = []
    for name, model, unit, higher, figures in measured:
        shipped = {"model": model, "version": models[model].spec.version, "sha256": models[model].sha256}
        results.append(
            write_result(
                name,
                value=figures["value"],
                unit=unit,
                baseline=figures["baseline"],
                higher_is_better=higher,
                params={**shipped, **common, **figures["params"]},
            )
        )
    print(f"\n{'result':<21}{'value':>7}{'baseline':>10}{'ratio':>8}  {'unit':<21}baseline heuristic")
    for result in results:
        print(
            f"{result['name']:<21}{result['value']:>7.3f}{result['baseline']:>10.3f}{result['ratio']:>8.3f}  "
            f"{result['unit']:<21}{result['params']['baseline_heuristic']}"
        )
    print(f"\ndone in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
