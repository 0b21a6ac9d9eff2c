import json
import logging

from cdp_kit.logging import JsonFormatter
from cdp_kit.telemetry import setup_telemetry


def record(msg, **extra):
    rec = logging.LogRecord("cdp.test", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_trace_and_extra_fields():
    formatter = JsonFormatter("collector")
    tracer = setup_telemetry("collector").tracer
    with tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(record("stored %d events", source="web")))
        expected_trace = format(span.get_span_context().trace_id, "032x")
    assert line["trace_id"] == expected_trace and len(line["span_id"]) == 16
    assert line["service"] == "collector" and line["level"] == "WARNING" and line["source"] == "web"


def test_outside_a_span_there_is_no_trace_id():
    line = json.loads(JsonFormatter("collector").format(record("idle")))
    assert "trace_id" not in line and line["msg"] == "idle"
