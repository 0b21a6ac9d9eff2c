"""cdpctl — the operator CLI: run the platform locally, check its health, send test events, operate it.

cdpctl up                 nats-server, the dev companions (local channel servers, CRM emulators) and
                          every service on the embedded store, restarted when one dies; Ctrl-C stops all
cdpctl status [--json]    health of a running platform (found from any folder)
cdpctl send track --user-id u1 --event "Order Completed" --properties '{"total": 42}'
cdpctl send track --count 10000     # generated events, with a progress bar
cdpctl profile user_id u1           # a profile as JSON (NOT_FOUND at once; --wait N waits for it)
cdpctl models                       # the deployed models, their versions and quality
cdpctl models train churn_risk --cutoff 2025-03-01   # retrain on this platform's customers (training.py)
cdpctl models drift | quality churn_risk             # drift of features and scores; realised quality
cdpctl models promote churn_risk 1.2.0 / rollback churn_risk   # which version is live (models.py)
cdpctl models explain churn_risk user_id u1   # why the person's score is what it is     (models.py)
cdpctl segment create vip 'scores.clv > 500' / estimate / members / delete, segments   (segments.py)
cdpctl segment explain vip user_id u1         # why the person is (or is not) in it    (segments.py)
cdpctl traits [define NAME --op count --event "Order Completed" | delete NAME]        (segments.py)
cdpctl graph/export/delete user_id u1, unmerge MERGE_ID, quarantine device_id d1   (people.py)
cdpctl dlq [STREAM [CONSUMER]] [--replay] / lag                                           (bus.py)
cdpctl up, nats-rotate SERVICE                                                              (run.py)
cdpctl restart SERVICE...     stop (draining) and start again, waiting until it serves     (restart.py)
cdpctl status                                                                            (status.py)
cdpctl journey …, approvals, decisions PERSON, inbox PERSON                            (journeys.py)
cdpctl crm status / runs / backfill CONNECTION / dead-letters / record PERSON                 (crm.py)
cdpctl identity model show / export FILE      the matching model: m, u, weights, λ, EM   (identity.py)
cdpctl definitions export [--out FILE] / import FILE [--dry-run] [--replace]      (definitions.py)
cdpctl privacy ledger export --out FILE / replay FILE [--dry-run]   deletions kept beside backups (ledger.py)

Without --home or CDP_HOME, commands act on the current folder's (or its repository's) `.cdp` when it has
one, and otherwise find the running platform from any folder (Workspace.discover), naming its home on
stderr; `up` always starts the current folder's.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import click

from cdpctl import tls
from cdpctl.common import console, json_option, out, service_address, whole_numbers
from cdpctl.platform import Workspace

# Each command imports what it uses, when it runs: a command pays for its own imports only (`send` needs
# neither grpc nor the bus, `dlq` needs nats, `up` the supervisor). The other modules' commands are
# named here and imported on first use (`LazyGroup`); `--help` imports them all for their summaries.
COMMANDS = {
    "up": "cdpctl.run:up",
    "status": "cdpctl.status:status",
    "nats-rotate": "cdpctl.run:nats_rotate",
    "restart": "cdpctl.restart:restart",
    "graph": "cdpctl.people:graph",
    "export": "cdpctl.people:export",
    "delete": "cdpctl.people:delete",
    "unmerge": "cdpctl.people:unmerge",
    "quarantine": "cdpctl.people:quarantine",
    "dlq": "cdpctl.bus:dlq",
    "lag": "cdpctl.bus:lag",
    "journey": "cdpctl.journeys:journey",
    "approvals": "cdpctl.journeys:approvals",
    "decisions": "cdpctl.journeys:decisions",
    "inbox": "cdpctl.journeys:inbox",
    "crm": "cdpctl.crm:crm",
    "identity": "cdpctl.identity:identity",
    "definitions": "cdpctl.definitions:definitions",
    "privacy": "cdpctl.ledger:privacy",
    "segment": "cdpctl.segments:segment",
    "segments": "cdpctl.segments:segments",
    "traits": "cdpctl.segments:traits",
}
MODELS_COMMANDS = {
    "train": "cdpctl.training:train",
    "drift": "cdpctl.training:drift",
    "quality": "cdpctl.training:quality",
    "promote": "cdpctl.models:promote",
    "rollback": "cdpctl.models:rollback",
    "explain": "cdpctl.models:explain",
}
# Kept importable from here, as before the commands were imported lazily (cdpctl.cli.check_health).
_FROM_MODULE = {
    "check_health": "cdpctl.status",
    "status": "cdpctl.status",
    "nats_rotate": "cdpctl.run",
    "up": "cdpctl.run",
}


def __getattr__(name: str):
    if name in _FROM_MODULE:
        return getattr(importlib.import_module(_FROM_MODULE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LazyGroup(click.Group):
    """A group whose commands from other modules are imported when one is asked for by name."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, attribute = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy=COMMANDS)
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="CDP_HOME",
    help="folder for NATS data, service stores, logs and dev secrets [default: this folder's or its "
    "repository's .cdp, else the running platform's, else ./.cdp; `up`: ./.cdp]",
)
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """Operate a cdp platform."""
    if home:
        ctx.obj = Workspace(home.resolve())
    elif ctx.invoked_subcommand == "up":
        # This folder's platform: another checkout's running one (found by discovery) is not this one.
        ctx.obj = Workspace.default()
    else:
        ctx.obj = Workspace.discover()
        if ctx.invoked_subcommand != "status" and "--help" not in sys.argv[1:]:  # status: in its header
            _name_home(ctx.obj)
    # Calls to the services present cdpctl's certificate when that platform runs with mutual TLS.
    tls.use_workspace(ctx.obj.root)


