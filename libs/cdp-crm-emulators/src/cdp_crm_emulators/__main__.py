"""Run one CRM emulator from the command line: ``python -m cdp_crm_emulators <crm> --port N``.

``--snapshot FILE`` keeps the CRM's records across restarts (read at start, written 5 seconds after a
change - a temporary file renamed over it - and on SIGINT/SIGTERM: a ``kill -9`` loses at most that);
``--set name=value`` passes an emulator option (limits, credentials, a HubSpot ``webhook_url``);
``--tls`` serves https with a self-signed certificate whose path is printed (for clients that insist on
https). Its log is JSON lines (`cdp_testing.channels.logs`), named ``crm-<crm>`` as `cdpctl up` names it: on
stdout the one line ``<crm> listening on <url>`` with its ``url`` (and ``ca_file``) once it accepts
connections, on stderr the rest: requests by route and status (failures; successes too at
``CDP_LOG_LEVEL=DEBUG``), errors with their traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from contextlib import suppress
from typing import Any

from cdp_crm_emulators import EMULATORS
from cdp_testing.channels import logs


async def _run(args: argparse.Namespace) -> None:
    options = dict(args.set)
    emulator = EMULATORS[args.crm](host=args.host, port=args.port, tls=args.tls, snapshot=args.snapshot, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with emulator:
        where = {"url": emulator.base_url} | ({"ca_file": emulator.ca_file} if emulator.ca_file else {})
        logs.listening(f"{args.crm} listening on {emulator.base_url}", **where)
        await stop.wait()


def _option(text: str) -> tuple[str, Any]:
    """``name=value``; the value is read as JSON when it parses (numbers, lists), else kept as text."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--set takes name=value, got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def main(argv: list[str] | None = None) -> None:
    logs.configure("crm-emulators")
    parser = logs.ArgumentParser(prog="python -m cdp_crm_emulators", description=__doc__.splitlines()[0])
    parser.add_argument("crm", choices=sorted(EMULATORS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--snapshot", default=None, help="JSON file holding the CRM's state across restarts")
    parser.add_argument(
        "--set",
        action="append",
        type=_option,
        default=[],
        metavar="NAME=VALUE",
        help="an emulator option, e.g. --set burst_limit=190 --set webhook_url=http://localhost:8080/hooks (repeatable)",
    )
    args = parser.parse_args(argv)
    logs.configure(f"crm-{args.crm}")
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
