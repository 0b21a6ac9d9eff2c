"""Training runs started by the service, and realised quality, on the platform's own data.

A profile store written as the profile service writes it (a simulated population through the profile
domain, `cdp_training.platformdata`) is the service's `CDP_SCORING_TRAINING_STORE`. `TrainModel` streams
its phases, registers the candidate (a first version goes live; a later one stays in shadow unless it
beats live by the margin) and says why; the version keeps the reference drift is measured against.
`GetModelQuality` judges the live version on the latest closed label window, beside its training
figures. The schedule's cron expressions and its loop are checked on their own."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import json_format

from cdp.events.v1 import events_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.bus import Bus, events_resolved_stream, subjects
from cdp_kit.errors import InvalidArgument
from cdp_kit.natsauth import ROLES, NatsClientSettings, authorization_config, new_password, write_credentials
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import as_operator
from cdp_kit.service import serving
from cdp_kit.storage import Put, open_store
from cdp_profile.domain import TimelineEntry
from cdp_profile.records import TIMELINE, encode_entry, timeline_key
from cdp_scoring import labelwatch
from cdp_scoring.__main__ import setup
from cdp_scoring.labelwatch import LabelWatch
from cdp_scoring.quality import RealisedQuality
from cdp_scoring.schedule import Cron, every, parse_schedule
from cdp_scoring.settings import ScoringSettings
from cdp_testing.errors import bad_request_fields
from cdp_testing.metrics import MetricsCapture
from cdp_training.pipeline import MODELS_DIR
from cdp_training.pointintime import iter_profiles

from .conftest import settings


@pytest.fixture(scope="module")
def profile_store(platform_store) -> str:
    """The profile service's store of a platform that ran for 20 months (400 simulated customers: conftest)."""
    return platform_store


@pytest.fixture
async def scoring(nats_server, tmp_path, profile_store):
    captured = MetricsCapture("scoring")
    config = settings(nats_server, tmp_path, training_store=profile_store)
    async with serving(config, setup, telemetry=captured.telemetry) as runtime:
        runtime.parts["metrics"] = captured
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield scoring_pb2_grpc.ScoringServiceStub(channel), runtime


async def train(stub, **request) -> list[scoring_pb2.TrainProgress]:
    return [p async for p in stub.TrainModel(scoring_pb2.TrainModelRequest(**request))]