def _name_home(ws: Workspace) -> None:
    """Which platform a command acts on, when no --home or CDP_HOME chose it (on stderr: output stays clean)."""
    how = f" ({ws.found}; this folder has no .cdp of its own)" if ws.found else ""
    console.print(f"cdp home: {ws.root}{how}", style="dim", markup=False, highlight=False, soft_wrap=True)


# -------------------------------------------------------------------------------------------- send

EVENT_TYPES = ("track", "identify", "alias", "page", "screen", "group")


def build_event(
    kind: str,
    *,
    index: int,
    user_id: str | None,
    anonymous_id: str | None,
    event: str | None,
    name: str | None,
    previous_id: str | None,
    group_id: str | None,
    properties: dict,
    traits: dict,
    context: dict | None = None,
) -> dict:
    body: dict = {"type": kind, "messageId": str(uuid.uuid4()), "timestamp": datetime.now(UTC).isoformat()}
    if context:
        body["context"] = context
    if user_id:
        body["userId"] = user_id.replace("{i}", str(index))
    if anonymous_id:
        body["anonymousId"] = anonymous_id.replace("{i}", str(index))
    if not user_id and not anonymous_id:
        body["anonymousId"] = f"anon-{uuid.uuid4().hex[:12]}"
    if kind == "track":
        body["event"] = event or "cdpctl Test Event"
        body["properties"] = properties
    elif kind in ("page", "screen"):
        body["name"] = name or "Home"
        body["properties"] = properties
    elif kind == "identify":
        body["traits"] = traits
    elif kind == "alias":
        body["previousId"] = previous_id or body.get("anonymousId", "")
    elif kind == "group":
        body["groupId"] = group_id or "acme"
        body["traits"] = traits
    return body


async def _send_http(url: str, write_key: str, events: list[dict], batch_size: int, show_progress: bool) -> dict:
    import aiohttp
    from rich.progress import Progress

    # suppressed: events of a person who asked to be deleted and suppressed, answered 200 and not stored.
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0, "suppressed": 0, "errors": []}
    headers = {"Authorization": aiohttp.encode_basic_auth(write_key, "")}
    async with aiohttp.ClientSession() as session:
        with Progress(console=console, disable=not show_progress, transient=True) as progress:
            task = progress.add_task("sending", total=len(events))
            for start in range(0, len(events), batch_size):
                chunk = events[start : start + batch_size]
                body = {"batch": chunk, "sentAt": datetime.now(UTC).isoformat()}
                try:
                    async with session.post(f"{url}/v1/batch", json=body, headers=headers) as response:
                        text = await response.text()
                except aiohttp.ClientError as exc:
                    # No collector answered (refused, reset, no such host, a malformed URL): say where, and how far
                    # the run got, rather than end in a traceback.
                    sent = f" after {start} of {len(events)} events were answered" if start else ""
                    raise click.ClickException(
                        f"cannot reach the collector at {url} ({type(exc).__name__}: {exc}){sent}"
                    ) from None
                try:
                    reply = json.loads(text)
                except ValueError:  # a proxy's or a server's page, not the collector's JSON
                    reply = {"message": f"not a collector's answer: {len(text)} characters that are not JSON"}
                if not isinstance(reply, dict):
                    reply = {"message": "not a collector's answer: JSON that is not an object"}
                if response.status != 200:
                    totals["errors"].append({"status": response.status, **(reply if isinstance(reply, dict) else {})})
                totals["accepted"] += reply.get("accepted", 0)
                totals["duplicates"] += reply.get("duplicates", 0)
                totals["rejected"] += len(reply.get("rejected", []))
                totals["suppressed"] += reply.get("suppressed", 0)
                progress.advance(task, len(chunk))
    return totals


