"""The worker process that training runs and realised-quality checks run in.

Fitting trees and building point-in-time sets take seconds to minutes of CPU; in the service's own
process they would stall scoring. They run in one spawned process (never forked: the service runs grpc
and asyncio threads), one job at a time, which sends its progress and then its result over a queue.
Only that process imports the training stack (`cdp_training`: LightGBM, scikit-learn), so the service
stays as small as it was, and a deployment without the `cdp-training` package refuses jobs with a
clear error.

The process stays for `idle` seconds after a job (the next one - the other models of a schedule, the
quality check after a run - skips the imports) and then exits, giving its memory back. A job that is
cancelled (the caller went away, the service stops) or whose process died ends the process: the next
job starts a fresh one. Errors come back as the kit's errors (InvalidArgument naming its field, ...).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import multiprocessing
import os
import queue as queues
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cdp_kit import errors
from cdp_kit.bus.consumer import describe_failure
from cdp_kit.errors import CdpError, FailedPrecondition, InvalidArgument

log = logging.getLogger("cdp.scoring.worker")

PERCENT = {"reading": 25.0, "training_set": 45.0, "evaluation_set": 65.0, "fitting": 85.0}


def training_available() -> bool:
    return importlib.util.find_spec("cdp_training") is not None


# --- in the worker process ------------------------------------------------------------------------------


def _train(report, *, store_url, model, live_onnx, cutoff, evaluate_at, margin, label) -> dict[str, Any]:
    """A training run (`cdp_training.learn.train_run`): the candidate's bytes, version and decision."""
    from cdp_training import learn
    from cdp_training.labels import LabelSpec

    live = learn.live_from_onnx(live_onnx) if live_onnx else None
    if model != "clusters":
        # The label is read before the store (minutes at scale): a bad one is refused at once, naming its field.
        label = dict(label) if label else learn.label_for(model, live.spec if live else None)
        LabelSpec.from_dict(label)
    report("reading", 0, 5.0, "reading the profile store")
    profiles = asyncio.run(learn.read_store(store_url))
    report("reading", len(profiles), PERCENT["reading"], f"{len(profiles)} profiles read")
    if model == "clusters":  # unsupervised: no label, no evaluation slice (cdp_training.clusters)
        from cdp_training import clusters

        cut = learn.parse_time(cutoff, "cutoff") if cutoff else clusters.default_cutoff(profiles)
        run = clusters.train_run(profiles, cutoff=cut, live=live.spec if live else None)
        report("fitting", run.record["training"]["rows"], PERCENT["fitting"], "clusters fitted")
        return {"onnx": run.data, "version": run.version, "decision": run.decision}
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
    """Realised quality (`cdp_training.realised`) of the version in `onnx`."""
    from cdp_training import learn
    from cdp_training.labels import LabelSpec
    from cdp_training.realised import realised_quality

    spec = learn.live_from_onnx(onnx).spec
    label = learn.label_for(spec.name, spec)  # refused before the store is read
    LabelSpec.from_dict(label)
    report("reading", 0, 5.0, "reading the profile store")
    profiles = asyncio.run(learn.read_store(store_url))
    report("reading", len(profiles), 50.0, f"{len(profiles)} profiles read")
    return realised_quality(profiles, onnx, label=label)


JOBS = {"train": _train, "quality": _quality}


def _error_doc(error: BaseException) -> dict[str, Any]:
    if isinstance(error, InvalidArgument):
        return {"type": "InvalidArgument", "field": error.field, "message": error.description, "reason": error.reason}
    if isinstance(error, CdpError):
        return {"type": type(error).__name__, "message": error.message, "reason": error.reason}
    # Its type and where it was raised, never its text: that quotes what the code had in hand (a person's
    # feature value, an identifier), and the operator who ran the job is shown it.
    return {"type": "Internal", "message": describe_failure(error)}


def _serve(jobs, results, service: int) -> None:
    """The worker's loop: each job's progress, then ("result", ...) or ("error", ...). It ends when told,
    or once the service process (`service`, its parent) is gone: killed, nobody would stop the worker or
    read its answers."""
    while True:
        try:
            item = jobs.get(timeout=1.0)
        except queues.Empty:
            if os.getppid() != service:
                return
            continue
        if item is None:
            return
        job, kwargs = item
        started = time.monotonic()

        def report(phase: str, rows: int, percent: float, message: str, started: float = started) -> None:
            progress = {"phase": phase, "rows": rows, "percent": percent, "message": message}
            results.put(("progress", progress | {"elapsed": time.monotonic() - started}))

        try:
            results.put(("result", JOBS[job](report, **kwargs)))
        except Exception as error:  # every failure goes back to the service, which answers with it
            results.put(("error", _error_doc(error)))


# --- in the service -------------------------------------------------------------------------------------


def _error_from(doc: Mapping[str, Any]) -> CdpError:
    if doc["type"] == "InvalidArgument":
        return InvalidArgument(doc["field"], doc["message"], reason=doc.get("reason"))
    kind = getattr(errors, doc["type"], None)
    if isinstance(kind, type) and issubclass(kind, CdpError) and kind is not InvalidArgument:
        return kind(doc["message"], reason=doc.get("reason"))
    return CdpError(f"the worker process failed: {doc['message']}", reason="worker_failed")


class Worker:
    def __init__(self, idle: float = 60.0) -> None:
        self.idle = idle
        self._lock = asyncio.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._jobs: Any = None
        self._results: Any = None
        self._idle_timer: asyncio.TimerHandle | None = None

    async def run(self, job: str, **kwargs: Any) -> AsyncIterator[tuple[str, Any]]:
        """Run `job`; yields ("progress", {...}) and last ("result", {...}); raises the job's error.
        Use it under `contextlib.aclosing`, so that a caller going away ends the job at once."""
        if not training_available():
            raise FailedPrecondition(
                "training runs and quality checks need the cdp-training package installed beside the scoring service",
                reason="training_unavailable",
            )
        async with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if self._process is None or not self._process.is_alive():
                self._start()
            self._jobs.put((job, kwargs))
            answered = False
            try:
                while True:
                    try:
                        kind, payload = await asyncio.to_thread(self._results.get, True, 0.25)
                    except queues.Empty:
                        if not self._process.is_alive():
                            raise CdpError(
                                f"the worker process ended during the {job} job (exit code {self._process.exitcode})",
                                reason="worker_failed",
                            ) from None
                        continue
                    if kind == "error":
                        answered = True
                        raise _error_from(payload)
                    if kind == "result":
                        answered = True
                    yield kind, payload
                    if answered:
                        return
            finally:
                if answered:
                    self._idle_timer = asyncio.get_running_loop().call_later(self.idle, self.stop)
                else:
                    self.stop()  # still working on a job nobody waits for

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._jobs, self._results = context.Queue(), context.Queue()
        self._process = context.Process(
            target=_serve, args=(self._jobs, self._results, os.getpid()), name="cdp-scoring-worker", daemon=True
        )
        self._process.start()

    def stop(self) -> None:
        """End the process now (between jobs, or abandoning the one it runs)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        process, self._process = self._process, None
        if process is not None and process.is_alive():
            process.terminate()
            process.join(2)
        for channel in (self._jobs, self._results):
            if channel is not None:
                # What is left in them is abandoned: a job the process never read (a model's ONNX bytes
                # are more than a pipe holds) would otherwise keep the queue's feeder thread writing to
                # nobody, and the service from exiting, at interpreter shutdown.
                channel.cancel_join_thread()
                channel.close()
        self._jobs = self._results = None
