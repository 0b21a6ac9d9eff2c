"""What every cdpctl command shares: the two consoles, where a service of the running platform listens,
the admin bearer token and how a gRPC error reads on the terminal."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from cdpctl import tls
from cdpctl.platform import Workspace

if TYPE_CHECKING:  # grpc and protobuf are imported where a call is made: `cdpctl send` never needs them
    import ssl

    import grpc

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


def _address(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    where = urlsplit(url.split(",")[0].strip())
    return where.hostname or "127.0.0.1", where.port or 4222


def nats_tls(ws: Workspace, url: str) -> ssl.SSLContext | None:
    """The TLS a NATS connection to `url` presents: cdpctl's certificate (run.json's "tls") when `url` is
    the server the platform `cdpctl up --tls` runs here (`--nats` naming it with another user included);
    none otherwise (plain TCP)."""
    state = ws.read_run() or {}
    if state.get("tls") and state.get("nats") and _address(state["nats"]) == _address(url):
        return tls.nats_context(state["tls"])
    return None


def bearer(ws: Workspace) -> tuple[tuple[str, str], ...]:
    """The admin token `cdpctl up` wrote; none outside such a workspace (the service then says UNAUTHENTICATED)."""
    try:
        return (("authorization", f"Bearer {ws.admin_token()}"),)
    except OSError:
        return ()


def field_violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(field, description) of every google.rpc BadRequest violation the service attached."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

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


def json_option(value: str | None, name: str) -> dict:
    """A JSON-object option or argument (`name` is how the error names it); none given: {}."""
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=name) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=name)
    return parsed


NO_ANSWER_HINT = (
    "the service called did not answer in time (stopped, overloaded or wedged): `cdpctl status` shows "
    "which one is not answering, and where its log is"
)


class RpcFailed(click.ClickException):
    """A refused call as the terminal shows it: `CODE: message`, then each field the service named that
    the message does not already say. `as_json` prints the same to stdout as one JSON object instead."""

    def __init__(self, exc: grpc.aio.AioRpcError, *, as_json: bool = False) -> None:
        self.code = exc.code().name
        self.details = exc.details() or ""
        self.fields = field_violations(exc)
        self.as_json = as_json
        lines = [f"{self.code}: {self.details}"]
        if self.code == "DEADLINE_EXCEEDED":
            # grpc's own words ("Deadline Exceeded") say neither who nor what next.
            lines.append(f"  {NO_ANSWER_HINT}")
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


# --- naming a person: the same two forms in every command ------------------------------------------

PERSON_USAGE = "name the person by PERSON_ID or by an identifier: TYPE VALUE (e.g. user_id u1)"


def person_key(person: tuple[str, ...]) -> tuple[str, ...]:
    """A person as every command takes it: (PERSON_ID,) or (TYPE, VALUE); anything else is a usage error."""
    if len(person) not in (1, 2):
        raise click.UsageError(PERSON_USAGE)
    return person


async def resolve_person(ws: Workspace, identity_address: str | None, person: tuple[str, ...]) -> str:
    """The person id: PERSON_ID as given, or the person identity says holds the identifier TYPE VALUE now."""
    import grpc.aio

    from cdp.identity.v1 import identity_pb2, identity_pb2_grpc

    key = person_key(person)
    if len(key) == 1:
        return key[0]
    async with tls.aio_channel(service_address(ws, "identity", identity_address)) as channel:
        try:
            found = await identity_pb2_grpc.IdentityServiceStub(channel).Lookup(
                identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type=key[0], value=key[1])),
                metadata=bearer(ws),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None
    return found.person_id


# --- what every command of one service's module shares (journeys.py, crm.py) -------------------------


def service_options(service: str):
    """--json and --address, on every command of a service's module."""

    def decorate(function):
        function = click.option("--address", help=f"{service} gRPC address (default: the one `cdpctl up` runs)")(
            function
        )
        return click.option("--json", "as_json", is_flag=True, help="machine-readable output")(function)

    return decorate


def call_service(
    ws: Workspace,
    service: str,
    stub_class: Callable[[Any], Any],
    address: str | None,
    as_json: bool,
    work: Callable[[Any, tuple], Awaitable[Any]],
) -> Any:
    """Run `work(stub, metadata)` against `service`; a refused call becomes a CLI error naming its field.
    A spinner shows on a terminal only (stderr, and never when a script reads --json)."""

    import grpc.aio

    async def run() -> Any:
        async with tls.aio_channel(service_address(ws, service, address)) as channel:
            waiting = console.status(f"asking {service} …") if sys.stderr.isatty() and not as_json else nullcontext()
            try:
                with waiting:
                    return await work(stub_class(channel), bearer(ws))
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, as_json=as_json) from None

    return asyncio.run(run())


async def all_pages(fetch: Callable[[str], Awaitable[Any]], field: str, limit: int) -> list:
    """Every item of a paged List call, page after page, up to `limit` (0: no limit)."""
    items: list = []
    token = ""
    while True:
        reply = await fetch(token)
        items.extend(getattr(reply, field))
        token = reply.next_page_token
        if not token or (limit and len(items) >= limit):
            return items[:limit] if limit else items


def whole_numbers(value: Any) -> Any:
    """A Struct's numbers as they were sent: protobuf holds every Struct number as a double, so 42 reads
    back 42.0. JSON does not tell them apart; a double holding a whole number exactly (within ±2^53) is
    shown as an integer, any other as it is. For rendering only: what compares numbers keeps the doubles."""
    if type(value) is float:
        return int(value) if value.is_integer() and abs(value) <= 2**53 else value
    if type(value) is dict:
        return {key: whole_numbers(item) for key, item in value.items()}
    if type(value) is list:
        return [whole_numbers(item) for item in value]
    return value


def as_dict(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(message)


def emit(document: Any) -> None:
    out.print_json(json.dumps(document))


def short_time(value: str | None) -> str:
    """An RFC 3339 time as tables show it: to the second, without the date's T."""
    return (value or "").replace("T", " ").split(".")[0].removesuffix("Z")


def enum_name(value: str, prefix: str) -> str:
    return value.removeprefix(prefix).lower()


def write_owner_only(path: Path, text: str) -> None:
    """`text` in `path` for files that hold personal or privacy data (an export, the deletion ledger):
    created readable by its owner only (and made so if the file was there), and never written through a
    symbolic link (one planted in a shared folder would point it at another file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise click.ClickException(f"{path} is a symbolic link: give the file itself") from None
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)
