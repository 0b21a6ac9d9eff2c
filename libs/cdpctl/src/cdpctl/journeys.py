"""Operator commands on orchestration: journeys, their instances, the approval list, experiment stats,
the per-person decision history ("why did or didn't this person get that?") and the in-app inbox.

    cdpctl journey validate|create FILE            a journey document (JSON or YAML; - reads stdin)
    cdpctl journey update FILE                     replace the draft of the journey the file names
    cdpctl journey publish|pause|resume|archive|get ID, journey list
    cdpctl journey enroll JOURNEY PERSON, journey exit INSTANCE
    cdpctl journey instances --person P | --journey J, journey stats J
    cdpctl approvals [approve|reject ACTION]
    cdpctl decisions PERSON, cdpctl inbox PERSON   (PERSON: a person id, or TYPE VALUE such as user_id u1)

Every command takes --json (the API's messages as JSON on stdout; a refused call becomes
{"error": {"code", "message", "fields"}} on stdout, exit code 1) and --address (default: the
orchestration service `cdpctl up` runs). A refused call names the field the service named (the google.rpc
BadRequest details); `validate` lists every problem with its node and field. Lists follow the service's
pages to the end (--limit caps them). `archive` waits, with progress, until the journey's running
instances have ended (--no-wait returns at once). Nothing here logs a person's identifiers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import yaml
from google.protobuf import json_format
from rich.progress import Progress
from rich.table import Table

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdpctl.common import (
    all_pages,
    as_dict,
    call_service,
    console,
    emit,
    enum_name,
    out,
    service_options,
    short_time,
)
from cdpctl.people import _person_id
from cdpctl.platform import Workspace

PAGE = 500
JOURNEY_STATES = ("draft", "active", "paused", "archived")
INSTANCE_STATES = ("running", "waiting", "ended")
APPROVAL_STATES = ("pending", "approved", "rejected", "expired")


_options = service_options("orchestration")
_dict, _emit, _enum, _short = as_dict, emit, enum_name, short_time


def _call(ws: Workspace, address: str | None, as_json: bool, work: Callable[[Any, tuple], Awaitable[Any]]) -> Any:
    return call_service(ws, "orchestration", orchestration_pb2_grpc.OrchestrationServiceStub, address, as_json, work)


def _definition(file: str) -> pb.JourneyDefinition:
    """The file's text in the form its name says (.yaml/.yml: YAML, else JSON); `-` reads stdin as JSON
    unless it starts like YAML would. The service parses it: its errors name the node and field."""
    if file == "-":
        text = sys.stdin.read()
        return pb.JourneyDefinition(json=text) if text.lstrip().startswith("{") else pb.JourneyDefinition(yaml=text)
    path = Path(file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {file}: {exc.strerror}", param_hint="FILE") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        return pb.JourneyDefinition(yaml=text)
    return pb.JourneyDefinition(json=text)


class _JourneyYamlLoader(yaml.SafeLoader):
    """The safe loader with YAML 1.2's booleans (only true/false), as orchestration reads journey YAML
    (`cdp_orchestration.domain.document.load_yaml`): on/off/yes/no/y/n stay words."""


_BOOL = "tag:yaml.org,2002:bool"
_JourneyYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JourneyYamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _journey_id_of(definition: pb.JourneyDefinition, file: str) -> str:
    text = definition.yaml or definition.json
    try:
        document = yaml.load(text, Loader=_JourneyYamlLoader)  # YAML is a superset of JSON: one reader for both
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{file} is not JSON or YAML: {exc}", param_hint="FILE") from None
    journey_id = document.get("id") if isinstance(document, dict) else None
    if not isinstance(journey_id, str) or not journey_id:
        raise click.BadParameter(f"{file} names no journey: its `id` field is missing", param_hint="FILE")
    return journey_id


_all_pages = all_pages


def _journey_line(journey: dict) -> str:
    state = _enum(journey.get("state", ""), "JOURNEY_STATE_")
    live = journey.get("version", "0")
    draft = journey.get("draftVersion")
    versions = f"live v{live}" if live != "0" else "never published"
    if draft and draft != live:
        versions += f", draft v{draft}"
    line = f"journey {journey.get('id')} ({journey.get('name', '')}): {state}, {versions}"
    if journey.get("invalid"):
        line += f" - NO LONGER VALIDATES: {journey['invalid']} (takes no entries; publish a fixed version)"
    return line


# ------------------------------------------------------------------------------------------- journey


@click.group()
def journey() -> None:
    """Journeys: write, publish, pause, archive; enroll and exit persons; instances and stats."""


@journey.command("validate")
@click.argument("file")
@_options
@click.pass_obj
def validate(ws: Workspace, file: str, as_json: bool, address) -> None:
    """Check a journey document without storing it: every problem, with its node and field."""
    definition = _definition(file)
    reply = _call(
        ws,
        address,
        as_json,
        lambda stub, md: stub.ValidateJourney(
            pb.ValidateJourneyRequest(definition=definition), metadata=md, timeout=30
        ),
    )
    problems = [{"node": p.node, "field": p.field, "message": p.message} for p in reply.problems]
    if as_json:
        _emit({"valid": not problems, "problems": problems})
    elif not problems:
        out.print(f"{file}: valid")
    else:
        # The heading is a line of its own: a long path must not wrap the count into pieces (a table title
        # wraps at the table's width).
        out.print(
            f"{file}: {len(problems)} problem{'' if len(problems) == 1 else 's'}", soft_wrap=True, highlight=False
        )
        table = Table()
        for column in ("node", "field", "problem"):
            table.add_column(column)
        for p in problems:
            table.add_row(p["node"] or "(journey)", p["field"], p["message"])
        out.print(table)
    raise SystemExit(1 if problems else 0)


@journey.command("create")
@click.argument("file")
@click.option("--publish", is_flag=True, help="publish the new draft at once (it goes live)")
@_options
@click.pass_obj
def create(ws: Workspace, file: str, publish: bool, as_json: bool, address) -> None:
    """Store a new journey from a document (JSON or YAML) as a draft; --publish makes it live."""
    definition = _definition(file)

    async def work(stub, md):
        created = await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition), metadata=md, timeout=30)
        if publish:
            created = await stub.PublishJourney(
                pb.PublishJourneyRequest(journey_id=created.id), metadata=md, timeout=30
            )
        return created

    document = _dict(_call(ws, address, as_json, work))
    _emit(document) if as_json else out.print(_journey_line(document))


@journey.command("update")
@click.argument("file")
@_options
@click.pass_obj
def update(ws: Workspace, file: str, as_json: bool, address) -> None:
    """Replace the draft of the journey the document names (its `id`); publish makes it live."""
    definition = _definition(file)
    journey_id = _journey_id_of(definition, file)
    request = pb.UpdateJourneyRequest(journey_id=journey_id, definition=definition)
    document = _dict(_call(ws, address, as_json, lambda stub, md: stub.UpdateJourney(request, metadata=md, timeout=30)))
    _emit(document) if as_json else out.print(_journey_line(document))


@journey.command("publish")
@click.argument("journey_id")
@click.option(
    "--map-by-node-id",
    is_flag=True,
    help="move running instances to the new version at the node with the same id (default: they finish on theirs)",
)
@_options
@click.pass_obj
def publish(ws: Workspace, journey_id: str, map_by_node_id: bool, as_json: bool, address) -> None:
    """Make a journey's draft its live version."""
    migration = pb.MIGRATION_MAP_BY_NODE_ID if map_by_node_id else pb.MIGRATION_KEEP_VERSION
    request = pb.PublishJourneyRequest(journey_id=journey_id, migration=migration)
    document = _dict(
        _call(ws, address, as_json, lambda stub, md: stub.PublishJourney(request, metadata=md, timeout=60))
    )
    _emit(document) if as_json else out.print(_journey_line(document))


