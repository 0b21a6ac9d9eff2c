"""Run one CRM emulator from the command line: ``python -m cdp_crm_emulators <crm> --port N``.

``--snapshot FILE`` keeps the CRM's records across restarts (read at start, written on SIGINT/SIGTERM);
``--tls`` serves https with a self-signed certificate whose path is printed (for clients that insist on
https). The process prints one line ``<crm> listening on <url>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from contextlib import suppress

from cdp_crm_emulators import EMULATORS


async def _run(args: argparse.Namespace) -> None:
    emulator = EMULATORS[args.crm](host=args.host, port=args.port, tls=args.tls, snapshot=args.snapshot)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with emulator:
        suffix = f" (CA file {emulator.ca_file})" if emulator.ca_file else ""
        print(f"{args.crm} listening on {emulator.base_url}{suffix}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cdp_crm_emulators", description=__doc__.splitlines()[0])
    parser.add_argument("crm", choices=sorted(EMULATORS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--snapshot", default=None, help="JSON file holding the CRM's state across restarts")
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
