"""Requests refused for their write key, counted and said by why, at both front doors.

A disabled source and a wrong key are both answered 401 / UNAUTHENTICATED; only the client's answer said
which ("source 'ios' is disabled"), so a support engineer asked "why did our iOS app's events stop" could
not tell from the collector's logs or metrics. Here:

- `cdp.collector.write_key.refused` counts every such request by `transport`, `reason` (`missing_key`,
  `unknown_key`, `source_disabled`) and, for a disabled source only, `source`: its id, which is
  configuration (the sources file), not personal data. An unknown key belongs to no source and is never
  a label or a log field: a wrong key is often a real key of another source or platform.
- A disabled source is said in a WARNING naming its id, the first at once, then at most one line a minute
  per source with the count (EveryMinute). A key no source has is already said by each front door's own
  refusal line (HTTP's `http request refused` with reason `401 unknown_key`, gRPC's `grpc call
  rejected` with reason `unknown_key`).
"""

from __future__ import annotations

import logging

from cdp_collector.abandoned import EveryMinute
from cdp_collector.sources import KeyRefused
from cdp_kit.telemetry import Telemetry

log = logging.getLogger("cdp.collector.sources")


class KeyRefusals:
    def __init__(self, telemetry: Telemetry) -> None:
        self._metric = telemetry.meter.create_counter(
            "cdp.collector.write_key.refused",
            unit="{request}",
            description="requests refused for their write key, by transport, reason and (a disabled source) source",
        )
        self._disabled: dict[str, EveryMinute] = {}

    def __call__(self, refused: KeyRefused, *, transport: str) -> None:
        source_id = refused.source_id
        if source_id is None:
            self._metric.add(1, {"transport": transport, "reason": refused.reason})
            return
        self._metric.add(1, {"transport": transport, "reason": refused.reason, "source": source_id})
        report = self._disabled.get(source_id)
        if report is None:
            quoted = repr(source_id).replace("%", "%%")  # a `%` in an id is no directive of the summary
            report = self._disabled[source_id] = EveryMinute(
                log,
                first=f"source {source_id!r} is disabled in CDP_COLLECTOR_SOURCES_FILE: its requests are refused "
                "(HTTP 401, gRPC UNAUTHENTICATED) and none of its events stored; enable it there, or give its "
                "clients an enabled source's key",
                summary=f"source {quoted} is disabled: %d of its requests refused in the last minute",
                unit="requests",
                level=logging.WARNING,
                context={"source": source_id},
            )
        report(f"{transport} {refused.reason}", transport=transport)

    def close(self) -> None:
        for report in self._disabled.values():
            report.close()