def _state_command(name: str, rpc: str, doc: str):
    @journey.command(name, help=doc)
    @click.argument("journey_id")
    @_options
    @click.pass_obj
    def command(ws: Workspace, journey_id: str, as_json: bool, address) -> None:
        request = pb.JourneyRef(journey_id=journey_id)
        reply = _call(ws, address, as_json, lambda stub, md: getattr(stub, rpc)(request, metadata=md, timeout=30))
        document = _dict(reply)
        _emit(document) if as_json else out.print(_journey_line(document))

    return command


pause = _state_command("pause", "PauseJourney", "Stop entries into a journey (running instances go on).")
resume = _state_command("resume", "ResumeJourney", "Let persons enter a paused journey again.")


@journey.command("archive")
@click.argument("journey_id")
@click.option("--no-wait", is_flag=True, help="return at once instead of waiting for its running instances to end")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for running instances to end")
@_options
@click.pass_obj
def archive(ws: Workspace, journey_id: str, no_wait: bool, timeout: float, as_json: bool, address) -> None:
    """End a journey: no more entries, and its running instances end with reason "archived" (with progress)."""

    async def work(stub, md):
        archived = await stub.ArchiveJourney(pb.JourneyRef(journey_id=journey_id), metadata=md, timeout=60)
        if no_wait or archived.active_instances == 0:
            return archived
        total = archived.active_instances
        deadline = time.monotonic() + timeout
        show = sys.stderr.isatty() and not as_json
        with Progress(console=console, disable=not show, transient=True) as progress:
            task = progress.add_task(f"ending {total} running instance{'' if total == 1 else 's'}", total=total)
            while archived.active_instances > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                archived = await stub.GetJourney(pb.GetJourneyRequest(journey_id=journey_id), metadata=md, timeout=10)
                progress.update(task, completed=total - archived.active_instances)
        return archived

    document = _dict(_call(ws, address, as_json, work))
    if as_json:
        _emit(document)
        return
    out.print(_journey_line(document))
    left = int(document.get("activeInstances", "0"))
    if left and not no_wait:
        raise click.ClickException(
            f"{left} instance(s) still running after {timeout:.0f} s; they end as the engine reaches them"
        )


