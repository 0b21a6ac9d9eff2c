"""Training runs started by the service: by API (`TrainModel`), on a schedule (`CDP_SCORING_TRAIN_SCHEDULE`)
or after drift (`CDP_SCORING_DRIFT_RETRAIN`).

A run is `cdp_training.learn.train_run` (point-in-time sets from the profile store at
`CDP_SCORING_TRAINING_STORE`, read only; the candidate and the live version judged on a later slice)
in a worker process, so the service keeps scoring while the trees are fitted: the process is spawned
for the run and ends with it, sending its progress (phase, rows, percent) and then its result over a
queue. The candidate comes back as ONNX bytes and is registered here, as `learn.register` does: a
model's first version goes live; otherwise the candidate goes to shadow beside live and is promoted
only when the decision says it beat live by the margin. The decision and its reason stay in the
version's spec (`training.promotion`), with the reference bins drift is measured against.

One run per model at a time: a second one is refused while the first runs (a scheduled time that finds
its model training is skipped). A run cancelled (the caller went away, the service stops) ends its
worker process. The service process never imports the training stack (LightGBM, scikit-learn): only the
worker does, so a deployment without the `cdp-training` package refuses runs with a clear error.

`run_job` is also how realised quality is computed (quality.py): the same worker, another job.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import multiprocessing
import queue as queues
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cdp_kit import errors
from cdp_kit.errors import CdpError, FailedPrecondition, InvalidArgument
from cdp_scoring.domain.registry import LIVE, SHADOW

log = logging.getLogger("cdp.scoring.training")

PERCENT = {"reading": 25.0, "training_set": 45.0, "evaluation_set": 65.0, "fitting": 85.0}


def training_available() -> bool:
    return importlib.util.find_spec("cdp_training") is not None


# --- the worker process -------------------------------------------------------------------------------


def _error_doc(error: BaseException) -> dict[str, Any]:
    if isinstance(error, InvalidArgument):
        return {"type": "InvalidArgument", "field": error.field, "message": error.description, "reason": error.reason}
    if isinstance(error, CdpError):
        return {"type": type(error).__name__, "message": error.message, "reason": error.reason}
    return {"type": "Internal", "message": f"{type(error).__name__}: {str(error)[:500]}"}


def _error_from(doc: Mapping[str, Any]) -> CdpError:
    if doc["type"] == "InvalidArgument":
        return InvalidArgument(doc["field"], doc["message"], reason=doc.get("reason"))
    kind = getattr(errors, doc["type"], None)
    if isinstance(kind, type) and issubclass(kind, CdpError) and kind is not InvalidArgument:
        return kind(doc["message"], reason=doc.get("reason"))
    return CdpError(f"the training worker failed: {doc['message']}", reason="worker_failed")


def _train(report, *, store_url, model, live_onnx, cutoff, evaluate_at, margin, label) -> dict[str, Any]:
    import asyncio as worker_asyncio

    from cdp_training import learn

    report("reading", 0, 5.0, "reading the profile store")
    profiles = worker_asyncio.run(learn.read_store(store_url))
    report("reading", len(profiles), PERCENT["reading"], f"{len(profiles)} profiles read")
    live = learn.live_from_onnx(live_onnx) if live_onnx else None
    label = dict(label) if label else learn.label_for(model, live.spec if live else None)
    cut = learn.parse_time(cutoff, "cutoff") if cutoff else learn.default_cutoff(profiles, label)
    result = learn.train_run(
        model,
        profiles,
        cutoff=cut,
        evaluate_at=learn.parse_time(evaluate_at, "evaluate_at") if evaluate_at else None,
        label=label,
        live=live,
        margin=learn.DEFAULT_MARGIN if margin is None else margin,
        log=lambda _message: None,
        progress=lambda phase, rows: report(phase, rows, PERCENT[phase], f"{phase.replace('_', ' ')}: {rows} rows"),
    )
    return {"onnx": result.built.data, "version": result.version, "decision": result.decision}


def _quality(report, *, store_url, onnx) -> dict[str, Any]:
    import asyncio as worker_asyncio

    from cdp_training import learn
    from cdp_training.realised import realised_quality

    report("reading", 0, 5.0, "reading the profile store")
    profiles = worker_asyncio.run(learn.read_store(store_url))
    report("reading", len(profiles), 50.0, f"{len(profiles)} profiles read")
    return realised_quality(profiles, onnx)


JOBS = {"train": _train, "quality": _quality}


def _worker(channel, job: str, kwargs: dict[str, Any]) -> None:
    """The worker process: run the job, send progress and then ("result", ...) or ("error", ...)."""
    started = time.monotonic()

    def report(phase: str, rows: int, percent: float, message: str) -> None:
        channel.put(
            (
                "progress",
                {
                    "phase": phase,
                    "rows": rows,
                    "percent": percent,
                    "message": message,
                    "elapsed": time.monotonic() - started,
                },
            )
        )

    try:
        channel.put(("result", JOBS[job](report, **kwargs)))
    except BaseException as error:  # everything goes back to the service, which decides
        channel.put(("error", _error_doc(error)))


async def run_job(job: str, **kwargs: Any) -> AsyncIterator[tuple[str, Any]]:
    """Run `job` in a spawned worker process; yields ("progress", {...}) then ("result", {...}). Raises
    the job's own error (InvalidArgument naming the field, FailedPrecondition...)."""
    if not training_available():
        raise FailedPrecondition(
            "training runs need the cdp-training package installed beside the scoring service",
            reason="training_unavailable",
        )
    context = multiprocessing.get_context("spawn")  # never fork a process running grpc and asyncio
    channel = context.Queue()
    process = context.Process(target=_worker, args=(channel, job, kwargs), name=f"cdp-scoring-{job}", daemon=True)
    process.start()
    try:
        while True:
            try:
                kind, payload = await asyncio.to_thread(channel.get, True, 0.25)
            except queues.Empty:
                if not process.is_alive():
                    raise CdpError(
                        f"the {job} worker process ended without an answer (exit code {process.exitcode})",
                        reason="worker_failed",
                    ) from None
                continue
            if kind == "error":
                raise _error_from(payload)
            yield kind, payload
            if kind == "result":
                return
    finally:
        if process.is_alive():
            process.terminate()
        await asyncio.to_thread(process.join, 5)
        channel.close()


