"""Metrics a test can read back: a service's `Telemetry` whose meter records into memory.

captured = MetricsCapture("scoring")
engine = ScoringEngine(..., telemetry=captured.telemetry)
...
unit, points = captured.collected()["cdp.scoring.rows"]
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cdp_kit.telemetry import Telemetry


class MetricsCapture:
    def __init__(self, service: str) -> None:
        self.reader = InMemoryMetricReader()
        meter = MeterProvider(metric_readers=[self.reader]).get_meter(f"cdp.{service}")
        self.telemetry = Telemetry(service_name=service, tracer=trace.NoOpTracer(), meter=meter)

    def collected(self) -> dict[str, tuple[str, list]]:
        """{metric name: (unit, data points)} as recorded so far."""
        out: dict[str, tuple[str, list]] = {}
        data = self.reader.get_metrics_data()
        if data is None:  # nothing recorded yet: a test may poll before the first measurement
            return out
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out[metric.name] = (metric.unit, list(metric.data.data_points))
        return out