@journey.command("get")
@click.argument("journey_id")
@click.option("--version", default=0, show_default=True, help="a published version (0: the live one, else the draft)")
@_options
@click.pass_obj
def get(ws: Workspace, journey_id: str, version: int, as_json: bool, address) -> None:
    """A journey: state, versions, running instances and its definition (as JSON)."""
    request = pb.GetJourneyRequest(journey_id=journey_id, version=version)
    document = _dict(_call(ws, address, as_json, lambda stub, md: stub.GetJourney(request, metadata=md, timeout=10)))
    if as_json:
        _emit(document)
        return
    out.print(_journey_line(document) + f"; {document.get('activeInstances', '0')} running")
    out.print_json(json.dumps(document.get("definition", {})))


@journey.command("list")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(JOURNEY_STATES), help="only these (default: all but archived)"
)
@click.option("--limit", default=0, help="at most this many (0: all)")
@_options
@click.pass_obj
def list_journeys(ws: Workspace, states: tuple[str, ...], limit: int, as_json: bool, address) -> None:
    """Every journey: state, live and draft versions, priority, running instances."""
    wanted = [pb.JourneyState.Value(f"JOURNEY_STATE_{s.upper()}") for s in states]

    async def work(stub, md):
        return await _all_pages(
            lambda token: stub.ListJourneys(
                pb.ListJourneysRequest(states=wanted, page_size=PAGE, page_token=token), metadata=md, timeout=10
            ),
            "journeys",
            limit,
        )

    documents = [_dict(j) for j in _call(ws, address, as_json, work)]
    for document in documents:
        document.pop("definition", None)  # the list is an overview; `journey get` shows a definition
    if as_json:
        _emit(documents)
        return
    table = Table(title="journeys")
    for column in ("journey", "name", "state", "live", "draft", "priority", "running"):
        table.add_column(column)
    for j in documents:
        table.add_row(
            j["id"],
            j.get("name", ""),
            _enum(j.get("state", ""), "JOURNEY_STATE_"),
            j.get("version", "0"),
            j.get("draftVersion", ""),
            str(j.get("priority", 0)),
            j.get("activeInstances", "0"),
        )
    out.print(table)


