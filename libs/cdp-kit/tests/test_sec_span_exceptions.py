"""A span ended by an exception is exported without the exception's message.

Spans are exported like logs (OTLP, wherever OTEL_EXPORTER_OTLP_ENDPOINT points), and an exception's
text is where a value slips in unnoticed (`KeyError('email:ada@example.com')`, a store error quoting a
key: `cdp_kit.logging`). The OpenTelemetry SDK's `start_as_current_span` records an exception that leaves
its block as a span event holding `str(exc)` and its traceback, and sets the span's status description to
`<type>: <message>`: the engine's `<stream> apply` span did, for every failed batch. The kit's tracer
keeps the type and where it was raised, never the message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from cdp_kit.telemetry import setup_telemetry

VALUE = "ada@example.com"
# A caller that sampled its trace: the kit's parent-based sampler records the span whatever its ratio.
SAMPLED = trace.set_span_in_context(
    NonRecordingSpan(SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
)


@pytest.fixture
def exported():
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("sec-spans", span_processors=[SimpleSpanProcessor(exporter)])
    yield telemetry, exporter
    exporter.shutdown()


def everything_in(span) -> str:
    """Every text an exporter sends of the span: status, attributes, events and their attributes."""
    parts = [str(span.status.description), str(dict(span.attributes or {}))]
    for event in span.events:
        parts += [event.name, str(dict(event.attributes or {}))]
    return "\n".join(parts)


async def test_an_exception_leaving_a_span_is_recorded_by_its_type_and_place_never_its_message(exported):
    telemetry, exporter = exported

    async def apply():
        raise KeyError(f"email:{VALUE}")

    with pytest.raises(KeyError):
        with telemetry.tracer.start_as_current_span("EVENTS_RESOLVED apply", context=SAMPLED):
            await apply()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "EVENTS_RESOLVED apply"]
    assert VALUE not in everything_in(span)
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "KeyError"
    (event,) = span.events
    assert event.name == "exception" and event.attributes["exception.type"] == "KeyError"
    assert "in apply" in event.attributes["exception.stacktrace"]  # where it was raised is kept


def test_a_span_that_asks_for_no_recording_gets_none(exported):
    telemetry, exporter = exported
    with pytest.raises(ValueError):
        with telemetry.tracer.start_as_current_span(
            "quiet", context=SAMPLED, record_exception=False, set_status_on_exception=False
        ):
            raise ValueError(VALUE)
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "quiet"]
    assert not span.events and span.status.status_code is StatusCode.UNSET


def test_every_span_in_the_sources_comes_from_the_kits_tracer():
    """The withholding is the kit tracer's (`Telemetry.tracer`): a tracer taken from OpenTelemetry directly
    would export messages again."""
    root = Path(__file__).resolve().parents[3]
    stray = re.compile(r"\bget_tracer\(|trace\.get_tracer_provider\(\)\.get_tracer")
    found = [
        str(path.relative_to(root))
        for base in ("libs", "services")
        for path in (root / base).glob("*/src/**/*.py")
        if stray.search(path.read_text()) and path.name != "telemetry.py"
    ]
    assert found == []