async def test_a_run_by_api_streams_its_phases_registers_the_candidate_and_says_why(scoring):
    stub, runtime = scoring
    progress = await train(stub, model="purchase_propensity")
    phases = [p.phase for p in progress]
    assert [phase for i, phase in enumerate(phases) if phase not in phases[:i]] == [
        "reading",
        "training_set",
        "evaluation_set",
        "fitting",
        "registering",
        "done",
    ]
    assert [p.percent for p in progress] == sorted(p.percent for p in progress)
    rows = {p.phase: p.rows for p in progress}
    assert rows["reading"] == 400 and 0 < rows["training_set"] <= 400
    first = progress[-1]
    assert first.done and first.role == scoring_pb2.ROLE_LIVE and first.promoted
    assert "first version" in first.reason and first.version.startswith("t")

    model = await stub.GetModel(scoring_pb2.GetModelRequest(name="purchase_propensity"))
    assert model.live_version == first.version
    training = json_format.MessageToDict(model.versions[0].spec.training)
    # no cut-off given: the latest UTC midnight whose label window and evaluation slice are observed
    assert training["window"]["history_until"].endswith("T00:00:00Z")
    assert training["promotion"]["reason"] == first.reason
    reference = training["reference"]
    assert set(reference["scores"]) == {"purchase_propensity"} and len(reference["features"]) == 32
    assert reference["rows"] == rows["training_set"]

    # a later candidate that must beat live by half an AUC point: it stays in shadow, and says why
    second = (await train(stub, model="purchase_propensity", cutoff="2025-05-01", margin=0.5))[-1]
    assert second.done and second.role == scoring_pb2.ROLE_SHADOW and not second.promoted
    assert "does not beat live" in second.reason and first.version in second.reason
    assert json_format.MessageToDict(second.decision)["margin"] == 0.5
    model = await stub.GetModel(scoring_pb2.GetModelRequest(name="purchase_propensity"))
    assert model.live_version == first.version
    assert {v.spec.version: v.role for v in model.versions} == {
        first.version: scoring_pb2.ROLE_LIVE,
        second.version: scoring_pb2.ROLE_SHADOW,
    }

    # the first run again: the same data trains the same version, which is registered already
    again = (await train(stub, model="purchase_propensity"))[-1]
    assert again.version == first.version and again.role == scoring_pb2.ROLE_LIVE
    assert "trained on the same data before" in again.reason
    model = await stub.GetModel(scoring_pb2.GetModelRequest(name="purchase_propensity"))
    assert len(model.versions) == 2 and model.live_version == first.version

    # realised quality: the live version on the latest closed label window, beside its training figures
    quality = await stub.GetModelQuality(scoring_pb2.GetModelQualityRequest(name="purchase_propensity", refresh=True))
    realised = json_format.MessageToDict(quality.realised)
    assert quality.version == first.version and realised["version"] == first.version
    assert realised["label"] == {"kind": "goal_event", "window": "30d", "events": [{"name": "Order Completed"}]}
    # the newest closed window: it ends within the last day of the data (2025-08-30)
    assert "2025-08-29T00:00:00Z" <= realised["label_until"] <= "2025-08-30T00:00:00Z"
    assert realised["auc"] > 0.7 and 0 < realised["brier"] < 0.25
    bins = realised["reliability"]
    assert len(bins) == 10 and sum(b["rows"] for b in bins) == realised["rows"] > 300
    assert json_format.MessageToDict(quality.training)["auc"] > 0.7
    again = await stub.GetModelQuality(scoring_pb2.GetModelQualityRequest(name="purchase_propensity"))
    assert json_format.MessageToDict(again.realised) == realised and again.computed_at == quality.computed_at
    metrics = runtime.parts["metrics"].collected()
    for name, key in (("cdp.scoring.quality.auc", "auc"), ("cdp.scoring.quality.brier", "brier")):
        (point,) = metrics[name][1]
        assert point.value == realised[key]
        assert dict(point.attributes) == {"model": "purchase_propensity", "version": first.version}


