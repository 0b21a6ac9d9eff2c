"""A training run on the platform's own data: trained at a cut-off, judged beside live on a later slice,
registered in shadow, promoted only when it beats live by the margin; every version says what it was
trained on. The registry here is scoring's own domain registry, with scoring's own file validation."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import open_store
from cdp_scoring.domain.registry import LIVE, SHADOW, Registry
from cdp_scoring.runtime import load_model
from cdp_training import learn
from cdp_training.__main__ import main
from cdp_training.pipeline import MODELS_DIR
from cdp_training.platformdata import write_population
from cdp_training.pointintime import read_profiles
from cdp_training.simulator import simulate
from cdp_training.traits import COMPUTED_TRAITS

DAY = 86_400.0


class InProcessRegistry:
    """scoring's Registry and load_model: what DeployModel and Promote do, without the service."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.files: dict[tuple[str, str], bytes] = {}

    async def live(self, name: str) -> learn.LiveModel | None:
        entry = self.registry.models.get(name)
        version = entry.live if entry else None
        return None if version is None else learn.live_from_onnx(self.files[(name, version.version)])

    async def deploy(self, data: bytes, role: str) -> None:
        loaded = load_model(data)  # refuses what DeployModel refuses
        spec = loaded.spec
        self.registry.deploy(spec, sha256=loaded.sha256, size_bytes=len(data), role=role, canary_percent=0, now=0.0)
        self.files[(spec.name, spec.version)] = data

    async def promote(self, name: str, version: str) -> None:
        self.registry.promote(name, version)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """700 simulated customers in a profile store as the service writes it, and their profiles read back.
    The store is an SQLite file, so the API-less run reads a copy of the file (milliseconds) where it
    copied a memory store's every record into one (seconds)."""
    population = simulate(700, 21)
    db = tmp_path_factory.mktemp("world") / "profile.db"

    async def write_and_read():
        async with open_store(f"sqlite:///{db}") as store:
            await write_population(store, population, list(COMPUTED_TRAITS.values()))
            return await read_profiles(store)

    return population, asyncio.run(write_and_read()), db


def shipped(name: str) -> bytes:
    return (MODELS_DIR / f"{name}.onnx").read_bytes()


async def test_a_first_run_registers_a_live_version_that_keeps_its_training_record(world):
    population, profiles, _ = world
    cutoff = population.cutoff - 30 * DAY
    result = learn.train_run("purchase_propensity", profiles, cutoff=cutoff, until=population.end, log=lambda _: None)
    registry = InProcessRegistry()
    assert await learn.register(registry, result, had_live=False) == LIVE

    version = registry.registry.get("purchase_propensity").live
    training, quality = version.spec.training, version.spec.quality
    assert version.version == result.version and version.version.startswith("t")
    assert training["label"] == {"kind": "goal_event", "window": "30d", "events": [{"name": "Order Completed"}]}
    assert training["window"]["history_until"] == learn.iso(cutoff)
    assert training["evaluation_window"]["history_until"] == learn.iso(cutoff + 30 * DAY)  # the later slice
    assert training["rows"] == result.train.rows > 600 and training["evaluation_rows"] == result.evaluation.rows
    assert 0 < training["positives"]["1"] < training["rows"] == sum(training["positives"].values())
    assert training["data_hash"] == result.train.data_hash != training["evaluation_data_hash"]
    importances = training["feature_importances"]
    assert len(importances) == 32 and sum(importances.values()) == pytest.approx(1, abs=0.01)
    assert training["promotion"]["promote"] and "first version" in training["promotion"]["reason"]
    assert quality["auc"] > 0.7  # learnt something real about who buys next month
    # the same data trains the same file under the same name: registering again changes nothing
    again = learn.train_run("purchase_propensity", profiles, cutoff=cutoff, until=population.end, log=lambda _: None)
    assert again.built.data == result.built.data


async def test_a_candidate_that_does_not_beat_live_by_the_margin_stays_in_shadow_with_the_reason(world):
    population, profiles, _ = world
    registry = InProcessRegistry()
    await registry.deploy(shipped("churn_risk"), LIVE)
    live = await registry.live("churn_risk")
    result = learn.train_run(
        "churn_risk",
        profiles,
        cutoff=population.cutoff - 30 * DAY,
        label={"kind": "no_activity", "window": "30d"},
        live=live,
        margin=0.5,  # more than any model can gain over one that works
        until=population.end,
        log=lambda _: None,
    )
    assert await learn.register(registry, result, had_live=True) == SHADOW

    entry = registry.registry.get("churn_risk")
    assert entry.live.version == "1.1.0"
    candidate = entry.versions[result.version]
    assert candidate.role == SHADOW
    decision = candidate.spec.training["promotion"]
    assert decision["promote"] is False and "stays in shadow" in decision["reason"] and "0.5" in decision["reason"]
    assert decision["live_version"] == "1.1.0" and decision["live"] == candidate.spec.quality["live_on_holdout"]["auc"]
    # live was judged on the same rows, through its own spec
    assert candidate.spec.quality["live_on_holdout"]["version"] == "1.1.0"


async def test_a_candidate_that_beats_live_by_the_margin_is_promoted_and_live_kept_for_rollback(world):
    population, profiles, _ = world
    registry = InProcessRegistry()
    await registry.deploy(shipped("churn_risk"), LIVE)
    working = await registry.live("churn_risk")
    # the live version has stopped telling customers apart (a constant score): any real model beats it
    broken = learn.LiveModel(working.version, working.spec, lambda rows: {"churn_risk": np.full(len(rows), 0.3)})
    result = learn.train_run(
        "churn_risk",
        profiles,
        cutoff=population.cutoff - 30 * DAY,
        label={"kind": "no_activity", "window": "30d"},
        live=broken,
        until=population.end,
        log=lambda _: None,
    )
    assert result.decision["promote"] and result.decision["gain"] >= learn.DEFAULT_MARGIN
    assert await learn.register(registry, result, had_live=True) == LIVE
    entry = registry.registry.get("churn_risk")
    assert entry.live.version == result.version and entry.previous == ["1.1.0"]


