"""cdpctl's audience commands: segments (segmentation) and the computed traits they can read (profile).

cdpctl segment create vip 'scores.clv > 500'   # define a segment; progress until it is live
cdpctl segment update vip 'scores.clv > 800'   # change it; who entered and exited once it is live
cdpctl segment estimate 'traits.plan = "pro"'  # people it holds now; nothing is created
cdpctl segment members vip [--json] / delete vip [--force]   # its members and total; remove it (members exit)
cdpctl segment explain vip p_123 [--json]      # why a person is (or is not) in it: each condition held or not
cdpctl segments                                # every segment: state, size, definition
cdpctl traits [define NAME --op count --event "Order Completed" | delete NAME [--force]]   # computed traits
"""

from __future__ import annotations

import asyncio
import json
import sys

import click

from cdpctl import tls
from cdpctl.common import (
    call_service,
    console,
    json_option,
    out,
    person_key,
    resolve_person,
    rpc_error,
    service_address,
)
from cdpctl.platform import Workspace

SEGMENTS_PAGE = 1_000  # the most ListSegments answers a call

# ------------------------------------------------------------------------------------ computed traits

TRAIT_OPS = (
    "count", "sum", "avg", "min", "max", "first", "last", "most_frequent", "unique", "unique_count",
    "max_speed", "mismatch_count",
)  # fmt: skip


def _profile_call(ws: Workspace, address: str | None, as_json: bool, work):
    from cdp.profile.v1 import profile_pb2_grpc

    return call_service(ws, "profile", profile_pb2_grpc.ProfileServiceStub, address, as_json, work)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--address", help="profile gRPC address (default: the one `cdpctl up` runs)")
@click.pass_context
def traits(ctx: click.Context, as_json: bool, address) -> None:
    """Computed traits (profile's `computed.*`): every one defined, its definition and state; `define` and
    `delete` change them."""
    if ctx.invoked_subcommand is not None:
        return
    from google.protobuf import json_format
    from rich.table import Table

    from cdp.profile.v1 import profile_pb2

    ws: Workspace = ctx.obj

    async def listed(stub, metadata) -> list[dict]:
        reply = await stub.ListComputedTraits(profile_pb2.ListComputedTraitsRequest(), metadata=metadata, timeout=10)
        return [json_format.MessageToDict(t, always_print_fields_with_no_presence=True) for t in reply.traits]

    documents = _profile_call(ws, address, as_json, listed)
    if as_json:
        out.print_json(json.dumps(documents))
        return
    table = Table(title="computed traits")
    for column in ("trait", "op", "events", "property", "where", "window", "state"):
        table.add_column(column)
    for document in documents:
        d = document["definition"]
        state = document["state"]
        if state != "ready":
            state += f" {document['profilesDone']}/{document['profilesTotal']}"
        where = json.dumps(d["where"]) if d.get("where") else ""
        events = ", ".join(d["eventNames"]) or "any"
        table.add_row(
            d["name"],
            d["op"],
            f"{d['eventType'] or 'track'}: {events}",
            d["property"],
            where,
            d["window"] or "lifetime",
            state,
        )
    out.print(table)


