"""The scoring process: consume profiles.changed, run the deployed ONNX models, publish scores.updated.

`profiles.changed.<p>` runs on the kit's partitioned engine (stream.py) over the partitions one
ownership gives (`CDP_OWNERSHIP`, group "scoring"): acquiring partition p restores its held fields
(snapshot plus stream) before its pipeline starts; releasing it drains the pipeline, snapshots, and
forgets them. The partitions are taken before the service reports SERVING; on SIGTERM they are
released (drained, snapshotted, leases freed) before the bus and the store close.

Beside the scoring, the models are watched: drift checks of the rows scored (drift.py), training runs
by API and on a schedule, and realised quality, both in a worker process (training_runs.py,
quality.py, worker.py).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from pathlib import Path

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.bus import Bus, dead_letter_stream, events_resolved_stream, profiles_stream, scores_stream, subjects
from cdp_kit.bus.notices import by_partition, read_notices
from cdp_kit.errors import FailedPrecondition, Unavailable
from cdp_kit.ownership import Ownership, ownership_from_settings
from cdp_kit.person_export import export_service, replica_owners
from cdp_kit.profile_client import ProfileClient
from cdp_kit.service import ServiceRuntime, client_channel, run_main
from cdp_kit.storage import open_store
from cdp_scoring import labelwatch
from cdp_scoring.api import MAX_MODEL_BYTES, SCOPES, ScoringApi, alert_message
from cdp_scoring.domain.registry import LIVE
from cdp_scoring.drift import DriftMonitor, check_and_alert, load_shipped_references, watch
from cdp_scoring.engine import MODELS_CHANGED, SERVICE, ScoringEngine
from cdp_scoring.explain import Explainer
from cdp_scoring.export import export_person
from cdp_scoring.modelstore import FolderModelStore, ObjectModelStore, parse_model_store, shipped_models
from cdp_scoring.quality import RealisedQuality
from cdp_scoring.schedule import Cron, every, parse_schedule
from cdp_scoring.settings import ScoringSettings
from cdp_scoring.stream import scoring_stream
from cdp_scoring.training_runs import TrainingRuns
from cdp_scoring.worker import Worker

log = logging.getLogger("cdp.scoring")

WINDOW_CHECK_SECONDS = 60.0  # a closed label window is noticed within a minute of the day boundary


async def setup(runtime: ServiceRuntime) -> None:
    settings: ScoringSettings = runtime.settings  # type: ignore[assignment]
    # The held fields are many long-lived objects: collect young objects less often (see profile).
    gc.set_threshold(50_000, 20, 100)
    store = await runtime.stack.enter_async_context(open_store(settings.store_url))
    bus = await runtime.stack.enter_async_context(
        Bus.connect(settings.nats_url, name=settings.service_name, telemetry=runtime.telemetry)
    )
    await bus.ensure_read_streams(profiles_stream())  # profile's: never reconfigured here
    await bus.ensure_streams(scores_stream(max_age=settings.scores_retention_days * 86_400))
    await bus.ensure_read_streams(dead_letter_stream())  # identity's to configure
    kind, where = parse_model_store(settings.model_store)
    model_store = ObjectModelStore(bus.js, where) if kind == "nats" else FolderModelStore(Path(where))
    profile: ProfileClient | None = None
    if settings.profile_address:
        channel = client_channel(settings, settings.profile_address)
        runtime.stack.push_async_callback(channel.close)
        profile = ProfileClient(channel, settings.profile_token)

    async def announce(name: str) -> None:
        await bus.nc.publish(MODELS_CHANGED, name.encode(), headers={"Cdp-Origin": str(id(engine))})

    drift = DriftMonitor(
        threshold=settings.drift_threshold, min_rows=settings.drift_min_rows, shipped=load_shipped_references()
    )
    drift.export(runtime.telemetry.meter)
    engine = ScoringEngine(
        store,
        model_store,
        bus.publisher,
        partitions=settings.partitions,
        telemetry=runtime.telemetry,
        threads=settings.threads,
        profile_source=profile.fields if profile else None,
        # A trait the profile service refuses is the model spec's fault: named as its field.
        define_traits=functools.partial(profile.define, field="spec.computed_traits.{name}") if profile else None,
        announce=announce,
        round_linger=settings.round_linger_ms / 1000,
        drift=drift,
        resolution=settings.resolution_decimals,
    )
    # The aged drift comparison scores rows again with the version's own session (drift.py).
    drift.rescorer = lambda version: getattr(engine.sessions.get((version.spec.name, version.version)), "run", None)
    await engine.start()
    runtime.stack.push_async_callback(engine.stop)
    stream = scoring_stream(
        engine,
        bus,
        partitions=settings.partitions,
        batch_size=settings.batch_size,
        ack_wait=settings.ack_wait,
        snapshot_every=settings.snapshot_interval,
    )
    # Deletions a restored store file no longer shows (notices.py): PRIVACY read whole now, and the
    # persons it names erased from each partition as it is taken (here, or later under leases), after its
    # restore and before its pipeline publishes or applies anything.
    try:
        engine.deleted = await read_notices(bus.js)
    except Exception as exc:  # its NATS user may not read PRIVACY (natsroles: scoring `reads` it)
        log.error("privacy.deleted notices not read (%s): deletions a restored store lost stay undone", exc)
    engine.deleted_by_partition = by_partition(engine.deleted, settings.partitions)
    ownership = await stream.start(
        await ownership_from_settings(settings, js=bus.js, group=SERVICE, partitions=settings.partitions)
    )
    serving_task = runtime.spawn(stream.serve(ownership), "score profiles.changed")

    async def release() -> None:
        # Pushed after the bus, the store and the engine: on the way out it runs before they close.
        serving_task.cancel()
        await asyncio.gather(serving_task, return_exceptions=True)

    runtime.stack.push_async_callback(release)
    # The loaded fields live as long as the process: keep the collector from rescanning them.
    gc.freeze()

    async def on_model_changed(msg) -> None:
        if (msg.headers or {}).get("Cdp-Origin") == str(id(engine)) or not subjects.published_on(msg, MODELS_CHANGED):
            return  # its own, or pushed here by another user's consumer (cdp_kit.bus.subjects.published_on)
        try:
            await engine.reload(msg.data.decode())
        except Exception as exc:  # keep serving the versions already loaded; say why the new one is not
            log.error("could not reload model %s after another replica changed it: %r", msg.data.decode(), exc)

    subscription = await bus.nc.subscribe(MODELS_CHANGED, cb=on_model_changed)
    runtime.stack.push_async_callback(subscription.unsubscribe)
    engine.background(_prepare_models(engine, settings.ship_models), "deploy shipped models, define their traits")
    training, quality, check_drift = await _watch_models(runtime, engine, store, bus, drift, ownership)
    runtime.parts.update(
        bus=bus,
        store=store,
        engine=engine,
        stream=stream,
        ownership=ownership,
        model_store=model_store,
        training=training,
        quality=quality,
    )
    # An export or an explanation of a person of a partition another replica holds asks that replica
    # (export.py, explain.py).
    owners = replica_owners(
        settings,
        ownership,
        held=lambda: engine.ready,
        channel=lambda address: client_channel(settings, address),
        peers=settings.peers,
        peers_variable="CDP_SCORING_PEERS",
    )
    runtime.stack.push_async_callback(owners.close)
    explainer = Explainer(engine, owners)
    # DeployModel takes a model of up to MAX_MODEL_BYTES, and one just over it is refused naming the limit:
    # the kit's 16 MiB answered a 20 MB model RESOURCE_EXHAUSTED, naming neither the field nor the limit.
    runtime.grpc.max_receive_bytes = MAX_MODEL_BYTES + 1024 * 1024
    runtime.grpc.add_service(
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server,
        ScoringApi(engine, check_drift=check_drift, training=training, quality=quality, explainer=explainer),
        scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"],
        scopes=SCOPES,
    )
    runtime.grpc.add_service(
        *export_service(
            "scoring", lambda person, merged, context: export_person(engine, person, merged, owners, context)
        )
    )


async def _watch_models(
    runtime: ServiceRuntime, engine: ScoringEngine, store, bus: Bus, drift: DriftMonitor, ownership: Ownership
):
    """Training runs, drift checks and realised quality, each on its schedule (see their modules).

    Every replica checks the drift of the rows it scores; the scheduled training runs and quality checks
    run on one replica only, the one holding partition 0 when their time comes (they read the whole
    store, and the others would compute the same)."""
    settings: ScoringSettings = runtime.settings  # type: ignore[assignment]
    worker = Worker()
    runtime.stack.callback(worker.stop)
    training = TrainingRuns(engine, settings.training_store, worker)
    runtime.stack.push_async_callback(training.close)
    quality = RealisedQuality(
        engine,
        store,
        settings.training_store,
        worker,
        meter=runtime.telemetry.meter,
        settle=settings.quality_settle_seconds,
        debounce=settings.quality_debounce_seconds,
    )
    await quality.load()
    runtime.stack.push_async_callback(quality.close)

    async def alert(report) -> None:
        retrain = (
            settings.drift_retrain
            and report.role == LIVE
            and report.newly_drifted
            and training.start(report.model, "drift")
        )
        await bus.nc.publish(subjects.MODELS_DRIFT, alert_message(report, bool(retrain)).SerializeToString())

    async def check_drift() -> None:
        await check_and_alert(drift, engine.registry.active(), alert)

    runtime.spawn(watch(drift, engine.registry.active, alert, interval=settings.drift_check_seconds), "drift checks")

    def on_one_replica(job):
        async def run() -> None:
            if 0 in ownership.owned():
                await job()

        return run

    for model, cron in parse_schedule(settings.train_schedule).items():
        run = on_one_replica(functools.partial(training.run_to_end, model, "schedule"))
        runtime.spawn(every(cron, run, f"training run of {model}"), f"training schedule of {model}")
    if settings.quality_schedule and settings.training_store:
        run = on_one_replica(quality.refresh_all)
        runtime.spawn(every(Cron.parse(settings.quality_schedule), run, "realised quality"), "quality schedule")
    if settings.training_store:
        # Labels arriving make realised quality stale (quality.py): label events reach one replica through
        # a durable consumer (labelwatch.follow: one that arrived while every replica was down waits in it);
        # label windows closing and versions going live are checked on one replica.
        await bus.ensure_read_streams(events_resolved_stream())  # identity's: never reconfigured here
        runtime.spawn(labelwatch.follow(bus, quality.on_resolved), "label events")

        async def check_windows() -> None:
            while True:
                try:
                    # Every replica reads the figures the others computed: a label definition learnt
                    # from them (realised.label) makes its label events recognised here too.
                    await quality.load()
                    if 0 in ownership.owned():
                        quality.check_windows()
                except Exception:  # a store hiccup: the next minute tries again
                    log.exception("label window check failed")
                await asyncio.sleep(WINDOW_CHECK_SECONDS)

        runtime.spawn(check_windows(), "label windows")
    return training, quality, check_drift


async def _prepare_models(engine: ScoringEngine, ship: bool) -> None:
    """Deploy the shipped models once, and make sure the profile service computes every active model's
    computed traits (it may still be starting, or have lost them with its store): keep trying.

    The partitions are served meanwhile, so at a first start persons may be held before the shipped models
    are live: each one deployed live scores the persons held, as every version made live does (on this
    replica and, told by its announcement, on the others: `Deployments.score_held`)."""
    files = [path.read_bytes() for path in shipped_models()] if ship else []
    delay = 0.5
    while True:
        try:
            deployed = await engine.ensure_shipped(files)
            if deployed:
                log.info("shipped models deployed", extra={"models": [v.spec.key for v in deployed]})
            await engine.ensure_traits()
            return
        except (FailedPrecondition, Unavailable) as exc:
            log.warning("models not ready yet (%s); retrying in %.0fs", exc.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def main() -> None:
    run_main(ScoringSettings, setup)


if __name__ == "__main__":
    main()
