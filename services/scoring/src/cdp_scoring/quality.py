"""Realised quality of the live versions: computed on the latest closed label window, kept beside the
training figures.

The computation is `cdp_training.realised.realised_quality` (the point-in-time rows at the latest
cut-off whose label window the profile store has observed, scored by the live version's own file,
labelled by its spec's label definition), run in the worker process (worker.py).

**When.** Figures are computed when labels arrive, not only on a clock:
- a label event of the model's spec reaches the platform (`events.resolved`: a chargeback or a case
  closed as fraud, an order for conversion; labelwatch.py says which events label which model);
- a label window closes: a UTC day boundary has passed since the figures were computed (the latest
  closed cut-off moves a day, and a day's cohort of churn labels becomes known);
- a version became live and has no figures yet (computed a debounce period later: nothing arrived);
and also on the schedule `CDP_SCORING_QUALITY_SCHEDULE` and on request (`GetModelQuality` with refresh).
An arrival marks the model's figures stale (`stale_since`, the first trigger since they were computed);
they are computed again `CDP_SCORING_QUALITY_SETTLE_SECONDS` later (so the profile service has stored the
label the event carries), but at most once per `CDP_SCORING_QUALITY_DEBOUNCE_SECONDS` per model: a flood
of labels costs one computation per period, not one per label. Whatever computes the figures (request,
schedule) clears what was stale before it started.

Label events go to one replica (a durable consumer they share, labelwatch.py: one that arrives while
every replica is down waits in it); the window and new-version checks run on the replica
holding partition 0. A replica whose figures are due first reads the stored ones: when another replica
computed them after the labels arrived, it takes those instead of computing again.

The last figures per model are stored (`scoring_quality`, key: the model), so they survive a restart
and every replica reads the same; they name the version they describe, what triggered them and the
labelled rows they were computed on, and a model whose live version changed since shows none until
computed again. They are exported as `cdp.scoring.quality.auc` and `cdp.scoring.quality.brier` (model
and version attributes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import aclosing
from typing import Any

from opentelemetry.metrics import Observation

from cdp_kit.errors import CdpError, FailedPrecondition
from cdp_kit.storage import Put, Store
from cdp_scoring.labelwatch import LabelWatch
from cdp_scoring.training_runs import has_label
from cdp_scoring.worker import Worker

log = logging.getLogger("cdp.scoring.quality")

QUALITY = "scoring_quality"
DAY = 86_400.0
# Triggers (the figures' "trigger"); a label event's is LABEL_EVENT + its name.
REQUEST, SCHEDULE, NEW_VERSION, WINDOW_CLOSED, LABEL_EVENT = (
    "request",
    "schedule",
    "new live version",
    "label window closed",
    "label event ",
)


class RealisedQuality:
    def __init__(
        self,
        engine,
        store: Store,
        store_url: str,
        worker: Worker,
        *,
        meter=None,
        clock: Callable[[], float] = time.time,
        settle: float = 30.0,
        debounce: float = 600.0,
    ) -> None:
        self.engine = engine
        self.worker = worker
        self.store = store
        self.store_url = store_url
        self.clock = clock
        self.settle = settle
        self.debounce = debounce
        # model -> {"version", "realised", "computed_at", "trigger"}
        self.figures: dict[str, dict[str, Any]] = {}
        # model -> {"since", "trigger", "labels"}: what arrived since its figures were computed
        self.stale: dict[str, dict[str, Any]] = {}
        # model -> (version, time) of its last failed computation: not retried before the next day
        self.failed: dict[str, tuple[str, float]] = {}
        self.watch = LabelWatch()
        self._watched: tuple[tuple[str, str, bool], ...] = ()
        self._due: dict[str, asyncio.Task] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        if meter is not None:
            meter.create_observable_gauge(
                "cdp.scoring.quality.auc",
                callbacks=[lambda _options: self._observe("auc")],
                unit="1",
                description="the live version's AUC on the latest closed label window",
            )
            meter.create_observable_gauge(
                "cdp.scoring.quality.brier",
                callbacks=[lambda _options: self._observe("brier")],
                unit="1",
                description="the live version's Brier score on the latest closed label window",
            )

    def _observe(self, key: str) -> list[Observation]:
        return [
            Observation(figures["realised"][key], {"model": model, "version": figures["version"]})
            for model, figures in self.figures.items()
            if isinstance(figures.get("realised", {}).get(key), int | float)
        ]

    async def load(self) -> None:
        async for record in self.store.scan_all(QUALITY):
            self.figures[record.key] = record.doc

    async def get(self, model: str) -> dict[str, Any] | None:
        """The last figures of `model`'s live version (None: not computed for this version yet)."""
        live = self.engine.registry.get(model).live
        record = await self.store.get(QUALITY, model)
        if record is not None:
            self.figures[model] = record.doc
        figures = self.figures.get(model)
        if live is None or figures is None or figures.get("version") != live.version:
            return None
        return figures

    async def refresh(self, model: str, trigger: str = REQUEST) -> dict[str, Any]:
        """Compute the live version's realised quality now, keep it and return it."""
        async with self._computing(model):
            return await self._refresh(model, trigger)

    def _computing(self, model: str) -> asyncio.Lock:
        """Held while `model`'s figures are computed: a computation falling due meanwhile waits, then finds
        what it was due for done (the schedule's run of every model and a label's must not both run)."""
        lock = self._locks.get(model)
        if lock is None:
            lock = self._locks[model] = asyncio.Lock()
        return lock

    async def _refresh(self, model: str, trigger: str) -> dict[str, Any]:
        live = self.engine.registry.get(model).live
        if live is None:
            raise FailedPrecondition(f"model {model!r} has no live version", reason="no_live_version")
        if not self.store_url:
            raise FailedPrecondition(
                "realised quality reads the profile store: set CDP_SCORING_TRAINING_STORE to the profile "
                "service's store URL",
                reason="training_unavailable",
            )
        if not has_label(model, live.spec):
            # Nothing to judge it on: refused before the worker starts and the store is read.
            self.failed[model] = (live.version, self.clock())
            raise FailedPrecondition(
                f"model {model!r} has no label definition (its version's training.label) and no default",
                reason="no_label",
            )
        started = self.clock()
        onnx = await self.engine.model_store.get(live.spec.name, live.version, live.sha256)
        realised: dict[str, Any] = {}
        job = self.worker.run("quality", store_url=self.store_url, onnx=onnx)
        try:
            async with aclosing(job):
                async for kind, payload in job:
                    if kind == "result":
                        realised = payload
        except CdpError:
            self.failed[model] = (live.version, self.clock())
            raise
        figures = {"version": live.version, "realised": realised, "computed_at": self.clock(), "trigger": trigger}
        await self.store.bulk_write([Put(QUALITY, model, figures)])
        self.figures[model] = figures
        self.failed.pop(model, None)
        stale = self.stale.get(model)
        if stale is not None and stale["since"] <= started:  # what arrived before the read is in the figures
            del self.stale[model]
        self._watch_labels()
        log.info("realised quality computed", extra={"model": model, "version": live.version, "trigger": trigger})
        return figures

    async def refresh_all(self) -> None:
        """Every live model's (the schedule): a model that cannot be judged is logged and skipped."""
        for entry in sorted(self.engine.registry, key=lambda e: e.name):
            if entry.live is None:
                continue
            try:
                await self.refresh(entry.name, SCHEDULE)
            except CdpError as error:
                log.warning("realised quality not computed", extra={"model": entry.name, "why": error.message})

    # --- labels arriving ------------------------------------------------------------------------------

    def _watch_labels(self) -> None:
        """Keep the label events watched in step with the live versions and what is known of their labels
        (a version's own `training.label`, else the label its figures were computed with)."""
        live = [(e.name, e.live) for e in self.engine.registry if e.live is not None]
        labels: dict[str, Any] = {}
        for model, version in live:
            label = version.spec.training.get("label") if isinstance(version.spec.training, Mapping) else None
            figures = self.figures.get(model)
            if not isinstance(label, Mapping) and figures is not None and figures.get("version") == version.version:
                label = figures.get("realised", {}).get("label")
            labels[model] = label
        key = tuple((model, version.version, labels[model] is not None) for model, version in live)
        if key != self._watched:
            self._watched = key
            self.watch.update(labels)

    def on_resolved(self, data: bytes) -> None:
        """An `events.resolved` message: mark the models it carries labels of stale."""
        self._watch_labels()
        for model, name in self.watch.labelled(data).items():
            self.mark_stale(model, LABEL_EVENT + name)

    def check_windows(self) -> None:
        """Mark stale the live models whose label window closed since their figures (a UTC day boundary
        passed) and the live versions without figures; a model whose computation failed is tried again
        the next day, not at every check."""
        now = self.clock()
        today = now - now % DAY
        for entry in self.engine.registry:
            live = entry.live
            if live is None or entry.name in self.stale:
                continue
            failed = self.failed.get(entry.name)
            if failed is not None and failed[0] == live.version and failed[1] >= today:
                continue
            figures = self.figures.get(entry.name)
            if figures is None or figures.get("version") != live.version:
                self.mark_stale(entry.name, NEW_VERSION)
            elif figures["computed_at"] < today:
                self.mark_stale(entry.name, WINDOW_CLOSED)

    def mark_stale(self, model: str, trigger: str) -> None:
        """`model`'s figures no longer include what is known: compute them when due (see the module
        docstring); later triggers before then join the same computation."""
        state = self.stale.get(model)
        if state is None:
            state = self.stale[model] = {"since": self.clock(), "trigger": trigger, "labels": 0}
        if trigger.startswith(LABEL_EVENT):
            state["labels"] += 1
        if model not in self._due:
            self._due[model] = asyncio.get_running_loop().create_task(self._when_due(model), name=f"quality {model}")

    def due_at(self, model: str) -> float | None:
        state = self.stale.get(model)
        if state is None:
            return None
        last = self.figures.get(model, {}).get("computed_at", float("-inf"))
        # A version that went live waits a whole period: nothing arrived for it, and a platform starting
        # (its shipped models going live) is not slowed by a computation per model.
        wait = self.debounce if state["trigger"] == NEW_VERSION else self.settle
        return max(state["since"] + wait, last + self.debounce)

    async def _when_due(self, model: str) -> None:
        try:
            # Due moves later when the figures are computed meanwhile and labels come after that.
            due = self.due_at(model)
            while due is not None and due > self.clock():
                await asyncio.sleep(due - self.clock())
                due = self.due_at(model)
            async with self._computing(model):
                state = self.stale.get(model)
                if state is None:
                    return  # a request or the schedule computed them meanwhile
                record = await self.store.get(QUALITY, model)
                if record is not None and record.doc.get("computed_at", 0) >= state["since"]:
                    self.figures[model] = record.doc  # another replica computed them after the labels came
                    del self.stale[model]
                    return
                await self._refresh(model, state["trigger"])
        except CdpError as error:
            self.stale.pop(model, None)
            log.warning("realised quality not computed", extra={"model": model, "why": error.message})
        except Exception:
            self.stale.pop(model, None)
            log.exception("realised quality not computed", extra={"model": model})
        finally:
            if self._due.get(model) is asyncio.current_task():
                del self._due[model]
                if model in self.stale:  # labels came while it was computed: they are due next
                    self._due[model] = asyncio.get_running_loop().create_task(self._when_due(model))

    async def close(self) -> None:
        tasks = list(self._due.values())
        self._due.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