@main.command()
@click.argument("kind", type=click.Choice(EVENT_TYPES), default="track")
@click.option("--user-id", help="userId ('{i}' is replaced by the event's index)")
@click.option(
    "--anonymous-id",
    help="anonymousId ('{i}' is replaced by the event's index); with neither id, a fresh anonymousId each event",
)
@click.option("--event", help="track: the event name (default: 'cdpctl Test Event')")
@click.option("--name", help="page/screen: the name")
@click.option("--previous-id", help="alias: the previous id")
@click.option("--group-id", help="group: the group id")
@click.option("--properties", help="track/page/screen properties as a JSON object")
@click.option("--traits", help="identify/group traits as a JSON object")
@click.option(
    "--context",
    help='the event\'s context as a JSON object, e.g. consent: \'{"consent": {"categoryPreferences": {"Marketing": true}}}\'',
)
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=1), help="how many events to send")
@click.option(
    "--batch-size",
    default=500,
    show_default=True,
    type=click.IntRange(min=1),
    help="events per /v1/batch request",
)
@click.option("--url", help="collector HTTP base URL (default: the one `cdpctl up` runs)")
@click.option("--write-key", help="source write key (default: the dev source of `cdpctl up`)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def send(
    ws: Workspace,
    kind: str,
    user_id,
    anonymous_id,
    event,
    name,
    previous_id,
    group_id,
    properties,
    traits,
    context,
    count: int,
    batch_size: int,
    url,
    write_key,
    as_json: bool,
) -> None:
    """Send test events through the collector's Segment-compatible HTTP API."""
    state = ws.read_run() or {}
    url = url or (state.get("services", {}).get("collector", {}) or {}).get("http")
    write_key = write_key or state.get("write_key")
    if not url or not write_key:
        raise click.UsageError("no running platform found: start one with `make up`, or pass --url and --write-key")
    props, trts = json_option(properties, "--properties"), json_option(traits, "--traits")
    ctx = json_option(context, "--context")
    events = [
        build_event(
            kind,
            index=i,
            user_id=user_id,
            anonymous_id=anonymous_id,
            event=event,
            name=name,
            previous_id=previous_id,
            group_id=group_id,
            properties=props,
            traits=trts,
            context=ctx,
        )
        for i in range(count)
    ]
    totals = asyncio.run(_send_http(url.rstrip("/"), write_key, events, batch_size, show_progress=count > batch_size))
    if as_json:
        out.print_json(json.dumps(totals))
    else:
        out.print(
            f"accepted {totals['accepted']}, duplicates {totals['duplicates']}, rejected {totals['rejected']}, "
            f"suppressed {totals['suppressed']}"
        )
        for error in totals["errors"][:5]:
            out.print(f"[red]{json.dumps(error)}[/]")
    raise SystemExit(0 if not totals["errors"] else 1)


async def _lookup_profile(address: str, token: str, person: tuple[str, ...], wait: float) -> dict:
    import grpc.aio
    from google.protobuf import json_format

    from cdp.profile.v1 import profile_pb2, profile_pb2_grpc

    if len(person) == 1:
        request = profile_pb2.GetProfileRequest(person_id=person[0], include_history=True)
    else:
        request = profile_pb2.LookupProfileRequest(
            identifier_type=person[0], identifier_value=person[1], include_history=True
        )
    metadata = (("authorization", f"Bearer {token}"),)
    deadline = time.monotonic() + wait
    async with tls.aio_channel(address) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        for _attempt in range(10_000):
            try:
                ask = stub.GetProfile if len(person) == 1 else stub.LookupProfile
                profile = await ask(request, metadata=metadata, timeout=5)
                # Every value, false and 0 included: a withdrawn consent is granted false, a score of 0 a value.
                document = json_format.MessageToDict(profile, always_print_fields_with_no_presence=True)
                # What was sent: the values of traits, groups and computed traits are Struct values (42, not
                # 42.0); scores are doubles of their own and stay as they are.
                for key in ("traits", "groups", "computed"):
                    if key in document:
                        document[key] = whole_numbers(document[key])
                return document
            except grpc.aio.AioRpcError as exc:
                # Events reach the profile a moment after the collector accepted them: --wait waits for it.
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() >= deadline:
                    hint = ""
                    if len(person) == 1 and person[0] in IDENTIFIER_TYPE_NAMES:
                        # `cdpctl profile user_id`: most likely a lookup missing its value, not a person id.
                        hint = f"; to look a person up by an identifier, give its value too: cdpctl profile {person[0]} VALUE"
                    raise click.ClickException(f"{exc.code().name}: {exc.details()}{hint}") from None
            await asyncio.sleep(0.2)
    raise click.ClickException("no profile")


