"""OpenTelemetry traces and metrics for a cdp service.

Traces go to an OTLP/HTTP collector when OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard OTel variable);
otherwise spans are still created, so logs carry trace ids and context still crosses gRPC and NATS.

Sampling: parent-based, so a trace is kept or dropped whole across services - a call or message whose
caller sampled its trace is recorded, one whose caller did not is not - and a trace that starts here
(a call without trace context, an engine batch) is kept with probability OTEL_TRACES_SAMPLER_ARG
(default 0.1). OTEL_TRACES_SAMPLER, when set, chooses any sampler the OTel SDK knows instead
(`parentbased_always_on` records everything, as the SDK does by default). A span that is not sampled
still has its trace and span ids (logs carry them, outgoing calls and messages propagate them with the
sampled flag off) but records nothing: no attributes, events or links are kept, no exporter sees it,
and code that builds something only for a span (the engine's links) asks `span.is_recording()` first.
Metrics are exposed for Prometheus on CDP_METRICS_PORT (/metrics) when it is not 0, on the address the
service's gRPC server binds (CDP_GRPC_HOST): the endpoint has no authentication, so it is reachable exactly
where the service is — loopback on a laptop (`make up`), the pod's interfaces in Kubernetes, whose chart
leaves the host at its 0.0.0.0 default.

Metric names follow the OpenTelemetry convention: dotted, lower case, `cdp.<service>.<thing>` (the kit's own
are `cdp.bus.*`; standard instruments keep their semantic-convention names, e.g. `rpc.server.duration`),
with the unit in `unit=` ("ms", "By", "{event}") and never in the name, and no `_total`: the Prometheus
exporter derives those, so `cdp.collector.events` (a counter, unit "{event}") is scraped as
`cdp_collector_events_total` and `cdp.bus.handle.duration` (a histogram, unit "ms") as
`cdp_bus_handle_duration_milliseconds_bucket`/`_sum`/`_count`. Variants go in attributes (`outcome`,
`cause`), not in names. Every attribute value multiplies a metric's series, and a histogram series is
~19 lines: keep an attribute whose values grow with the deployment (partitions, traits, persons) off
histograms (the kit's engine times batches per service, and only its lag gauge is per partition). The
page carries no scope labels: each process has one meter, `cdp.<service>`. cdp-kit's `tests/test_metric_names.py` checks every instrument created in the
repository's sources.

An exception that leaves a span (`with tracer.start_as_current_span(...)`: the engine's apply span) is
recorded by its type and its traceback with every exception's message withheld (`cdp_kit.logging`), and the
span's status says the type alone: spans are exported like logs, and an exception's text quotes the values
the code had in hand (`KeyError('email:ada@example.com')`). The OpenTelemetry SDK itself records `str(exc)`
in an event and in the status, so `Telemetry.tracer` is the SDK's behind `WithheldExceptions`; a test
checks no source takes a tracer from OpenTelemetry directly.

OpenTelemetry keeps one global provider per process. The first service set up in a process installs its
providers as the globals (a real deployment runs one service per process); later calls in the same
process (in-process tests) reuse them, so instruments never end up on a provider nobody reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode

from cdp_kit.logging import format_exception

log = logging.getLogger(__name__)

# The share of traces started here that are recorded, unless OTEL_TRACES_SAMPLER(_ARG) says otherwise.
DEFAULT_TRACE_RATIO = 0.1

# Histogram buckets in milliseconds: sub-millisecond to tens of seconds.
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class WithheldExceptions(trace.Tracer):
    """A tracer whose spans record an exception that leaves them by its type and where it was raised, never
    its message (module docstring); everything else is the wrapped tracer's."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes=None,
        links=None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        # What the SDK records from these two is done by `start_as_current_span` below; a span started here
        # and made current by `trace.use_span` records nothing of an exception.
        return self._tracer.start_span(
            name, context, kind, attributes, links, start_time, record_exception=False, set_status_on_exception=False
        )

    @contextlib.contextmanager
    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes=None,
        links=None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        with self._tracer.start_as_current_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception=False,
            set_status_on_exception=False,
            end_on_exit=end_on_exit,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                if span.is_recording():
                    kind_name = type(exc).__qualname__
                    if record_exception:
                        span.add_event(
                            "exception",
                            {
                                "exception.type": kind_name,
                                "exception.message": "withheld",
                                "exception.stacktrace": format_exception(exc),
                                "exception.escaped": "False",
                            },
                        )
                    if set_status_on_exception:
                        span.set_status(Status(StatusCode.ERROR, kind_name))
                raise


