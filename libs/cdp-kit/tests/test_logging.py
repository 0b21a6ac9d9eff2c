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


def _logged(exc_info) -> str:
    rec = logging.LogRecord("cdp.test", logging.ERROR, __file__, 1, "unhandled error in %s", ("Resolve",), exc_info)
    return JsonFormatter("identity").format(rec)


def test_a_logged_exception_keeps_its_type_and_frames_and_withholds_its_message():
    from cdp_kit.errors import InvalidArgument

    email = "@".join(("ada", "example.com"))  # built at run time: tracebacks show source lines

    def look_up(key):
        return {}[key]

    try:
        try:
            look_up(f"email:{email}")
        except KeyError as exc:
            raise InvalidArgument("identifier.value", f"{email!r} is not resolvable") from exc
    except InvalidArgument:
        import sys

        line = json.loads(_logged(sys.exc_info()))

    assert "ada@example.com" not in json.dumps(line)
    text = line["exception"]
    assert "KeyError: message withheld" in text and "in look_up" in text  # the cause and its frame
    assert "cdp_kit.errors.InvalidArgument (field identifier.value): message withheld" in text
    assert text.index("KeyError") < text.index("InvalidArgument")  # in the order Python prints them


def test_text_logs_withhold_exception_messages_too(capsys):
    from cdp_kit.logging import configure_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("identity", fmt="text")
        try:
            raise ValueError("+44770090" + "0123 is not a phone")
        except ValueError:
            logging.getLogger("cdp.test").exception("bad phone")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "ValueError: message withheld" in err and "+447700900123" not in err