# The built-in identifier types (identity's rules may add others): a PERSON_ID given as one of these names is
# most likely a lookup missing its value.
IDENTIFIER_TYPE_NAMES = frozenset(
    {"user_id", "anonymous_id", "email", "phone", "device_id", "salesforce_id", "hubspot_id", "dynamics_id", "zoho_id"}
)


@main.command()
@click.argument("person", nargs=-1, required=True)
@click.option(
    "--wait",
    default=0.0,
    show_default=True,
    help="seconds to wait for a profile still on its way (NOT_FOUND at once: 0)",
)
@click.option("--address", help="profile gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def profile(ws: Workspace, person: tuple[str, ...], wait: float, address) -> None:
    """Show a person's profile (PERSON_ID, or TYPE VALUE: whoever holds an identifier, e.g. `cdpctl profile
    user_id u1`), as JSON."""
    from cdpctl.common import person_key

    address = service_address(ws, "profile", address)
    document = asyncio.run(_lookup_profile(address, ws.admin_token(), person_key(person), wait))
    out.print_json(json.dumps(document))


async def _models(address: str, token: str) -> list[dict]:
    import grpc.aio
    from google.protobuf import json_format

    from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc

    async with tls.aio_channel(address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        try:
            listed = await stub.ListModels(
                scoring_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            raise click.ClickException(f"{exc.code().name}: {exc.details()}") from None
    # Every value, 0 included: a version just deployed has scored 0 rows, a canary may stand at 0 %.
    return [json_format.MessageToDict(m, always_print_fields_with_no_presence=True) for m in listed.models]


@main.group(cls=LazyGroup, lazy=MODELS_COMMANDS, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (every version, spec included)")
@click.option("--address", help="scoring gRPC address (default: the one `cdpctl up` runs)")
@click.pass_context
def models(ctx: click.Context, as_json: bool, address) -> None:
    """The deployed models: live version, other versions and their roles, scores and quality.
    `cdpctl models train MODEL` retrains one on this platform's customers (training.py); `cdpctl models
    promote MODEL VERSION` makes a version live and `cdpctl models rollback MODEL` the one live before (models.py)."""
    if ctx.invoked_subcommand is not None:
        return
    ws: Workspace = ctx.obj
    address = service_address(ws, "scoring", address)
    documents = asyncio.run(_models(address, ws.admin_token()))
    if as_json:
        out.print_json(json.dumps(documents))
        return
    from rich.table import Table

    table = Table(title="models")
    for column in ("model", "live", "versions", "scores", "quality"):
        table.add_column(column)
    for model in documents:
        versions = model.get("versions", [])
        live = next((v for v in versions if v.get("role") == "ROLE_LIVE"), versions[0] if versions else {})
        spec = live.get("spec", {})
        roles = ", ".join(f"{v['spec']['version']} {v.get('role', '').removeprefix('ROLE_').lower()}" for v in versions)
        quality = ", ".join(
            f"{k} {v:.0f}" if float(v).is_integer() else f"{k} {v:.3f}"
            for k, v in sorted(spec.get("quality", {}).items())
            if isinstance(v, int | float) and not isinstance(v, bool)
        )
        scores = ", ".join(o["score"] for o in spec.get("outputs", []))
        # Whole: the table wraps the figures between them; a cut at a fixed width lost the last ones mid-name.
        table.add_row(model["name"], model.get("liveVersion", ""), roles, scores, quality)
    out.print(table)


if __name__ == "__main__":
    main()