@journey.command("enroll")
@click.argument("journey_id")
@click.argument("person_id")
@click.option("--properties", help="entry properties as a JSON object (the journey reads them as entry.<name>)")
@click.option("--idempotency-key", default="", help="the same key enrolls once (a retry returns the first answer)")
@_options
@click.pass_obj
def enroll(
    ws: Workspace, journey_id: str, person_id: str, properties: str | None, idempotency_key: str, as_json: bool, address
) -> None:
    """Enter a person into a journey whose entry is `api` (re-entry rules and caps apply). PERSON_ID is a
    person id (`p_...`); `cdpctl profile TYPE VALUE` finds it from an identifier such as `user_id ada`."""
    request = pb.EnrollRequest(journey_id=journey_id, person_id=person_id, idempotency_key=idempotency_key)
    if properties:
        try:
            parsed = json.loads(properties)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--properties") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--properties")
        request.properties.update(parsed)
    reply = _call(ws, address, as_json, lambda stub, md: stub.Enroll(request, metadata=md, timeout=60))
    if as_json:
        _emit(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True))
    elif reply.entered:
        out.print(f"entered: instance {reply.instance_id}")
    else:
        out.print(f"not entered: {reply.reason}")
        raise SystemExit(1)


@journey.command("exit")
@click.argument("instance_id")
@click.option("--reason", default="operator", show_default=True, help="recorded as the end reason api:<reason>")
@_options
@click.pass_obj
def exit_instance(ws: Workspace, instance_id: str, reason: str, as_json: bool, address) -> None:
    """End an instance now: its timers are cancelled and its pending actions withdrawn."""
    request = pb.ExitInstanceRequest(instance_id=instance_id, reason=reason)
    document = _dict(_call(ws, address, as_json, lambda stub, md: stub.ExitInstance(request, metadata=md, timeout=60)))
    if as_json:
        _emit(document)
    else:
        out.print(
            f"instance {instance_id}: {_enum(document.get('state', ''), 'INSTANCE_STATE_')} ({document.get('endReason', '')})"
        )


@journey.command("instances")
@click.option("--person", "person", help="a person's instances (a person id)")
@click.option("--journey", "journey_id", help="a journey's instances")
@click.option("--state", "states", multiple=True, type=click.Choice(INSTANCE_STATES), help="only these (default: all)")
@click.option("--limit", default=100, show_default=True, help="at most this many, newest first (0: all)")
@click.option("--steps", is_flag=True, help="show each instance's steps (node, time, outcome)")
@_options
@click.pass_obj
def instances(
    ws: Workspace, person, journey_id, states: tuple[str, ...], limit: int, steps: bool, as_json: bool, address
) -> None:
    """Instances of one person or of one journey, newest first."""
    if bool(person) == bool(journey_id):
        raise click.UsageError("name exactly one of --person and --journey")
    wanted = [pb.InstanceState.Value(f"INSTANCE_STATE_{s.upper()}") for s in states]

    async def work(stub, md):
        return await _all_pages(
            lambda token: stub.ListInstances(
                pb.ListInstancesRequest(
                    person_id=person or "", journey_id=journey_id or "", states=wanted, page_size=PAGE, page_token=token
                ),
                metadata=md,
                timeout=10,
            ),
            "instances",
            limit,
        )

    documents = [_dict(i) for i in _call(ws, address, as_json, work)]
    if as_json:
        _emit(documents)
        return
    table = Table(title=f"instances of {'person ' + person if person else 'journey ' + journey_id}")
    for column in (
        "instance",
        "journey",
        "version",
        "person",
        "state",
        "node",
        "variant",
        "entered",
        "ended",
        "reason",
    ):
        if column in ("instance", "person"):
            # Ids are what an operator copies (into `journey exit`, `decisions`): never cut; the other
            # columns wrap (fold) instead, so nothing is lost to an ellipsis.
            longest = max((len(i.get("id" if column == "instance" else "personId", "")) for i in documents), default=0)
            table.add_column(column, no_wrap=True, min_width=max(longest, len(column)))
        else:
            table.add_column(column, overflow="fold")
    for i in documents:
        table.add_row(
            i["id"],
            i.get("journeyId", ""),
            i.get("journeyVersion", ""),
            i.get("personId", ""),
            _enum(i.get("state", ""), "INSTANCE_STATE_"),
            i.get("nodeId", ""),
            i.get("variant", ""),
            _short(i.get("enteredAt")),
            _short(i.get("endedAt")),
            i.get("endReason", "") + (" (converted)" if i.get("converted") else ""),
        )
    out.print(table)
    if steps:
        for i in documents:
            out.print(f"[bold]{i['id']}[/]")
            for step in i.get("steps", []):
                out.print(f"  {_short(step.get('at'))}  {step.get('nodeId', '')}  {step.get('outcome', '')}")