def test_an_evaluation_slice_that_overlaps_the_training_labels_is_refused(world):
    population, profiles, _ = world
    with pytest.raises(InvalidArgument) as caught:
        learn.train_run(
            "purchase_propensity",
            profiles,
            cutoff=population.cutoff - 30 * DAY,
            evaluate_at=population.cutoff - 10 * DAY,
            until=population.end,
            log=lambda _: None,
        )
    assert caught.value.field == "evaluate_at"


def test_a_churn_run_evaluates_only_after_the_grace_and_the_window_of_its_training_labels(world):
    population, profiles, _ = world
    # the default churn label reads (T + 30d, T + 90d]: an evaluation at T + 60d would see those events as features
    with pytest.raises(InvalidArgument) as caught:
        learn.train_run(
            "churn_risk",
            profiles,
            cutoff=population.cutoff - 150 * DAY,
            evaluate_at=population.cutoff - 90 * DAY,
            until=population.end,
            log=lambda _: None,
        )
    assert caught.value.field == "evaluate_at" and "90d" in caught.value.message
    # with no cut-off given, training and evaluation labels both close before the end of the data
    cutoff = learn.default_cutoff(profiles, learn.TRAINABLE["churn_risk"].label, until=population.end)
    assert cutoff <= population.end - 180 * DAY and cutoff % DAY == 0


def test_the_api_less_run_writes_the_candidate_and_its_record(world, tmp_path, capsys):
    population, _, stored = world
    shutil.copy(stored, tmp_path / "profile.db")  # the run reads its own copy: the module's stays as written
    db = f"sqlite:///{tmp_path / 'profile.db'}"
    cutoff = learn.iso(population.cutoff - 30 * DAY)
    code = main(["train", "purchase_propensity", "--store", db, "--cutoff", cutoff, "--out", str(tmp_path / "runs")])
    assert code == 0, capsys.readouterr().err
    records = list((tmp_path / "runs").glob("purchase_propensity-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["training"]["promotion"]["live_version"] == "1.1.0"  # judged against the shipped file
    load_model(records[0].with_suffix(".onnx").read_bytes())  # a file DeployModel takes
    assert main(["train", "purchase_propensity", "--store", db, "--cutoff", "soon"]) == 2
    assert "cutoff" in capsys.readouterr().err


async def test_next_best_channel_is_retrained_on_answers_and_judged_on_top1_accuracy_beside_live(world):
    population, profiles, _ = world
    registry = InProcessRegistry()
    await registry.deploy(shipped("next_best_channel"), LIVE)
    live = await registry.live("next_best_channel")
    result = learn.train_run(
        "next_best_channel",
        profiles,
        cutoff=population.cutoff - 30 * DAY,
        live=live,
        margin=0.5,
        until=population.end,
        log=lambda _: None,
    )
    assert await learn.register(registry, result, had_live=True) == SHADOW
    spec = registry.registry.get("next_best_channel").versions[result.version].spec
    assert [o.score for o in spec.outputs] == [o.score for o in live.spec.outputs]  # a drop-in for live
    assert spec.training["label"]["kind"] == "channel_answered"
    assert sum(spec.training["positives"].values()) == spec.training["rows"] == result.train.rows
    decision = spec.training["promotion"]
    assert decision["metric"] == "top1_accuracy" and "stays in shadow" in decision["reason"]
    assert spec.quality["top1_accuracy"] > 0.4
    assert spec.quality["live_on_holdout"]["top1_accuracy"] > 0.4
    # a person who answered nothing has no row: only answerers are labelled
    assert result.train.skipped_unlabelled > 0


def test_a_cutoff_whose_evaluation_slice_is_not_observed_yet_is_refused_in_the_operators_terms(world):
    # A day-2 trial: `models train fraud_risk --cutoff 04:15:00Z`, a 10-minute label window, at 04:26. The
    # training labels had closed, the evaluation slice's (cutoff + the window, then its own window) had not;
    # the refusal named `cutoff` with "75 s after it", a figure about the evaluation slice's cut-off.
    population, profiles, _ = world
    horizon = 30 * DAY  # purchase_propensity's default label window
    cutoff = population.end - 45 * DAY  # its labels close 15 days before the end; the evaluation's 15 after
    with pytest.raises(InvalidArgument) as caught:
        learn.train_run("purchase_propensity", profiles, cutoff=cutoff, until=population.end, log=lambda _: None)
    message = caught.value.message
    assert caught.value.field == "cutoff"
    assert learn.iso(cutoff) in message and "30d" in message  # the cutoff given, the label window
    assert learn.iso(population.end) in message  # the last event the store holds
    assert f"latest cutoff that works now is {learn.iso(population.end - 2 * horizon)}" in message
    assert "after it" not in message


def test_an_evaluate_at_whose_label_window_is_not_observed_yet_names_evaluate_at(world):
    population, profiles, _ = world
    cutoff = population.end - 90 * DAY
    with pytest.raises(InvalidArgument) as caught:
        learn.train_run(
            "purchase_propensity",
            profiles,
            cutoff=cutoff,
            evaluate_at=population.end - 10 * DAY,
            until=population.end,
            log=lambda _: None,
        )
    assert caught.value.field == "evaluate_at"
    assert learn.iso(population.end - 10 * DAY) in caught.value.message
    assert f"latest evaluate_at that works now is {learn.iso(population.end - 30 * DAY)}" in caught.value.message