async def test_bad_runs_are_refused_naming_the_field(scoring):
    stub, runtime = scoring
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await train(stub, model="purchase_propensity", cutoff="last tuesday")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(caught.value) == ["cutoff"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await train(stub, model="")
    assert bad_request_fields(caught.value) == ["model"]
    for margin in (-1, float("inf"), float("nan")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await train(stub, model="purchase_propensity", margin=margin)
        assert bad_request_fields(caught.value) == ["margin"]
    training = runtime.parts["training"]
    training.running.add("churn_risk")  # as while a run of it goes on
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await train(stub, model="churn_risk")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already running" in caught.value.details()
    assert training.start("churn_risk", "schedule") is False


async def test_a_run_that_cannot_happen_is_refused_before_the_worker_starts(scoring):
    """An unknown model, or one with nothing to learn (no label of its own and no default), is refused
    naming the field before anything starts: no worker process, no store read."""
    stub, runtime = scoring
    worker = runtime.parts["training"].worker
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await train(stub, model="no_such_model")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(caught.value) == ["model"]
    assert "no_such_model" in caught.value.details() and "churn_risk" in caught.value.details()  # what is known

    # fraud_anomaly is live here, but unsupervised: it has no label definition, and none is given
    await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=(MODELS_DIR / "fraud_anomaly.onnx").read_bytes()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await train(stub, model="fraud_anomaly")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(caught.value) == ["label"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # and so no realised quality either
        await stub.GetModelQuality(scoring_pb2.GetModelQualityRequest(name="fraud_anomaly", refresh=True))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no label" in caught.value.details()
    assert worker._process is None  # nothing was started
    assert "no_such_model" not in runtime.parts["training"].last and not runtime.parts["training"].running


async def test_a_bad_label_is_refused_before_the_store_is_read(scoring):
    stub, _runtime = scoring
    request = scoring_pb2.TrainModelRequest(model="churn_risk")
    request.label.update({"kind": "no_activity", "window": "forever"})
    seen: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for progress in stub.TrainModel(request):
            seen.append(progress.phase)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["label.window"]
    assert seen == []  # refused before "reading the profile store"


def test_the_service_knows_the_models_the_training_code_has_defaults_for():
    from cdp_scoring.training_runs import DEFAULT_LABELS
    from cdp_training.learn import TRAINABLE

    assert set(TRAINABLE) == DEFAULT_LABELS


async def test_without_a_training_store_runs_are_refused_with_the_variable_to_set(nats_server, tmp_path):
    async with serving(settings(nats_server, tmp_path), setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await train(stub, model="churn_risk")
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "CDP_SCORING_TRAINING_STORE" in caught.value.details()


# --- the schedule --------------------------------------------------------------------------------------


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("expression", "now", "expected"),
    [
        ("@hourly", "2025-06-01T10:15:30", "2025-06-01T11:00:00"),
        ("@daily", "2025-06-01T10:15:00", "2025-06-02T00:00:00"),
        ("0 3 * * 1", "2025-06-01T10:00:00", "2025-06-02T03:00:00"),  # 2025-06-02 is a Monday
        ("*/15 * * * *", "2025-06-01T10:15:00", "2025-06-01T10:30:00"),
        ("30 2 1 */3 *", "2025-06-01T10:00:00", "2025-07-01T02:30:00"),
        ("0 0 31 * *", "2025-06-01T00:00:00", "2025-07-31T00:00:00"),  # June has no 31st
        ("0 12 13 * 5", "2025-06-01T00:00:00", "2025-06-06T12:00:00"),  # the 13th or a Friday
    ],
)
def test_cron_names_the_next_time(expression, now, expected):
    assert Cron.parse(expression).next_after(at(now)) == at(expected)


def test_a_schedule_names_each_model_and_refuses_what_it_cannot_read():
    schedule = parse_schedule("churn_risk=0 3 * * 1; fraud_risk=@daily")
    assert sorted(schedule) == ["churn_risk", "fraud_risk"]
    for bad in ("churn_risk", "churn_risk=61 * * * *", "churn_risk=@daily;churn_risk=@hourly", "x=* * *"):
        with pytest.raises(InvalidArgument) as caught:
            parse_schedule(bad)
        assert caught.value.field == "schedule"
    problems = ScoringSettings(nats_url="nats://x", train_schedule="churn_risk=99 * * * *").validate()
    assert [p for p in problems if p.startswith("CDP_SCORING_TRAIN_SCHEDULE=")]


async def test_the_scheduled_job_runs_at_its_time_and_a_failure_does_not_stop_the_schedule():
    # a clock a moment before a minute starts: "every minute" is due almost at once, then a minute later
    offset = 60 - time.time() % 60 - 0.2
    runs: list[float] = []

    async def job() -> None:
        runs.append(time.time() + offset)
        raise RuntimeError("the store is down")

    task = asyncio.create_task(every(Cron.parse("* * * * *"), job, "test job", clock=lambda: time.time() + offset))
    try:
        for _ in range(200):
            if runs:
                break
            await asyncio.sleep(0.01)
        assert len(runs) == 1 and runs[0] % 60 < 1  # at the start of the minute
        assert not task.done()  # the failure was logged; the schedule goes on
    finally:
        task.cancel()


# --- the worker process --------------------------------------------------------------------------------


def test_the_worker_process_ends_when_the_service_is_killed():
    service = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from cdp_scoring.worker import Worker\n"
            "worker = Worker()\n"
            "worker._start()\n"
            "print(worker._process.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        worker = int(service.stdout.readline())
        assert alive(worker)
        service.kill()  # SIGKILL: nothing of the service runs to stop its worker
        service.wait()
        deadline = time.monotonic() + 10
        while alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the service"
            time.sleep(0.05)
    finally:
        service.kill()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] not in "ZX"  # a zombie has ended
    except FileNotFoundError:
        return False


# --- realised quality as labels arrive ---------------------------------------------------------------------


async def test_a_fraud_label_arriving_makes_the_live_versions_realised_quality_move(
    nats_server, tmp_path, profile_store
):
    """A chargeback reaches the platform: the fraud model's figures are marked stale and computed again a
    moment later (no schedule, no request), counting the new positive; labels arriving together cost one
    computation."""
    store_url = f"sqlite:///{tmp_path / 'profile.db'}"
    shutil.copy(profile_store.removeprefix("sqlite:///"), tmp_path / "profile.db")
    config = settings(
        nats_server,
        tmp_path,
        training_store=store_url,
        quality_schedule="",
        quality_settle_seconds=0.2,
        quality_debounce_seconds=1.0,
    )
    async with serving(config, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=(MODELS_DIR / "fraud_risk.onnx").read_bytes()))
            request = scoring_pb2.GetModelQualityRequest(name="fraud_risk")
            before = await stub.GetModelQuality(scoring_pb2.GetModelQualityRequest(name="fraud_risk", refresh=True))
            realised = json_format.MessageToDict(before.realised)
            assert before.trigger == "request" and before.labelled_rows == realised["rows"] > 300
            assert realised["positives"] == 0 and not before.HasField("stale_since")

            # the profile service stores the chargeback, decided just now (the newest event there is) ...
            person = await a_person_seen_by(store_url, iso_seconds(realised["cutoff"]))
            at = iso_seconds(realised["label_until"]) + 3600
            async with open_store(store_url) as store:
                entry = TimelineEntry(at, "chargeback-1", "track", "Chargeback", {"amount": 80}, "psp", person)
                await store.bulk_write([Put(TIMELINE, timeline_key(entry), encode_entry(entry))])
            # ... and scoring sees it, twice over (a redelivery) beside an event that labels nothing
            quality = runtime.parts["quality"]
            computed = counting(quality)
            nc = runtime.parts["bus"].nc
            for name in ("Chargeback", "Page Viewed", "Chargeback"):
                await nc.publish(subjects.events_resolved(0), resolved(person, name, at).SerializeToString())
            await nc.flush()

            stale = await wait_for(stub, request, lambda q: q.HasField("stale_since"))
            assert stale.stale_trigger == "label event Chargeback" and stale.computed_at == before.computed_at
            after = await wait_for(stub, request, lambda q: q.computed_at != before.computed_at)
            moved = json_format.MessageToDict(after.realised)
            assert after.trigger == "label event Chargeback" and not after.HasField("stale_since")
            # the window that closed with it: an hour later, holding the new label
            assert moved["positives"] == 1 and iso_seconds(moved["cutoff"]) == iso_seconds(realised["cutoff"]) + 3600
            assert after.labelled_rows == before.labelled_rows
            await asyncio.sleep(1.5)  # past the debounce: the flood did not compute again
            assert computed == ["fraud_risk"]

            # an event that labels no live model marks nothing stale
            await nc.publish(subjects.events_resolved(1), resolved(person, "Order Completed", at).SerializeToString())
            await nc.flush()
            await asyncio.sleep(0.3)
            assert not (await stub.GetModelQuality(request)).HasField("stale_since")


async def test_a_label_arriving_while_scoring_is_down_marks_the_figures_stale_when_it_is_back(
    nats_server, tmp_path, profile_store
):
    """Every scoring replica is down when a chargeback is resolved: the label waits on the bus, and the
    first replica back marks fraud_risk's figures stale (a core subscription would have missed it)."""
    store_url = f"sqlite:///{tmp_path / 'profile.db'}"
    shutil.copy(profile_store.removeprefix("sqlite:///"), tmp_path / "profile.db")
    config = settings(
        nats_server, tmp_path, training_store=store_url, quality_schedule="", quality_settle_seconds=3600.0
    )
    request = scoring_pb2.GetModelQualityRequest(name="fraud_risk")
    async with serving(config, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=(MODELS_DIR / "fraud_risk.onnx").read_bytes()))
            before = await stub.GetModelQuality(scoring_pb2.GetModelQualityRequest(name="fraud_risk", refresh=True))
            assert not before.HasField("stale_since")
            realised = json_format.MessageToDict(before.realised)

    # scoring is down: identity resolves a chargeback
    person = await a_person_seen_by(store_url, iso_seconds(realised["cutoff"]))
    at = iso_seconds(realised["label_until"]) + 3600
    async with Bus.connect(nats_server.url, name="identity-test") as bus:
        await bus.ensure_streams(events_resolved_stream())  # as identity does
        await bus.js.publish(subjects.events_resolved(0), resolved(person, "Chargeback", at).SerializeToString())

    async with serving(config, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            stale = await wait_for(stub, request, lambda q: q.HasField("stale_since"), timeout=15.0)
            assert stale.stale_trigger == "label event Chargeback" and stale.computed_at == before.computed_at


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def a_person_seen_by(store_url: str, cutoff: float) -> str:
    async with open_store(store_url) as store:
        async for batch in iter_profiles(store):
            for stored in batch:
                if stored.timeline and stored.timeline[0].at <= cutoff:
                    return stored.person_id
    raise AssertionError("nobody was seen by the cut-off")


def resolved(person: str, name: str, at: float) -> events_pb2.ResolvedEventBatch:
    event = events_pb2.Event(message_id=f"m-{name}", type=events_pb2.EVENT_TYPE_TRACK, event=name)
    event.timestamp.FromSeconds(int(at))
    return events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=event, person_id=person)])