@journey.command("stats")
@click.argument("journey_id")
@click.option("--version", default=0, show_default=True, help="one version (0: every version)")
@_options
@click.pass_obj
def stats(ws: Workspace, journey_id: str, version: int, as_json: bool, address) -> None:
    """Entries, conversions, exits by reason, arbiter decisions, and each split variant against its control."""
    request = pb.GetJourneyStatsRequest(journey_id=journey_id, version=version)
    reply = _call(ws, address, as_json, lambda stub, md: stub.GetJourneyStats(request, metadata=md, timeout=30))
    if as_json:
        _emit(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True))
        return
    out.print(f"journey {journey_id}: {reply.entered} entered, {reply.active} running, {reply.converted} converted")
    if reply.ended:
        out.print("ended: " + ", ".join(f"{reason} {n}" for reason, n in sorted(reply.ended.items())))
    if reply.decisions:
        out.print("decisions: " + ", ".join(f"{kind} {n}" for kind, n in sorted(reply.decisions.items())))
    if reply.variants:
        table = Table(title="variants")
        for column in ("split", "variant", "entered", "converted", "rate", "uplift vs control", "p-value"):
            table.add_column(column)
        for v in reply.variants:
            table.add_row(
                v.split_node,
                v.variant + (" (control)" if v.control else ""),
                str(v.entered),
                str(v.converted),
                f"{v.conversion_rate:.2%}",
                "" if v.control else f"{v.uplift:+.2%}",
                "" if v.control else f"{v.p_value:.3f}",
            )
        out.print(table)


# ----------------------------------------------------------------------------------------- approvals


@click.group(invoke_without_command=True)
@click.option(
    "--state", "states", multiple=True, type=click.Choice(APPROVAL_STATES), help="only these (default: pending)"
)
@click.option("--journey", "journey_id", default="", help="one journey's")
@click.option("--limit", default=100, show_default=True, help="at most this many (0: all)")
@_options
@click.pass_context
def approvals(ctx: click.Context, states: tuple[str, ...], journey_id: str, limit: int, as_json: bool, address) -> None:
    """Actions held by an approval gate: list them (pending by default), or approve / reject one."""
    if ctx.invoked_subcommand is not None:
        return
    ws: Workspace = ctx.obj
    wanted = [pb.ApprovalState.Value(f"APPROVAL_STATE_{s.upper()}") for s in states]

    async def work(stub, md):
        return await _all_pages(
            lambda token: stub.ListApprovals(
                pb.ListApprovalsRequest(states=wanted, journey_id=journey_id, page_size=PAGE, page_token=token),
                metadata=md,
                timeout=10,
            ),
            "approvals",
            limit,
        )

    documents = [_dict(a) for a in _call(ws, address, as_json, work)]
    if as_json:
        _emit(documents)
        return
    table = Table(title="approvals")
    for column in ("action", "journey", "person", "channel", "category", "value", "state", "requested", "expires"):
        table.add_column(column)
    for a in documents:
        table.add_row(
            a["actionId"],
            a.get("journeyId", ""),
            a.get("personId", ""),
            a.get("channel", ""),
            a.get("category", ""),
            f"{a.get('value', 0):g}",
            _enum(a.get("state", ""), "APPROVAL_STATE_"),
            _short(a.get("requestedAt")),
            _short(a.get("expiresAt")),
        )
    out.print(table)


def _decide(name: str, rpc: str, doc: str):
    @approvals.command(name, help=doc)
    @click.argument("action_id")
    @click.option("--note", default="", help="why (recorded, shown in the decision history)")
    @click.option(
        "--by",
        "decided_by",
        default=lambda: os.environ.get("USER") or "cdpctl",
        show_default="$USER",
        help="who decides (recorded in the decision history)",
    )
    @_options
    @click.pass_obj
    def command(ws: Workspace, action_id: str, note: str, decided_by: str, as_json: bool, address) -> None:
        request = pb.DecideApprovalRequest(action_id=action_id, decided_by=decided_by, note=note)
        reply = _call(ws, address, as_json, lambda stub, md: getattr(stub, rpc)(request, metadata=md, timeout=60))
        document = _dict(reply)
        if as_json:
            _emit(document)
        else:
            out.print(f"action {action_id}: {_enum(document.get('state', ''), 'APPROVAL_STATE_')}")

    return command


