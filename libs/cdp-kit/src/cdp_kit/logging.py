"""Structured JSON logs carrying the current trace and span ids.

Logs name fields and ids, never customer data. An exception's message is the one place a value slips in
unnoticed (`KeyError('email:ada@example.com')`, a store error quoting a key), so a logged exception keeps
its type, its chain and every frame of its traceback, and withholds its message; a bad-input error keeps
the field it names.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime

import orjson
from opentelemetry import trace

# Attributes every LogRecord has; anything else passed via `extra=` is emitted as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def format_exception(exc: BaseException) -> str:
    """A traceback as Python prints it, each exception's message withheld (see the module docstring)."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts: list[str] = []
    for earlier, each in zip([None, *reversed(chain)], reversed(chain), strict=False):
        if earlier is not None:
            caused = each.__cause__ is earlier
            parts.append(
                "\nThe above exception was the direct cause of the following exception:\n\n"
                if caused
                else "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(each.__traceback__))
        kind = type(each)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        field = getattr(each, "field", None)
        parts.append(f"{name}{f' (field {field})' if isinstance(field, str) else ''}: message withheld\n")
    return "".join(parts)


class _WithheldExceptions(logging.Formatter):
    def formatException(self, ei) -> str:
        return format_exception(ei[1]) if ei[1] is not None else ""


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = format_exception(record.exc_info[1]) if record.exc_info[1] is not None else ""
        return orjson.dumps(entry, default=str).decode()


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(_WithheldExceptions(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
