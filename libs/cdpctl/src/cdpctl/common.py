"""What every cdpctl command shares: the two consoles, where a service of the running platform listens,
the admin bearer token and how a gRPC error reads on the terminal."""

from __future__ import annotations

import json
import sys

import click
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
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


def field_violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(field, description) of every google.rpc BadRequest violation the service attached."""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details that disagree with the status line: show the line alone
        return []
    found = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


class RpcFailed(click.ClickException):
    """A refused call as the terminal shows it: `CODE: message`, then each field the service named that
    the message does not already say. `as_json` prints the same to stdout as one JSON object instead."""

    def __init__(self, exc: grpc.aio.AioRpcError, *, as_json: bool = False) -> None:
        self.code = exc.code().name
        self.details = exc.details() or ""
        self.fields = field_violations(exc)
        self.as_json = as_json
        lines = [f"{self.code}: {self.details}"]
        lines += [f"  {field}: {why}" for field, why in self.fields if f"{field}: {why}" != self.details]
        super().__init__("\n".join(lines))

    def document(self) -> dict:
        fields = [{"field": field, "description": why} for field, why in self.fields]
        return {"error": {"code": self.code, "message": self.details, "fields": fields}}

    def show(self, file=None) -> None:
        if self.as_json:
            click.echo(json.dumps(self.document()))
        else:
            super().show(file)


def rpc_error(exc: grpc.aio.AioRpcError, *, as_json: bool = False) -> click.ClickException:
    return RpcFailed(exc, as_json=as_json)