@dataclass
class Telemetry:
    service_name: str
    tracer: trace.Tracer
    meter: metrics.Meter
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    metrics_server: object | None = field(default=None, repr=False)

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            # shutdown() only ends the serving loop; server_close() releases the port.
            for step in ("shutdown", "server_close"):
                call = getattr(self.metrics_server, step, None)
                if callable(call):
                    call()
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(2000)


def setup_telemetry(
    service_name: str,
    *,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    span_processors: Iterable[SpanProcessor] = (),
    metric_readers: Iterable[MetricReader] = (),
) -> Telemetry:
    resource = Resource.create({"service.name": service_name, "service.namespace": "cdp"})
    tracer_provider: TracerProvider | None = None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        tracer_provider = current
    else:
        tracer_provider = TracerProvider(resource=resource, sampler=trace_sampler())
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)

    readers: list[MetricReader] = list(metric_readers)
    metrics_server = None
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        # No scope labels (`otel_scope_name`, ...) on every line: a service has one meter, `cdp.<service>`,
        # which the scrape target names already; they were ~40 % of a busy service's page.
        readers.append(PrometheusMetricReader(scope_info_enabled=False))
        metrics_server, _thread = start_http_server(metrics_port, addr=metrics_host)
        log.info("metrics at http://%s:%d/metrics", metrics_host, metrics_port)
    meter_provider: MeterProvider | None = None
    current_meter_provider = metrics.get_meter_provider()
    if isinstance(current_meter_provider, MeterProvider) and not readers:
        meter_provider = current_meter_provider
    else:
        # Exemplars cost ~10 µs per recorded value and the Prometheus exporter drops them; opt back in
        # with OTEL_METRICS_EXEMPLAR_FILTER=trace_based when an exporter that keeps them is configured.
        exemplars = None if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else AlwaysOffExemplarFilter()
        meter_provider = MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=exemplars)
        if not isinstance(current_meter_provider, MeterProvider):
            metrics.set_meter_provider(meter_provider)
    return Telemetry(
        service_name=service_name,
        tracer=WithheldExceptions(tracer_provider.get_tracer(f"cdp.{service_name}")),
        meter=meter_provider.get_meter(f"cdp.{service_name}"),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics_server=metrics_server,
    )


def trace_sampler(environ: Mapping[str, str] = os.environ) -> Sampler | None:
    """The sampler of this process' traces (see the module docstring); None lets the OTel SDK build the
    one OTEL_TRACES_SAMPLER names."""
    if environ.get("OTEL_TRACES_SAMPLER"):
        return None
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not raw:
        return ParentBased(TraceIdRatioBased(DEFAULT_TRACE_RATIO))
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r}: give the share of traces to keep, from 0 to 1")
    return ParentBased(TraceIdRatioBased(ratio))


def inject_context(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write W3C trace context (traceparent/tracestate) into message headers or gRPC metadata."""
    propagate.inject(carrier, context=context)


def extract_context(carrier: Mapping[str, str] | None) -> Context:
    return propagate.extract(carrier or {})


# (meter, instrument name) -> the meter and the objects reporting to that observable gauge, each with its function.
_SHARED_GAUGES: dict[tuple[int, str], tuple[metrics.Meter, weakref.WeakKeyDictionary]] = {}


def observe_on(
    meter: metrics.Meter,
    name: str,
    owner: object,
    observe: Callable[[object], Iterable[metrics.Observation]],
    create: Callable[[Callable], object],
) -> None:
    """Report `observe(owner)` on the observable gauge `name` of `meter`, which `create` makes once (given
    the callback) for every owner there will be. The OpenTelemetry SDK keeps the first observable instrument
    of a name and drops the callbacks of any later one, so a gauge created per object (a consumer runner, an
    engine) showed only the first object's values: one process's second to last consumers had no lag on
    /metrics. Owners are held weakly; `observe` is a plain function of the owner (not a bound method)."""
    entry = _SHARED_GAUGES.get((id(meter), name))
    if entry is None or entry[0] is not meter:
        owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        def callback(_options):
            for obj, fn in list(owners.items()):
                yield from fn(obj)

        create(callback)
        entry = _SHARED_GAUGES[(id(meter), name)] = (meter, owners)
    entry[1][owner] = observe