approve = _decide("approve", "ApproveAction", "Let a held action go on to the arbiter's other checks and its channel.")
reject = _decide("reject", "RejectAction", "Drop a held action for good (recorded as rejected).")


# ------------------------------------------------------------------------------- decisions and inbox


# The rule orchestration names for an action held until the profile applies the person's latest event.
HELD_FOR_PROFILE = "profile_wait"


@click.command()
@click.argument("person", nargs=-1, required=True)
@click.option("--journey", "journey_id", default="", help="only this journey's actions")
@click.option("--action", "action_id", default="", help="only this action")
@click.option("--limit", default=100, show_default=True, help="at most this many, newest first (0: all)")
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@_options
@click.pass_obj
def decisions(
    ws: Workspace,
    person: tuple[str, ...],
    journey_id: str,
    action_id: str,
    limit: int,
    identity_address,
    as_json: bool,
    address,
) -> None:
    """Why did (or didn't) a person (PERSON_ID, or TYPE VALUE) get a message: every arbiter decision, newest
    first, after the actions held now for the profile (`held`: no decision yet)."""
    person_id = asyncio.run(_person_id(ws, identity_address, person))

    async def work(stub, md):
        return await _all_pages(
            lambda token: stub.ListDecisions(
                pb.ListDecisionsRequest(
                    person_id=person_id, journey_id=journey_id, action_id=action_id, page_size=PAGE, page_token=token
                ),
                metadata=md,
                timeout=10,
            ),
            "decisions",
            limit,
        )

    documents = [_dict(d) for d in _call(ws, address, as_json, work)]
    if as_json:
        _emit(documents)
        return
    if not documents:
        out.print(
            f"no decisions about person {person_id}: no journey has tried to reach them"
            + (" with that" if journey_id or action_id else "")
        )
        return
    table = Table(title=f"decisions about person {person_id}, newest first")
    for column in ("when", "decision", "why", "rule", "journey", "channel", "action"):
        table.add_column(column)
    for d in documents:
        kind = _enum(d.get("kind", ""), "DECISION_KIND_")
        colour = {"sent": "green", "deferred": "yellow", "awaiting_approval": "yellow"}.get(kind, "red")
        reason = d.get("reason", "")
        if d.get("rule") == HELD_FOR_PROFILE:
            # Not a decision yet: the arbiter waits for the profile to apply the person's latest event, and
            # decides when it has, or at `until` on the fields it knows (reason profile_unavailable).
            kind = "held"
            if d.get("until"):
                reason += f"; decided by {_short(d['until'])} at the latest"
        elif d.get("until") and "until" not in reason:
            reason += f" (until {_short(d['until'])})"
        table.add_row(
            _short(d.get("decidedAt")),
            f"[{colour}]{kind}[/]",
            reason,
            d.get("rule", ""),
            d.get("journeyId", ""),
            d.get("channel", ""),
            d.get("actionId", ""),
        )
    out.print(table)


@click.command()
@click.argument("person", nargs=-1, required=True)
@click.option("--unread", is_flag=True, help="unread messages only")
@click.option("--limit", default=100, show_default=True, help="at most this many (0: all)")
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@_options
@click.pass_obj
def inbox(
    ws: Workspace, person: tuple[str, ...], unread: bool, limit: int, identity_address, as_json: bool, address
) -> None:
    """A person's in-app inbox (PERSON_ID, or TYPE VALUE), as the person's apps read it."""
    person_id = asyncio.run(_person_id(ws, identity_address, person))

    async def work(stub, md):
        return await _all_pages(
            lambda token: stub.ListInbox(
                pb.ListInboxRequest(person_id=person_id, unread_only=unread, page_size=PAGE, page_token=token),
                metadata=md,
                timeout=10,
            ),
            "messages",
            limit,
        )

    documents = [_dict(m) for m in _call(ws, address, as_json, work)]
    if as_json:
        _emit(documents)
        return
    table = Table(title=f"inbox of person {person_id}")
    for column in ("message", "title", "body", "received", "read"):
        table.add_column(column)
    for m in documents:
        table.add_row(
            m["messageId"], m.get("title", ""), m.get("body", ""), _short(m.get("createdAt")), _short(m.get("readAt"))
        )
    out.print(table)


COMMANDS = (journey, approvals, decisions, inbox)