# --- runs ---------------------------------------------------------------------------------------------


class TrainingRuns:
    """Starts the runs of the service's models and registers their candidates."""

    def __init__(self, engine, store_url: str) -> None:
        self.engine = engine
        self.store_url = store_url
        self.running: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}  # model -> the last run's outcome (or error)
        self._background: set[asyncio.Task] = set()

    def check(self, model: str) -> None:
        if not model:
            raise InvalidArgument("model", "is required")
        if not self.store_url:
            raise FailedPrecondition(
                "training runs read the profile store: set CDP_SCORING_TRAINING_STORE to the profile service's "
                "store URL",
                reason="training_unavailable",
            )
        if model in self.running:
            raise FailedPrecondition(f"a training run of model {model!r} is already running", reason="running")

    async def train(
        self,
        model: str,
        *,
        cutoff: str = "",
        evaluate_at: str = "",
        margin: float | None = None,
        label: Mapping[str, Any] | None = None,
        trigger: str = "api",
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one training of `model`; yields progress, the last item with done=True and the decision."""
        self.check(model)
        if margin is not None and not margin >= 0:
            raise InvalidArgument("margin", f"{margin!r} must be a number of metric points >= 0")
        self.running.add(model)
        started = time.monotonic()
        try:
            entry = self.engine.registry.models.get(model)
            live = entry.live if entry is not None else None
            live_onnx = await self.engine.model_store.get(live.spec.name, live.version, live.sha256) if live else None
            log.info("training run started", extra={"model": model, "trigger": trigger})
            result: dict[str, Any] = {}
            async for kind, payload in run_job(
                "train",
                store_url=self.store_url,
                model=model,
                live_onnx=live_onnx,
                cutoff=cutoff,
                evaluate_at=evaluate_at,
                margin=margin,
                label=dict(label) if label else None,
            ):
                if kind == "progress":
                    yield payload
                else:
                    result = payload
            yield {"phase": "registering", "percent": 95.0, "message": f"registering {result['version']}"}
            role = await self._register(model, result["onnx"], result["version"], result["decision"], live)
            decision = result["decision"]
            outcome = {
                "phase": "done",
                "done": True,
                "percent": 100.0,
                "version": result["version"],
                "role": role,
                "promoted": role == LIVE,
                "reason": decision["reason"],
                "decision": decision,
                "elapsed": time.monotonic() - started,
                "message": f"{model} {result['version']}: {role}",
            }
            self.last[model] = {k: outcome[k] for k in ("version", "role", "reason")} | {"trigger": trigger}
            log.info(
                "training run done",
                extra={"model": model, "version": result["version"], "role": role, "trigger": trigger},
            )
            yield outcome
        except CdpError as error:
            self.last[model] = {"error": error.message, "trigger": trigger}
            raise
        finally:
            self.running.discard(model)

    async def _register(self, model: str, data: bytes, version: str, decision: Mapping[str, Any], live) -> str:
        """As `cdp_training.learn.register` (not imported: the service process keeps the training stack
        out): the first version goes live; else shadow, promoted when the decision says so."""
        if live is None:
            await self.engine.deploy(data, role=LIVE)
            return LIVE
        await self.engine.deploy(data, role=SHADOW)
        if decision["promote"]:
            await self.engine.promote(model, version)
            return LIVE
        return SHADOW

    async def run_to_end(self, model: str, trigger: str) -> dict[str, Any] | None:
        """A run nobody watches (the schedule, drift): its outcome, or None when it failed (logged)."""
        try:
            outcome = None
            async for item in self.train(model, trigger=trigger):
                outcome = item
            return outcome
        except CdpError as error:
            log.error("training run failed", extra={"model": model, "trigger": trigger, "error": error.message})
            return None

    def start(self, model: str, trigger: str) -> bool:
        """Start a run in the background unless one of the model is running (or runs are unavailable)."""
        try:
            self.check(model)
        except CdpError as error:
            log.warning("training run not started", extra={"model": model, "trigger": trigger, "why": error.message})
            return False
        self.running.add(model)  # taken now: a second start before the task runs is refused
        task = asyncio.create_task(self._after_start(model, trigger), name=f"train {model}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _after_start(self, model: str, trigger: str) -> None:
        self.running.discard(model)
        await self.run_to_end(model, trigger)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
