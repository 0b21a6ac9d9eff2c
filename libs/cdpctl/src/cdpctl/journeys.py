"""Operator commands on orchestration: journeys, their instances, the approval list, experiment stats,
the per-person decision history ("why did or didn't this person get that?") and the in-app inbox.

    cdpctl journey validate|create FILE            a journey document (JSON or YAML; - reads stdin)
    cdpctl journey update FILE                     replace the draft of the journey the file names
    cdpctl journey discard-draft ID                throw the draft away (published versions stay)
    cdpctl journey get ID                          state, versions, revision and definition
    (update, publish and discard-draft take --if-revision N: only while the journey is at the revision read)
    cdpctl journey publish|pause|resume|archive|get [--draft] ID, journey list
    cdpctl journey enroll JOURNEY PERSON, journey exit INSTANCE
    cdpctl journey instances --person PERSON | --journey J, journey stats J
    cdpctl approvals [approve|reject ACTION]
    cdpctl decisions PERSON, cdpctl inbox PERSON
    (PERSON everywhere: a person id, or TYPE VALUE such as user_id u1, resolved by identity)

Every command takes --json (the API's messages as JSON on stdout; a refused call becomes
{"error": {"code", "message", "fields"}} on stdout, exit code 1) and --address (default: the
orchestration service `cdpctl up` runs). A refused call names the field the service named (the google.rpc
BadRequest details); `validate` lists every problem with its node and field. Lists follow the service's
pages to the end (--limit caps them). `archive` waits, with progress, until the journey's running
instances have ended (--no-wait returns at once). Nothing here logs a person's identifiers.

The commands are in modules by what they are about: here the `journey` group; approvals, decisions and the
inbox in journeys_people.py; how answers are shown (lines, tables) in journeys_render.py; reading a journey
document (JSON or YAML) in journeys_document.py; reaching the service in journeys_service.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import click
from google.protobuf import json_format
from rich.progress import Progress

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdpctl.common import all_pages, as_dict, console, emit, enum_name, out, resolve_person
from cdpctl.journeys_document import journey_id_of, read_definition
from cdpctl.journeys_people import APPROVAL_STATES, approvals, decisions, inbox
from cdpctl.journeys_render import (
    HELD_FOR_PROFILE,
    journey_line,
    show_instances,
    show_journeys,
    show_problems,
    show_stats,
)
from cdpctl.journeys_service import PAGE, call, options
from cdpctl.platform import Workspace

JOURNEY_STATES = ("draft", "active", "paused", "archived")

if_revision = click.option(
    "--if-revision",
    "revision",
    type=click.IntRange(min=1),
    metavar="N",
    default=None,
    help="only while the journey is at this revision (`journey get` shows it): refused, nothing changed, when "
    "someone saved it since you read it",
)
INSTANCE_STATES = ("running", "waiting", "ended")

# Kept importable from here (tests and older callers): the names this module had before it was split.
_journey_line, _journey_id_of = journey_line, journey_id_of
__all__ = [
    "APPROVAL_STATES",
    "COMMANDS",
    "HELD_FOR_PROFILE",
    "INSTANCE_STATES",
    "JOURNEY_STATES",
    "PAGE",
    "approvals",
    "decisions",
    "inbox",
    "journey",
]


# ------------------------------------------------------------------------------------------- journey


@click.group()
def journey() -> None:
    """Journeys: write, publish, pause, archive; enroll and exit persons; instances and stats."""


@journey.command("validate")
@click.argument("file")
@options
@click.pass_obj
def validate(ws: Workspace, file: str, as_json: bool, address) -> None:
    """Check a journey document without storing it: every problem, with its node and field."""
    definition = read_definition(file)
    reply = call(
        ws,
        address,
        as_json,
        lambda stub, md: stub.ValidateJourney(
            pb.ValidateJourneyRequest(definition=definition), metadata=md, timeout=30
        ),
    )
    problems = [{"node": p.node, "field": p.field, "message": p.message} for p in reply.problems]
    if as_json:
        emit({"valid": not problems, "problems": problems})
    else:
        show_problems(file, problems)
    raise SystemExit(1 if problems else 0)


@journey.command("create")
@click.argument("file")
@click.option("--publish", is_flag=True, help="publish the new draft at once (it goes live)")
@options
@click.pass_obj
def create(ws: Workspace, file: str, publish: bool, as_json: bool, address) -> None:
    """Store a new journey from a document (JSON or YAML) as a draft; --publish makes it live."""
    definition = read_definition(file)

    async def work(stub, md):
        created = await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition), metadata=md, timeout=30)
        if publish:
            created = await stub.PublishJourney(
                pb.PublishJourneyRequest(journey_id=created.id), metadata=md, timeout=30
            )
        return created

    document = as_dict(call(ws, address, as_json, work))
    emit(document) if as_json else out.print(journey_line(document))


@journey.command("update")
@click.argument("file")
@if_revision
@options
@click.pass_obj
def update(ws: Workspace, file: str, revision: int | None, as_json: bool, address) -> None:
    """Replace the draft of the journey the document names (its `id`); publish makes it live."""
    definition = read_definition(file)
    journey_id = journey_id_of(definition, file)
    request = pb.UpdateJourneyRequest(journey_id=journey_id, definition=definition, expected_revision=revision or 0)
    document = as_dict(
        call(ws, address, as_json, lambda stub, md: stub.UpdateJourney(request, metadata=md, timeout=30))
    )
    emit(document) if as_json else out.print(journey_line(document))


@journey.command("publish")
@click.argument("journey_id")
@click.option(
    "--map-by-node-id",
    is_flag=True,
    help="move running instances to the new version at the node with the same id (default: they finish on theirs)",
)
@if_revision
@options
@click.pass_obj
def publish(ws: Workspace, journey_id: str, map_by_node_id: bool, revision: int | None, as_json: bool, address) -> None:
    """Make a journey's draft its live version (with --if-revision: the draft as you read it, nothing since)."""
    migration = pb.MIGRATION_MAP_BY_NODE_ID if map_by_node_id else pb.MIGRATION_KEEP_VERSION
    request = pb.PublishJourneyRequest(journey_id=journey_id, migration=migration, expected_revision=revision or 0)
    document = as_dict(
        call(ws, address, as_json, lambda stub, md: stub.PublishJourney(request, metadata=md, timeout=60))
    )
    emit(document) if as_json else out.print(journey_line(document))