@traits.command("define")
@click.argument("name")
@click.option("--op", required=True, type=click.Choice(TRAIT_OPS), help="what it computes over the matching events")
@click.option("--event", "events", multiple=True, help="an event name to match (repeatable; none: any)")
@click.option("--event-type", default="", help="track (default), page, screen, identify or any")
@click.option("--property", "prop", default="", help="dot path into the event's properties (not for count)")
@click.option(
    "--where", default=None, help='conditions on properties as a JSON object, e.g. \'{"total": {"$gt": 50}}\''
)
@click.option("--window", default="", help="sliding window: 30d, 12h, 15m, 90s (none: lifetime)")
@click.option("--compare", default="", help="mismatch_count: the path PROPERTY is compared with")
@click.option("--address", help="profile gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def traits_define(ws: Workspace, name: str, op: str, events, event_type, prop, where, window, compare, address) -> None:
    """Define (or redefine) computed trait NAME and wait until it is ready: every person already known is
    computed from their retained events."""
    from google.protobuf import json_format

    from cdp.profile.v1 import profile_pb2

    definition = profile_pb2.ComputedTraitDefinition(
        name=name, op=op, event_type=event_type, event_names=list(events), property=prop, window=window, compare=compare
    )
    if where:
        json_format.ParseDict(json_option(where, "--where"), definition.where)

    async def define(stub, metadata) -> profile_pb2.ComputedTraitStatus:
        status = await stub.DefineComputedTrait(
            profile_pb2.DefineComputedTraitRequest(definition=definition), metadata=metadata, timeout=30
        )
        while status.state != "ready":
            await asyncio.sleep(0.2)
            listed = await stub.ListComputedTraits(
                profile_pb2.ListComputedTraitsRequest(), metadata=metadata, timeout=10
            )
            status = next((t for t in listed.traits if t.definition.name == name), status)
        return status

    status = _profile_call(ws, address, False, define)
    out.print(
        f"computed trait {name} ready: {status.profiles_total} profiles computed; profiles show it as computed.{name}"
    )


@traits.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="delete it even while segments, live journeys or deployed models read it")
@click.option("--address", help="profile gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def traits_delete(ws: Workspace, name: str, force: bool, address) -> None:
    """Delete computed trait NAME: it leaves every profile. Refused while a segment, a live journey or a deployed
    model reads it (the refusal names them); --force deletes it anyway, and they read it as missing (0 for a
    count or sum; a model's feature takes its default)."""
    from cdp.profile.v1 import profile_pb2

    async def delete(stub, metadata) -> None:
        request = profile_pb2.DeleteComputedTraitRequest(name=name, force=force)
        await stub.DeleteComputedTrait(request, metadata=metadata, timeout=30)

    _profile_call(ws, address, False, delete)
    out.print(f"computed trait {name} deleted")


def _segmentation_address(ws: Workspace, address: str | None) -> str:
    return service_address(ws, "segmentation", address)


async def _create_segment(address: str, token: str, request, show_progress: bool) -> dict:
    import grpc.aio
    from google.protobuf import json_format
    from rich.progress import Progress

    from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),)
    async with tls.aio_channel(address) as channel:
        stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
        try:
            try:
                segment = await stub.CreateSegment(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    raise click.ClickException(
                        f"ALREADY_EXISTS: segment {request.id} exists: `cdpctl segment update {request.id} "
                        "DEFINITION` changes it"
                    ) from None
                raise
            warnings = list(segment.warnings)  # the create's answer carries them, GetSegment does not
            with Progress(console=console, disable=not show_progress, transient=True) as progress:
                task = progress.add_task(f"evaluating {request.id}", total=None)
                while segment.state == segmentation_pb2.SEGMENT_STATE_BUILDING:
                    progress.update(task, completed=segment.profiles_done, total=segment.profiles_total or None)
                    await asyncio.sleep(0.2)
                    segment = await stub.GetSegment(
                        segmentation_pb2.GetSegmentRequest(id=request.id), metadata=metadata, timeout=10
                    )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None
    return {**json_format.MessageToDict(segment, always_print_fields_with_no_presence=True), "warnings": warnings}


def _warn(warnings) -> None:
    """The service's warnings about a definition (a type no profile holds in a field, a consent key or
    trait no profile has): an audience that is empty for a reason, said where the result is."""
    for warning in warnings:
        out.print(f"warning: {warning}", markup=False, highlight=False)


@click.group()
def segment() -> None:
    """Define and inspect segments (audiences)."""


@segment.command("create")
@click.argument("segment_id")
@click.argument("definition")
@click.option("--name", default="", help="display name")
@click.option("--address", help="segmentation gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def segment_create(ws: Workspace, segment_id: str, definition: str, name: str, address) -> None:
    """Define a segment in the segment language (or a JSON tree) and wait until it is live."""

    from cdp.segmentation.v1 import segmentation_pb2

    address = _segmentation_address(ws, address)
    request = segmentation_pb2.CreateSegmentRequest(id=segment_id, name=name, definition=_definition(definition))
    created = asyncio.run(_create_segment(address, ws.admin_token(), request, show_progress=sys.stderr.isatty()))
    state = created.get("state", "").removeprefix("SEGMENT_STATE_").lower()
    if state != "live":
        raise click.ClickException(f"segment {segment_id} is {state}: {created.get('error', '')}")
    size = int(created.get("size", 0))
    out.print(f"segment {segment_id} live: {size} member{'' if size == 1 else 's'} ({created.get('text', '')})")
    _warn(created["warnings"])


def _definition(definition: str):
    """A segment's definition as the service takes it: the segment language, or a JSON tree."""
    from google.protobuf import json_format

    from cdp.segmentation.v1 import segmentation_pb2

    if definition.lstrip().startswith("{"):
        request_definition = segmentation_pb2.Definition()
        json_format.ParseDict(json_option(definition, "DEFINITION"), request_definition.tree)
        return request_definition
    return segmentation_pb2.Definition(text=definition)


@segment.command("update")
@click.argument("segment_id")
@click.argument("definition")
@click.option("--name", default="", help="a new display name (default: unchanged)")
@click.option("--address", help="segmentation gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def segment_update(ws: Workspace, segment_id: str, definition: str, name: str, address) -> None:
    """Change a live segment's definition (segment language or a JSON tree) and wait until the new one is
    live: who entered and who exited. A definition that cannot be evaluated leaves the old one live."""
    from cdp.segmentation.v1 import segmentation_pb2

    request = segmentation_pb2.UpdateSegmentRequest(id=segment_id, name=name, definition=_definition(definition))

    async def update(stub, metadata):
        # The service answers once the new definition has been evaluated over the whole population.
        return await stub.UpdateSegment(request, metadata=metadata, timeout=600)

    reply = _segmentation_call(ws, address, False, update)
    size = reply.segment.size
    out.print(
        f"segment {segment_id} live: {size} member{'' if size == 1 else 's'} ({reply.segment.text}); "
        f"{reply.entered} entered, {reply.exited} exited",
        markup=False,
        highlight=False,
    )
    _warn(reply.segment.warnings)


def _segmentation_call(ws: Workspace, address: str | None, as_json: bool, work):
    from cdp.segmentation.v1 import segmentation_pb2_grpc

    return call_service(ws, "segmentation", segmentation_pb2_grpc.SegmentationServiceStub, address, as_json, work)


@segment.command("estimate")
@click.argument("definition")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (a sample of person ids included)")
@click.option("--address", help="segmentation gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def segment_estimate(ws: Workspace, definition: str, as_json: bool, address) -> None:
    """How many people a definition (segment language, or a JSON tree) holds now; nothing is created."""
    from google.protobuf import json_format

    from cdp.segmentation.v1 import segmentation_pb2

    request = segmentation_pb2.EstimateRequest()
    if definition.lstrip().startswith("{"):
        json_format.ParseDict(json_option(definition, "DEFINITION"), request.definition.tree)
    else:
        request.definition.text = definition

    async def estimate(stub, metadata) -> dict:
        reply = await stub.Estimate(request, metadata=metadata, timeout=60)
        return json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)

    document = _segmentation_call(ws, address, as_json, estimate)
    if as_json:
        out.print_json(json.dumps(document))
        return
    size, population = int(document["size"]), int(document["population"])
    out.print(f"{size} of {population} people ({document['text']})", markup=False, highlight=False)
    _warn(document.get("warnings", ()))


@segment.command("delete")
@click.argument("segment_id")
@click.option("--force", is_flag=True, help="delete it even while live journeys use it")
@click.option("--address", help="segmentation gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def segment_delete(ws: Workspace, segment_id: str, force: bool, address) -> None:
    """Delete a segment: every member exits it (reason "deleted"), and it is no longer listed. Refused while
    a live (active or paused) journey enters on it or reads it (the refusal names them); --force deletes it
    anyway, and those journeys enter nobody on it."""
    from cdp.segmentation.v1 import segmentation_pb2

    async def delete(stub, metadata) -> int:
        request = segmentation_pb2.DeleteSegmentRequest(id=segment_id, force=force)
        return (await stub.DeleteSegment(request, metadata=metadata, timeout=30)).exited

    exited = _segmentation_call(ws, address, False, delete)
    out.print(f"segment {segment_id} deleted: {exited} member{'' if exited == 1 else 's'} exited")


@segment.command("members")
@click.argument("segment_id")
@click.option("--limit", default=100, show_default=True, help="at most this many")
@click.option("--json", "as_json", is_flag=True, help="the service's answer as JSON (members, total, next page)")
@click.option("--address", help="segmentation gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def segment_members(ws: Workspace, segment_id: str, limit: int, as_json: bool, address) -> None:
    """A segment's members (person ids, in id order) and when they entered, then how many it holds."""
    from google.protobuf import json_format
    from rich.table import Table

    from cdp.segmentation.v1 import segmentation_pb2

    async def members(stub, metadata):
        request = segmentation_pb2.ListMembersRequest(segment_id=segment_id, page_size=max(1, min(limit, 10_000)))
        return await stub.ListMembers(request, metadata=metadata, timeout=10)

    reply = _segmentation_call(ws, address, as_json, members)
    if as_json:
        out.print_json(json.dumps(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)))
        return
    table = Table(title=f"segment {segment_id}")
    table.add_column("person")
    table.add_column("since")
    for member in reply.members:
        since = member.since.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if member.HasField("since") else ""
        table.add_row(member.person_id, since)
    out.print(table)
    shown = len(reply.members)
    more = f" ({shown} shown; --limit shows more)" if shown < reply.total else ""
    out.print(f"{reply.total} member{'' if reply.total == 1 else 's'}{more}", markup=False, highlight=False)


# What each node's result shows: held, did not hold, did not hold for want of a value or cannot be told alone.
RESULT_MARKS = {
    "CONDITION_RESULT_TRUE": ("✓", ""),
    "CONDITION_RESULT_FALSE": ("✗", ""),
    "CONDITION_RESULT_MISSING": ("?", "no value"),
    "CONDITION_RESULT_UNKNOWN": ("?", "cannot be evaluated alone"),
}


def explanation_lines(node: dict, depth: int = 0) -> list[str]:
    """An explained tree (the service's answer as JSON) as indented lines: a mark, then the node's text
    (and/or/not by their keyword, their operands below them)."""
    mark, why = RESULT_MARKS.get(node.get("result", ""), ("?", "unknown"))
    kind = node.get("kind", "")
    text = kind if kind in ("and", "or", "not") else node.get("text", "")
    if node.get("result") == "CONDITION_RESULT_MISSING" and node.get("missing"):
        why = f"no value: {', '.join(node['missing'])}"
    line = f"{'  ' * depth}{mark} {text}" + (f"  ({why})" if why else "")
    lines = [line]
    for operand in node.get("operands", ()):
        lines += explanation_lines(operand, depth + 1)
    return lines


@segment.command("explain")
@click.argument("segment_id")
@click.argument("person", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="the service's answer as JSON")
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@click.option("--address", help="segmentation gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def segment_explain(ws: Workspace, segment_id: str, person, as_json: bool, identity_address, address) -> None:
    """Why a person (PERSON_ID, or TYPE VALUE) is or is not in a segment: each condition of its live
    definition marked ✓ (holds), ✗ (does not) or ? (no value in a field it reads, or cannot be evaluated
    alone), then whether the person is a member and whether the definition holds now. Never the person's
    values: which conditions held, not what the values were."""
    from google.protobuf import json_format

    from cdp.segmentation.v1 import segmentation_pb2

    key = person_key(person)
    person_id = key[0] if len(key) == 1 else asyncio.run(resolve_person(ws, identity_address, key))

    async def explain(stub, metadata):
        request = segmentation_pb2.ExplainMembershipRequest(segment_id=segment_id, person_id=person_id)
        return await stub.ExplainMembership(request, metadata=metadata, timeout=30)

    reply = _segmentation_call(ws, address, as_json, explain)
    document = json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
    if as_json:
        out.print_json(json.dumps(document))
        return
    for line in explanation_lines(document["tree"]):
        out.print(line, markup=False, highlight=False)
    if reply.member:
        since = reply.since.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if reply.HasField("since") else "?"
        membership = f"{reply.person_id} is a member of {segment_id} (since {since} UTC)"
    else:
        membership = f"{reply.person_id} is not a member of {segment_id}"
    holds = "holds" if reply.matches else "does not hold"
    out.print(
        f"{membership}; its definition (version {reply.segment_version}) {holds} for them now",
        markup=False,
        highlight=False,
    )
    if reply.note:
        out.print(f"note: {reply.note}", markup=False, highlight=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--address", help="segmentation gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def segments(ws: Workspace, as_json: bool, address) -> None:
    """Every segment: state, size, definition."""
    import grpc.aio
    from google.protobuf import json_format
    from rich.table import Table

    from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

    async def listed() -> list[dict]:
        # Every page (ListSegments answers at most 1,000 segments, and less than 3 MiB, a call).
        documents, token = [], ""
        async with tls.aio_channel(_segmentation_address(ws, address)) as channel:
            stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            while True:
                try:
                    reply = await stub.ListSegments(
                        segmentation_pb2.ListSegmentsRequest(page_size=SEGMENTS_PAGE, page_token=token),
                        metadata=(("authorization", f"Bearer {ws.admin_token()}"),),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as exc:
                    raise rpc_error(exc) from None
                documents += [
                    json_format.MessageToDict(s, always_print_fields_with_no_presence=True) for s in reply.segments
                ]
                token = reply.next_page_token
                if not token:
                    return documents

    documents = asyncio.run(listed())
    if as_json:
        out.print_json(json.dumps(documents))
        return
    table = Table(title="segments")
    for column in ("segment", "state", "members", "definition"):
        table.add_column(column)
    for document in documents:
        state = document.get("state", "").removeprefix("SEGMENT_STATE_").lower()
        table.add_row(document["id"], state, document.get("size", "0"), document.get("text", ""))
    out.print(table)
