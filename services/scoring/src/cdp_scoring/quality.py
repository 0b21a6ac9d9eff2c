"""Realised quality of the live versions: computed on the latest closed label window, kept beside the
training figures.

The computation is `cdp_training.realised.realised_quality` (the point-in-time rows at the latest
cut-off whose label window the profile store has observed, scored by the live version's own file,
labelled by its spec's label definition), run in the worker process (worker.py) on the
schedule `CDP_SCORING_QUALITY_SCHEDULE` and on request (`GetModelQuality` with refresh). Labels arrive
as the windows close and as label events land on timelines, so each computation takes the newest window
there is.

The last figures per model are stored (`scoring_quality`, key: the model), so they survive a restart
and every replica reads the same; they name the version they describe, and a model whose live version
changed since shows none until computed again. They are exported as `cdp.scoring.quality.auc` and
`cdp.scoring.quality.brier` (model and version attributes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from opentelemetry.metrics import Observation

from cdp_kit.errors import CdpError, FailedPrecondition
from cdp_kit.storage import Put, Store
from cdp_scoring.worker import Worker

log = logging.getLogger("cdp.scoring.quality")

QUALITY = "scoring_quality"


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
    ) -> None:
        self.engine = engine
        self.worker = worker
        self.store = store
        self.store_url = store_url
        self.clock = clock
        self.figures: dict[str, dict[str, Any]] = {}  # model -> {"version", "realised", "computed_at"}
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

    async def refresh(self, model: str) -> dict[str, Any]:
        """Compute the live version's realised quality now, keep it and return it."""
        live = self.engine.registry.get(model).live
        if live is None:
            raise FailedPrecondition(f"model {model!r} has no live version", reason="no_live_version")
        if not self.store_url:
            raise FailedPrecondition(
                "realised quality reads the profile store: set CDP_SCORING_TRAINING_STORE to the profile "
                "service's store URL",
                reason="training_unavailable",
            )
        onnx = await self.engine.model_store.get(live.spec.name, live.version, live.sha256)
        realised: dict[str, Any] = {}
        job = self.worker.run("quality", store_url=self.store_url, onnx=onnx)
        async with aclosing(job):
            async for kind, payload in job:
                if kind == "result":
                    realised = payload
        figures = {"version": live.version, "realised": realised, "computed_at": self.clock()}
        await self.store.bulk_write([Put(QUALITY, model, figures)])
        self.figures[model] = figures
        log.info("realised quality computed", extra={"model": model, "version": live.version})
        return figures

    async def refresh_all(self) -> None:
        """Every live model's (the schedule): a model that cannot be judged is logged and skipped."""
        for entry in sorted(self.engine.registry, key=lambda e: e.name):
            if entry.live is None:
                continue
            try:
                await self.refresh(entry.name)
            except CdpError as error:
                log.warning("realised quality not computed", extra={"model": entry.name, "why": error.message})