def _state_command(name: str, rpc: str, doc: str):
    @journey.command(name, help=doc)
    @click.argument("journey_id")
    @options
    @click.pass_obj
    def command(ws: Workspace, journey_id: str, as_json: bool, address) -> None:
        request = pb.JourneyRef(journey_id=journey_id)
        reply = call(ws, address, as_json, lambda stub, md: getattr(stub, rpc)(request, metadata=md, timeout=30))
        document = as_dict(reply)
        emit(document) if as_json else out.print(journey_line(document))

    return command


pause = _state_command("pause", "PauseJourney", "Stop entries into a journey (running instances go on).")
resume = _state_command("resume", "ResumeJourney", "Let persons enter a paused journey again.")


@journey.command("archive")
@click.argument("journey_id")
@click.option("--no-wait", is_flag=True, help="return at once instead of waiting for its running instances to end")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for running instances to end")
@options
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

    document = as_dict(call(ws, address, as_json, work))
    if as_json:
        emit(document)
        return
    out.print(journey_line(document))
    left = int(document.get("activeInstances", "0"))
    if left and not no_wait:
        raise click.ClickException(
            f"{left} instance(s) still running after {timeout:.0f} s; they end as the engine reaches them"
        )


@journey.command("discard-draft")
@click.argument("journey_id")
@if_revision
@options
@click.pass_obj
def discard_draft(ws: Workspace, journey_id: str, revision: int | None, as_json: bool, address) -> None:
    """Throw away a journey's draft (edits saved since publishing); its published versions, state and running
    instances stay. Safe to repeat: with no draft it says so (with --if-revision, a repeat is refused once the
    discard moved the revision on). A journey never published is refused (archive it)."""
    request = pb.DiscardDraftRequest(journey_id=journey_id, expected_revision=revision or 0)
    reply = call(ws, address, as_json, lambda stub, md: stub.DiscardDraft(request, metadata=md, timeout=30))
    if as_json:  # every field, false and 0 too
        emit(
            {
                "journey": as_dict(reply.journey),
                "discarded": reply.discarded,
                "discardedVersion": str(reply.discarded_version),
            }
        )
        return
    done = f"draft v{reply.discarded_version} discarded" if reply.discarded else "no draft to discard"
    out.print(f"{journey_line(as_dict(reply.journey))} ({done})", soft_wrap=True, highlight=False)


@journey.command("get")
@click.argument("journey_id")
@click.option("--version", default=0, show_default=True, help="a published version (0: the live one, else the draft)")
@click.option("--draft", is_flag=True, help="its draft (unpublished edits) instead of a published version")
@options
@click.pass_obj
def get(ws: Workspace, journey_id: str, version: int, draft: bool, as_json: bool, address) -> None:
    """A journey: state, versions, running instances, revision (what --if-revision takes) and its definition
    (as JSON)."""
    request = pb.GetJourneyRequest(journey_id=journey_id, version=version, draft=draft)
    document = as_dict(call(ws, address, as_json, lambda stub, md: stub.GetJourney(request, metadata=md, timeout=10)))
    if as_json:
        emit(document)
        return
    running, revision = document.get("activeInstances", "0"), document.get("revision", "0")
    out.print(journey_line(document) + f"; {running} running; revision {revision}")
    out.print_json(json.dumps(document.get("definition", {})))