def counting(quality) -> list[str]:
    """The models `quality` computes from now on (its computation, wrapped)."""
    calls: list[str] = []
    compute = quality._refresh

    async def counted(model, *args, **kwargs):
        calls.append(model)
        return await compute(model, *args, **kwargs)

    quality._refresh = counted
    return calls


async def wait_for(stub, request, condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        answer = await stub.GetModelQuality(request)
        if condition(answer):
            return answer
        assert time.monotonic() < deadline, f"GetModelQuality never got there: {answer}"
        await asyncio.sleep(0.05)


FRAUD_LABEL = {
    "kind": "label_event",
    "window": "90d",
    "events": [{"name": "Chargeback"}, {"name": "CRM Ticket Closed", "where": {"resolution": "fraud"}}],
}


def test_label_events_are_matched_as_the_label_definition_says():
    watch = LabelWatch(
        {
            "fraud_risk": FRAUD_LABEL,
            "purchase_propensity": {"kind": "goal_event", "window": "30d", "events": [{"name": "Order Completed"}]},
            "churn_risk": {"kind": "no_activity", "window": "90d"},  # any event is activity, not a label
            "clv": None,  # label not known yet
        }
    )

    def labelled(name: str, **properties) -> dict[str, str]:
        batch = resolved("p1", name, 1.7e9)
        batch.events[0].event.properties.update(properties)
        return watch.labelled(batch.SerializeToString())

    assert labelled("Chargeback") == {"fraud_risk": "Chargeback"}
    assert labelled("CRM Ticket Closed", resolution="fraud") == {"fraud_risk": "CRM Ticket Closed"}
    assert labelled("CRM Ticket Closed", resolution="solved") == {}
    assert labelled("Order Completed") == {"purchase_propensity": "Order Completed"}
    assert labelled("Page Viewed") == {}
    assert watch.needles is not None  # every match has a name: other messages are not even decoded


async def test_a_closed_label_window_or_a_new_live_version_marks_the_figures_stale():
    now = [at("2025-06-01T23:59:00")]

    def live(name: str, version: str) -> SimpleNamespace:
        spec = SimpleNamespace(training={"label": FRAUD_LABEL} if name == "fraud_risk" else {})
        return SimpleNamespace(name=name, live=SimpleNamespace(version=version, spec=spec))

    engine = SimpleNamespace(registry=[live("churn_risk", "1"), live("fraud_risk", "2"), live("clv", "1")])
    quality = RealisedQuality(engine, None, "sqlite:///unused", None, clock=lambda: now[0], settle=3600)
    computed = {"computed_at": at("2025-06-01T10:00:00"), "realised": {}, "trigger": "schedule"}
    quality.figures = {"churn_risk": computed | {"version": "1"}, "fraud_risk": computed | {"version": "1"}}
    quality.failed = {"clv": ("1", at("2025-06-01T11:00:00"))}  # its computation failed today
    try:
        quality.check_windows()
        assert {m: s["trigger"] for m, s in quality.stale.items()} == {"fraud_risk": "new live version"}
        assert quality.due_at("fraud_risk") == now[0] + quality.debounce  # a new version waits a whole period
        now[0] = at("2025-06-02T00:00:30")  # a day boundary: yesterday's cohort's label windows closed
        quality.check_windows()
        assert {m: s["trigger"] for m, s in quality.stale.items()} == {
            "fraud_risk": "new live version",
            "churn_risk": "label window closed",
            "clv": "new live version",  # tried again the next day
        }
        # a label of fraud_risk's own definition joins the computation already due
        quality.on_resolved(resolved("p1", "Chargeback", now[0]).SerializeToString())
        assert quality.stale["fraud_risk"]["labels"] == 1 and len(quality._due) == 3
    finally:
        await quality.close()


async def test_a_label_falling_due_while_the_schedule_computes_the_figures_does_not_compute_them_again():
    runs: list[str] = []

    class SlowWorker:
        async def run(self, job, **kwargs):
            runs.append(job)
            await asyncio.sleep(0.3)
            yield "result", {"rows": 10, "label": FRAUD_LABEL}

    spec = SimpleNamespace(name="fraud_risk", training={"label": FRAUD_LABEL})
    entry = SimpleNamespace(name="fraud_risk", live=SimpleNamespace(version="2", spec=spec, sha256=""))
    registry = type("Registry", (list,), {"get": lambda self, _name: entry})([entry])
    engine = SimpleNamespace(registry=registry, model_store=SimpleNamespace(get=fake_file))
    async with open_store("memory://") as store:
        quality = RealisedQuality(engine, store, "sqlite:///unused", SlowWorker(), settle=0.1, debounce=0)
        try:
            quality.mark_stale("fraud_risk", "label event Chargeback")  # due in 0.1 s
            await quality.refresh_all()  # the schedule, from 0 to 0.3 s
            await asyncio.sleep(0.3)  # the label's computation fell due meanwhile, waited, found it done
            assert runs == ["quality"] and not quality.stale and not quality._due
            assert quality.figures["fraud_risk"]["trigger"] == "schedule"
        finally:
            await quality.close()


async def fake_file(*_args) -> bytes:
    return b""


async def test_scoring_follows_label_events_as_its_own_nats_user(tmp_path):
    """Under per-service NATS users (make up, the chart): scoring may create its label consumer on identity's
    stream, fetch from it and acknowledge, and the server refuses none of it."""
    server = NatsServer(store_dir=tmp_path / "nats")
    passwords = {name: new_password() for name in ROLES}
    for name, password in passwords.items():
        write_credentials(tmp_path / f"{name}.json", name, password)
    operator = new_password()
    server.config = authorization_config(passwords, operator_password=operator)
    server.start()
    try:
        await as_operator(server.url, operator)  # as `cdpctl up` does: no service's user may create a stream
        seen: list[bytes] = []
        login = {n: NatsClientSettings(credentials_file=tmp_path / f"{n}.json") for n in ("identity", "scoring")}
        async with (
            Bus.connect(server.url, name="identity", security=login["identity"]) as identity,
            Bus.connect(server.url, name="scoring", security=login["scoring"]) as scoring,
        ):
            await identity.ensure_streams(events_resolved_stream())
            await scoring.ensure_read_streams(events_resolved_stream())
            task = asyncio.create_task(labelwatch.follow(scoring, seen.append))
            try:
                deadline = time.monotonic() + 10
                while True:  # the consumer exists: what identity publishes from now on reaches it
                    try:
                        await scoring.js.consumer_info(subjects.EVENTS_RESOLVED, labelwatch.DURABLE)
                        break
                    except Exception:
                        assert time.monotonic() < deadline, "the label consumer was never created"
                        await asyncio.sleep(0.05)
                data = resolved("p1", "Chargeback", 1.7e9).SerializeToString()
                await identity.js.publish(subjects.events_resolved(3), data)
                while not seen:
                    assert time.monotonic() < deadline, "the label event never reached scoring"
                    await asyncio.sleep(0.05)
                assert seen == [data]
                info = await scoring.js.consumer_info(subjects.EVENTS_RESOLVED, labelwatch.DURABLE)
                for _ in range(100):  # acknowledged once handled
                    if info.num_ack_pending == 0:
                        break
                    await asyncio.sleep(0.05)
                    info = await scoring.js.consumer_info(subjects.EVENTS_RESOLVED, labelwatch.DURABLE)
                assert info.num_ack_pending == 0 and info.num_pending == 0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert [line for line in server.log_path.read_text().splitlines() if " Violation - Subject " in line] == []
    finally:
        server.close()
