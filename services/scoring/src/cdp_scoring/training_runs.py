"""Training runs started by the service: by API (`TrainModel`), on a schedule (`CDP_SCORING_TRAIN_SCHEDULE`)
or after drift (`CDP_SCORING_DRIFT_RETRAIN`).

A run is `cdp_training.learn.train_run` (point-in-time sets from the profile store at
`CDP_SCORING_TRAINING_STORE`, read only; the candidate and the live version judged on a later slice)
in the worker process (worker.py), so the service keeps scoring while the trees are fitted; it sends
its progress (phase, rows, percent) and then its result. The candidate comes back as ONNX bytes and is
registered here, as `learn.register` does: a
model's first version goes live; otherwise the candidate goes to shadow beside live and is promoted
only when the decision says it beat live by the margin. The decision and its reason stay in the
version's spec (`training.promotion`), with the reference bins drift is measured against.

A run is checked before anything starts: the model must be one the service has (a deployed version's
features are the candidate's) or one the training code has defaults for (`DEFAULTS`), and the cut-offs
and margin must read; only then is the worker started (it checks the label before reading the store).

One run per model at a time: a second one is refused while the first runs (a scheduled time that finds
its model training is skipped). Runs of different models, and quality checks, take turns in the
worker. A run cancelled (the caller went away, the service stops) ends the worker's job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

from cdp_kit.errors import CdpError, FailedPrecondition, InvalidArgument
from cdp_scoring.domain.registry import LIVE, SHADOW
from cdp_scoring.schedule import parse_time
from cdp_scoring.worker import Worker

log = logging.getLogger("cdp.scoring.training")

# The models the training code has default features, outputs and a label for (`cdp_training.learn.TRAINABLE`),
# and the unsupervised one it clusters (`cdp_training.clusters`, no label). Named here because this process
# does not import the training stack; a test holds the lists equal.
DEFAULT_LABELS = frozenset({"churn_risk", "purchase_propensity", "fraud_risk", "next_best_channel"})
UNSUPERVISED = "clusters"
DEFAULTS = DEFAULT_LABELS | {UNSUPERVISED}


def has_label(model: str, spec) -> bool:
    """Whether `model` (its live version's `spec`, or None) can be judged or trained without a label given:
    its version's own `training.label` definition, else a default of the training code."""
    own = spec.training.get("label") if spec is not None and isinstance(spec.training, Mapping) else None
    return (isinstance(own, Mapping) and "kind" in own) or model in DEFAULT_LABELS


class TrainingRuns:
    """Starts the runs of the service's models and registers their candidates."""

    def __init__(self, engine, store_url: str, worker: Worker) -> None:
        self.engine = engine
        self.store_url = store_url
        self.worker = worker
        self.running: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}  # model -> the last run's outcome (or error)
        self._background: set[asyncio.Task] = set()

    def check(self, model: str, *, label: Mapping[str, Any] | None = None) -> None:
        """Refuse a run that cannot happen before anything starts: the arguments first (naming the field),
        then what the service lacks."""
        if not model:
            raise InvalidArgument("model", "is required")
        entry = self.engine.registry.models.get(model)
        live = entry.live if entry is not None else None
        if live is None and model not in DEFAULTS:
            known = sorted(DEFAULTS | {e.name for e in self.engine.registry if e.live is not None})
            raise InvalidArgument(
                "model",
                f"{model!r} has no live version here and no default features to train with; known: {', '.join(known)}",
            )
        if label is None and model != UNSUPERVISED and not has_label(model, live.spec if live else None):
            raise InvalidArgument(
                "label", f"model {model!r} has no label definition in its live version and no default: give one"
            )
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
        if margin is not None and not (math.isfinite(margin) and margin >= 0):
            raise InvalidArgument("margin", f"{margin!r} must be a finite number of metric points >= 0")
        for field_name, value in (("cutoff", cutoff), ("evaluate_at", evaluate_at)):
            if value:
                parse_time(value, field_name)  # refused now, not once the worker has read the store
        self.check(model, label=label)
        self.running.add(model)
        started = time.monotonic()
        try:
            entry = self.engine.registry.models.get(model)
            live = entry.live if entry is not None else None
            live_onnx = await self.engine.model_store.get(live.spec.name, live.version, live.sha256) if live else None
            log.info("training run started", extra={"model": model, "trigger": trigger})
            result: dict[str, Any] = {}
            job = self.worker.run(
                "train",
                store_url=self.store_url,
                model=model,
                live_onnx=live_onnx,
                cutoff=cutoff,
                evaluate_at=evaluate_at,
                margin=margin,
                label=dict(label) if label else None,
            )
            async with aclosing(job):
                async for kind, payload in job:
                    if kind == "progress":
                        yield payload
                    else:
                        result = payload
            yield {"phase": "registering", "percent": 95.0, "message": f"registering {result['version']}"}
            role, note = await self._register(model, result["onnx"], result["version"], result["decision"], live)
            decision = result["decision"]
            outcome = {
                "phase": "done",
                "done": True,
                "percent": 100.0,
                "version": result["version"],
                "role": role,
                "promoted": role == LIVE,
                "reason": f"{note}; {decision['reason']}" if note else decision["reason"],
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

    async def _register(
        self, model: str, data: bytes, version: str, decision: Mapping[str, Any], live
    ) -> tuple[str, str]:
        """As `cdp_training.learn.register` (not imported: the service process keeps the training stack
        out): the first version goes live; else shadow, promoted when the decision says so. Returns the
        role the version ends in, and why when that is not the decision's doing."""
        entry = self.engine.registry.models.get(model)
        existing = entry.versions.get(version) if entry is not None else None
        if existing is not None:
            # The same data trains the same version; its file differs only in the decision it records.
            return existing.role, f"{version} was trained on the same data before and is registered ({existing.role})"
        if live is None:
            await self.engine.deploy(data, role=LIVE)
            return LIVE, ""
        await self.engine.deploy(data, role=SHADOW)
        if decision["promote"]:
            await self.engine.promote(model, version)
            return LIVE, ""
        return SHADOW, ""

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