@journey.command("list")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(JOURNEY_STATES), help="only these (default: all but archived)"
)
@click.option("--limit", default=0, help="at most this many (0: all)")
@options
@click.pass_obj
def list_journeys(ws: Workspace, states: tuple[str, ...], limit: int, as_json: bool, address) -> None:
    """Every journey: state, live and draft versions, priority, running instances."""
    wanted = [pb.JourneyState.Value(f"JOURNEY_STATE_{s.upper()}") for s in states]

    async def work(stub, md):
        return await all_pages(
            lambda token: stub.ListJourneys(
                pb.ListJourneysRequest(states=wanted, page_size=PAGE, page_token=token), metadata=md, timeout=10
            ),
            "journeys",
            limit,
        )

    documents = [as_dict(j) for j in call(ws, address, as_json, work)]
    for document in documents:
        document.pop("definition", None)  # the list is an overview; `journey get` shows a definition
    if as_json:
        emit(documents)
        return
    show_journeys(documents)


@journey.command("enroll")
@click.argument("journey_id")
@click.argument("person", nargs=-1, required=True)
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@click.option("--properties", help="entry properties as a JSON object (the journey reads them as entry.<name>)")
@click.option("--idempotency-key", default="", help="the same key enrolls once (a retry returns the first answer)")
@options
@click.pass_obj
def enroll(
    ws: Workspace,
    journey_id: str,
    person: tuple[str, ...],
    properties: str | None,
    idempotency_key: str,
    identity_address,
    as_json: bool,
    address,
) -> None:
    """Enter a person (PERSON_ID, or TYPE VALUE such as `user_id ada`) into a journey whose entry is `api`
    (re-entry rules and caps apply)."""
    person_id = asyncio.run(resolve_person(ws, identity_address, person))
    request = pb.EnrollRequest(journey_id=journey_id, person_id=person_id, idempotency_key=idempotency_key)
    if properties:
        try:
            parsed = json.loads(properties)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--properties") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--properties")
        request.properties.update(parsed)
    reply = call(ws, address, as_json, lambda stub, md: stub.Enroll(request, metadata=md, timeout=60))
    if as_json:
        emit(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True))
    elif reply.entered:
        out.print(f"entered: instance {reply.instance_id}")
    else:
        out.print(f"not entered: {reply.reason}")
        raise SystemExit(1)


@journey.command("exit")
@click.argument("instance_id")
@click.option("--reason", default="operator", show_default=True, help="recorded as the end reason api:<reason>")
@options
@click.pass_obj
def exit_instance(ws: Workspace, instance_id: str, reason: str, as_json: bool, address) -> None:
    """End an instance now: its timers are cancelled and its pending actions withdrawn."""
    request = pb.ExitInstanceRequest(instance_id=instance_id, reason=reason)
    document = as_dict(call(ws, address, as_json, lambda stub, md: stub.ExitInstance(request, metadata=md, timeout=60)))
    if as_json:
        emit(document)
    else:
        out.print(
            f"instance {instance_id}: {enum_name(document.get('state', ''), 'INSTANCE_STATE_')} ({document.get('endReason', '')})"
        )


@journey.command("instances")
@click.argument("value", nargs=-1, metavar="[VALUE]")
@click.option("--person", "person", help="a person's instances: --person PERSON_ID, or --person TYPE VALUE")
@click.option("--identity-address", help="identity gRPC address, to resolve --person TYPE VALUE")
@click.option("--journey", "journey_id", help="a journey's instances")
@click.option("--state", "states", multiple=True, type=click.Choice(INSTANCE_STATES), help="only these (default: all)")
@click.option("--limit", default=100, show_default=True, help="at most this many, newest first (0: all)")
@click.option("--steps", is_flag=True, help="show each instance's steps (node, time, outcome)")
@options
@click.pass_obj
def instances(
    ws: Workspace,
    value: tuple[str, ...],
    person,
    identity_address,
    journey_id,
    states: tuple[str, ...],
    limit: int,
    steps: bool,
    as_json: bool,
    address,
) -> None:
    """Instances of one person (--person PERSON_ID, or --person TYPE VALUE) or of one journey, newest first."""
    if bool(person) == bool(journey_id):
        raise click.UsageError("name exactly one of --person and --journey")
    if value and not person:
        raise click.UsageError(f"unexpected {' '.join(value)}: only --person TYPE VALUE takes a second word")
    if person:
        person = asyncio.run(resolve_person(ws, identity_address, (person, *value)))
    wanted = [pb.InstanceState.Value(f"INSTANCE_STATE_{s.upper()}") for s in states]

    async def work(stub, md):
        return await all_pages(
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

    documents = [as_dict(i) for i in call(ws, address, as_json, work)]
    if as_json:
        emit(documents)
        return
    show_instances(documents, f"instances of {'person ' + person if person else 'journey ' + journey_id}", steps=steps)


@journey.command("stats")
@click.argument("journey_id")
@click.option("--version", default=0, show_default=True, help="one version (0: every version)")
@options
@click.pass_obj
def stats(ws: Workspace, journey_id: str, version: int, as_json: bool, address) -> None:
    """Entries, conversions, exits by reason, arbiter decisions, and each split variant against its control."""
    request = pb.GetJourneyStatsRequest(journey_id=journey_id, version=version)
    reply = call(ws, address, as_json, lambda stub, md: stub.GetJourneyStats(request, metadata=md, timeout=30))
    if as_json:
        emit(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True))
        return
    show_stats(journey_id, reply)


COMMANDS = (journey, approvals, decisions, inbox)
