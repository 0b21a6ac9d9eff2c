"""What every cdpctl command shares: the two consoles, where a service of the running platform listens,
the admin bearer token and how a gRPC error reads on the terminal."""

from __future__ import annotations

import sys

import click
import grpc
from rich.console import Console

from cdpctl.platform import Workspace

# Wide enough for tables when output is a pipe or a CI log rather than a terminal.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)


def service_address(ws: Workspace, service: str, address: str | None) -> str:
    """`--address` when given, else where the platform `cdpctl up` runs has the service listening."""
    state = ws.read_run() or {}
    address = address or (state.get("services", {}).get(service, {}) or {}).get("grpc")
    if not address:
        raise click.UsageError("no running platform found: start one with `make up`, or pass --address")
    return address


def nats_url(ws: Workspace, url: str | None) -> str:
    state = ws.read_run() or {}
    url = url or state.get("nats")
    if not url:
        raise click.UsageError("no running platform found: start one with `make up`, or pass --nats")
    return url


def bearer(ws: Workspace) -> tuple[tuple[str, str], ...]:
    """The admin token `cdpctl up` wrote; none outside such a workspace (the service then says UNAUTHENTICATED)."""
    try:
        return (("authorization", f"Bearer {ws.admin_token()}"),)
    except OSError:
        return ()


def rpc_error(exc: grpc.aio.AioRpcError) -> click.ClickException:
    return click.ClickException(f"{exc.code().name}: {exc.details()}")
