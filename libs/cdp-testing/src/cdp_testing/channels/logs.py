"""The development companions' logs: the local channel servers' and the CRM emulators' processes.

`cdpctl up` appends a companion's stdout and stderr to `.cdp/logs/<name>.log`, which is read like a
service's: one JSON object a line, from `cdp_kit.logging` (so an exception keeps its type and traceback and
withholds its message). What a companion receives is customer data - a path can name a person
(HubSpot's `/crm/v3/objects/contacts/<email>?idProperty=email`), a body holds a phone number or a
message's text - so its lines name routes, statuses and counts, never what a request carried:

- `AccessLog`: one line per HTTP request, with the method, the route's template
  (`/2010-04-01/Accounts/{account}/Messages.json`; none when no route matched), the status and the time
  taken; never the path or query as sent. As the services' access lines: a failure (4xx, 5xx) at INFO, a
  success at DEBUG (the CRM connector polls every few seconds; `CDP_LOG_LEVEL=DEBUG` shows them);
- libraries that log what they were sent are held to errors (aiosmtpd logs each sender and recipient
  address at INFO, an unknown command at WARNING);
- `listening`: the one line a companion writes to stdout once it accepts connections (everything else goes
  to stderr), for the scripts and tests that wait for it;
- an argument error, an uncaught exception (a port already taken) and a warning are JSON lines too: the
  process still exits 2 or 1.

The level is the services' variable, `CDP_LOG_LEVEL` (DEBUG, INFO, WARNING or ERROR; INFO when unset),
which `cdpctl up` passes on from its own environment; the format is always JSON, so scripts can read the
`listening` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from cdp_kit.logging import JsonFormatter, configure_logging

log = logging.getLogger("cdp.companion")
# Its handler writes to stdout; nothing else does.
_listening = logging.getLogger("cdp.companion.listening")
# Loggers of libraries that put what they were sent into their messages.
_QUIET = ("mail.log",)
# CDP_LOG_LEVEL's values, as the services' settings read them.
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure(name: str) -> None:
    """JSON lines on stderr named `name` (the companion's name in `cdpctl up`), and the handlers above.
    Called again once the name is known (a CRM emulator's comes from its arguments)."""
    level = os.environ.get("CDP_LOG_LEVEL", "INFO").upper()
    configure_logging(name, level if level in _LEVELS else "INFO")
    logging.captureWarnings(True)
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(JsonFormatter(name))
    _listening.handlers[:] = [stdout]
    _listening.propagate = False
    _listening.setLevel(logging.INFO)
    sys.excepthook = _uncaught
    sys.unraisablehook = _unraisable
    if level not in _LEVELS:
        log.error(f"CDP_LOG_LEVEL={os.environ['CDP_LOG_LEVEL']!r} is invalid: must be DEBUG, INFO, WARNING or ERROR")
        raise SystemExit(2)


def listening(message: str, **fields: Any) -> None:
    """The line on stdout saying the companion accepts connections, with where (`fields`)."""
    _listening.info(message, extra=fields)


def _uncaught(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        log.info("interrupted")
        return
    log.critical("stopped by an uncaught error", exc_info=(kind, error, tb))


def _unraisable(unraisable: Any) -> None:
    error = unraisable.exc_value
    exc_info = (type(error), error, unraisable.exc_traceback) if error is not None else None
    log.error("an error that could not be raised", exc_info=exc_info)


class ArgumentParser(argparse.ArgumentParser):
    """Its usage errors are a JSON line too (`--help` stays text: a person asked for it)."""

    def error(self, message: str) -> NoReturn:
        log.error(f"{self.prog}: {message}")
        raise SystemExit(2)


class AccessLog(AbstractAccessLogger):
    """`web.AppRunner(app, access_log_class=AccessLog, access_log=logging.getLogger(...))`."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = route_template(request)
        extra = {"method": request.method, "route": route, "status": response.status, "ms": round(time * 1000, 2)}
        self.logger.log(logging.INFO if response.status >= 400 else logging.DEBUG, "http request", extra=extra)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)  # failures; successes when DEBUG is on too


def route_template(request: web.BaseRequest) -> str | None:
    """The template of the route that matched (`/push/{id}`), None when none did (or the request could
    not even be parsed): never the path as sent."""
    try:
        # A request that failed to parse never reached the router: aiohttp asserts it has no match.
        resource = request.match_info.route.resource  # type: ignore[attr-defined]
    except (AttributeError, AssertionError):
        return None
    return resource.canonical if resource is not None else None
