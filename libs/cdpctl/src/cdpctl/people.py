"""Operator commands on one person: see its identity graph, undo a wrong merge, quarantine an identifier,
export everything held about a person, and the privacy deletion.

`export` answers a person's access request: identity names the person and the persons merged into it,
then every service that keeps personal data (EXPORTING) is asked at once for its part
(`PrivacyService/ExportPerson`, scope `privacy:export`). A service that does not answer (not running,
down, or without ExportPerson) leaves a hole that is never silent: it is named in the document's
`missing` and the command exits 1, after writing what the others gave.

A person is named by its person id, or by an identifier (`user_id u1`) that identity resolves to the
person holding it now. Deletion is irreversible, so it asks first unless `--yes` is given.

`delete --wait` reports when the deletion is done everywhere: profile answers once its own part is
durable and the `privacy.deleted` notice is in the PRIVACY stream; every other service that keeps the
person follows that stream with a durable consumer and acknowledges a notice only once its purge is
durable and its store erased. So the deletion is done when every durable consumer of PRIVACY has
acknowledged everything the stream held when profile answered (the notice included). Which consumers
those are is not only what the server lists: a consumer deleted by mistake (or lost with a stream
restore) acknowledges nothing and lists nothing, and the deletion would look done while that service
never saw it. So `--wait` also waits for every consumer the platform's services have
(`subjects.privacy_durables`: the services in the run file `cdpctl up` wrote, every platform service
without one); a running service creates a lost consumer again, which then acknowledges. A consumer that
never gets there (a service down, its consumer gone, a replica scaled away whose consumer was left
behind) is named, a missing one as missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
import grpc
from google.protobuf import json_format

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdpctl import tls
from cdpctl.common import (
    bearer,
    console,
    nats_tls,
    nats_url,
    out,
    person_key,
    resolve_person,
    rpc_error,
    service_address,
    whole_numbers,
    write_owner_only,
)
from cdpctl.platform import SERVICES, Workspace

if TYPE_CHECKING:
    import ssl


@click.command()
@click.argument("person", nargs=-1, required=True)
@click.option("--address", help="identity gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def graph(ws: Workspace, person: tuple[str, ...], address) -> None:
    """A person's identity graph (PERSON_ID, or TYPE VALUE): identifiers, merges with their ids, separations."""
    if len(person_key(person)) == 1:
        request = identity_pb2.GetGraphRequest(person_id=person[0])
    else:
        request = identity_pb2.GetGraphRequest(identifier=identity_pb2.Identifier(type=person[0], value=person[1]))

    async def call() -> dict:
        async with tls.aio_channel(service_address(ws, "identity", address)) as channel:
            try:
                reply = await identity_pb2_grpc.IdentityServiceStub(channel).GetGraph(
                    request, metadata=bearer(ws), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc) from None
        # Every field, false and empty included: an identifier not quarantined says so.
        return json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)

    out.print_json(json.dumps(asyncio.run(call())))


@click.command()
@click.argument("merge_id")
@click.option("--reason", default="", help="why the merge was wrong (kept on the graph)")
@click.option("--address", help="identity gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def unmerge(ws: Workspace, merge_id: str, reason: str, address) -> None:
    """Split a merge back (the merge id is on `GetGraph`'s merges): the loser becomes a person again."""

    async def call() -> dict:
        async with tls.aio_channel(service_address(ws, "identity", address)) as channel:
            try:
                reply = await identity_pb2_grpc.IdentityServiceStub(channel).Unmerge(
                    identity_pb2.UnmergeRequest(merge_id=merge_id, reason=reason), metadata=bearer(ws), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc) from None
        return json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)

    out.print_json(json.dumps(asyncio.run(call())))


@click.command()
@click.argument("identifier_type")
@click.argument("value")
@click.option("--release", is_flag=True, help="lift the quarantine instead")
@click.option("--address", help="identity gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def quarantine(ws: Workspace, identifier_type: str, value: str, release: bool, address) -> None:
    """Quarantine an identifier (e.g. a shared device id): events carrying it no longer merge persons."""

    async def call() -> bool:
        request = identity_pb2.SetQuarantineRequest(
            identifier=identity_pb2.Identifier(type=identifier_type, value=value), quarantined=not release
        )
        async with tls.aio_channel(service_address(ws, "identity", address)) as channel:
            try:
                reply = await identity_pb2_grpc.IdentityServiceStub(channel).SetQuarantine(
                    request, metadata=bearer(ws), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc) from None
        return reply.changed

    changed = asyncio.run(call())
    action = "released" if release else "quarantined"
    out.print(f"{identifier_type} {action}" if changed else f"{identifier_type} was already {action}; nothing changed")


# Every service that keeps personal data answers PrivacyService/ExportPerson with its part.
EXPORTING = ("identity", "profile", "segmentation", "scoring", "orchestration", "crm")


async def _graph_persons(ws: Workspace, address: str | None, person_id: str) -> tuple[str, list[str]]:
    """The person as identity knows it now, and the persons merged into it (what other services may still
    keep under their ids). A person identity does not know (deleted, or never seen) is asked as given."""
    async with tls.aio_channel(service_address(ws, "identity", address)) as channel:
        try:
            graph = await identity_pb2_grpc.IdentityServiceStub(channel).GetGraph(
                identity_pb2.GetGraphRequest(person_id=person_id), metadata=bearer(ws), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return person_id, []
            raise rpc_error(exc) from None
    merged = [m.loser for m in graph.merges if m.loser != graph.person_id]
    return graph.person_id, list(dict.fromkeys(merged))


async def _export_part(ws: Workspace, service: str, request: privacy_pb2.ExportPersonRequest) -> dict | str:
    """One service's document, or why there is none."""
    address = ((ws.read_run() or {}).get("services", {}).get(service) or {}).get("grpc")
    if not address:
        return "not running"
    async with tls.aio_channel(address) as channel:
        try:
            reply = await privacy_pb2_grpc.PrivacyServiceStub(channel).ExportPerson(
                request, metadata=bearer(ws), timeout=60
            )
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return whole_numbers(json_format.MessageToDict(reply.document))  # 42 as sent, not 42.0


async def export_document(ws: Workspace, person_id: str, identity_address: str | None) -> tuple[dict, dict[str, str]]:
    """Everything the platform holds about a person, every service asked at once, and the services that
    did not answer (name -> why)."""
    person_id, merged = await _graph_persons(ws, identity_address, person_id)
    request = privacy_pb2.ExportPersonRequest(person_id=person_id, merged_person_ids=merged)
    parts = await asyncio.gather(*(_export_part(ws, name, request) for name in EXPORTING))
    answered = {name: part for name, part in zip(EXPORTING, parts, strict=True) if isinstance(part, dict)}
    missing = {name: part for name, part in zip(EXPORTING, parts, strict=True) if isinstance(part, str)}
    document = {
        "person_id": person_id,
        "merged_person_ids": merged,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "services": answered,
        "missing": sorted(missing),
    }
    return document, missing


@click.command()
@click.argument("person", nargs=-1, required=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="write to this file")
@click.option("--identity-address", help="identity gRPC address (default: the one `cdpctl up` runs)")
@click.pass_obj
def export(ws: Workspace, person: tuple[str, ...], output: Path | None, identity_address) -> None:
    """Everything held about a person (PERSON_ID, or TYPE VALUE), for their access request: one JSON
    document with every service's part (identity's graph, profile's record, segment memberships, scoring's
    fields, journeys, decisions, inbox and sends, CRM records), to stdout or to --output (owner-only).
    Needs the admin token (scope privacy:export). A service that does not answer is named in "missing"
    and the command exits 1 after writing the rest: docs/privacy.md."""

    async def call() -> tuple[dict, dict[str, str]]:
        person_id = await resolve_person(ws, identity_address, person)
        return await export_document(ws, person_id, identity_address)

    document, missing = asyncio.run(call())
    text = json.dumps(document, indent=2, ensure_ascii=False)
    if output is None:
        click.echo(text)
    else:
        write_owner_only(Path(output), text + "\n")  # personal data
        console.print(f"exported to {output}")
    if missing:
        where = f"written to {output}" if output is not None else "printed above"
        reasons = "; ".join(f"{name} ({why})" for name, why in sorted(missing.items()))
        raise click.ClickException(f"incomplete export ({where}): no answer from {reasons}")


@click.command()
@click.argument("person", nargs=-1, required=True)
@click.option("--suppress", is_flag=True, help="also drop future events carrying the person's identifiers")
@click.option("--request-id", default="", help="idempotency key (generated when unset)")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@click.option("--address", help="profile gRPC address (default: the one `cdpctl up` runs)")
@click.option("--wait", is_flag=True, help="wait until every service that keeps people acknowledged the deletion")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="seconds --wait waits")
@click.option("--nats", "nats_address", help="NATS URL for --wait (default: the one `cdpctl up` runs)")
@click.pass_obj
def delete(
    ws: Workspace,
    person: tuple[str, ...],
    suppress: bool,
    request_id: str,
    yes: bool,
    identity_address,
    address,
    wait: bool,
    timeout: float,
    nats_address: str | None,
) -> None:
    """Privacy deletion of a person (PERSON_ID, or TYPE VALUE) everywhere; irreversible."""
    person_id = asyncio.run(resolve_person(ws, identity_address, person))
    merged = asyncio.run(_merged_into(ws, address, person_id))
    if not yes:
        also = ""
        if merged:
            also = (
                f" {len(merged)} other person(s) merged into them are deleted with them"
                f"{' and their identifiers suppressed' if suppress else ''}: {', '.join(merged)}. If a merge "
                f"is wrong (a shared device), undo it first: `cdpctl graph {person_id}` lists the merges, "
                "`cdpctl unmerge MERGE_ID` splits one."
            )
        click.confirm(
            f"Delete person {person_id} and everything held about them on the platform of {ws.root}?{also} "
            "This cannot be undone",
            abort=True,
        )
    mode = profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE if suppress else profile_pb2.DELETE_MODE_DELETE
    # Made here, not by profile, so that a deletion answered UNAVAILABLE can be seen through by its id.
    request_id = request_id or uuid.uuid4().hex

    async def call() -> dict:
        async with tls.aio_channel(service_address(ws, "profile", address)) as channel:
            try:
                reply = await profile_pb2_grpc.ProfileServiceStub(channel).Delete(
                    profile_pb2.DeleteRequest(person_id=person_id, mode=mode, request_id=request_id),
                    metadata=bearer(ws),
                    timeout=60,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # Profile may have made the deletion durable and be publishing it: the same request
                    # answers once it is complete, so say how to repeat it.
                    check = f"cdpctl delete {person_id} --request-id {request_id} --yes{' --wait' if wait else ''}"
                    raise click.ClickException(
                        f"the deletion of person {person_id} (request {request_id}) is not complete: "
                        f"{exc.details()}. Profile completes a deletion it has accepted by itself once the bus "
                        f"answers; repeat the same request to see it through: `{check}`"
                    ) from None
                raise rpc_error(exc) from None
        return json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)

    result = asyncio.run(call())
    result["home"] = str(ws.root)  # which platform it was deleted on
    result["personId"], result["mergedPersons"] = person_id, merged or []  # who the deletion covered
    if not wait:
        out.print_json(json.dumps(result))
        return
    url = nats_url(ws, nats_address)
    expected = expected_privacy_consumers(ws, url)
    from cdpctl import bus  # the bus only for --wait (cdpctl's start-up stays short for the rest)

    try:
        acknowledged, missing = asyncio.run(privacy_acknowledged(url, timeout, expected, tls=nats_tls(ws, url)))
    except bus.NOT_ANSWERING as exc:
        # profile has done its part and published the notice: only the confirmation is missing.
        out.print_json(json.dumps(result))
        check = f"cdpctl delete {person_id} --request-id {result['requestId']} --yes --wait"
        raise click.ClickException(
            f"the deletion of person {person_id} was requested and accepted (request "
            f"{result['requestId']}), but waiting for every service to confirm it failed: "
            f"{bus.not_answering(url, exc, ws=ws).message}. Check later with `{check}`"
            f"{' and the same --nats' if nats_address else ''} (the same request: answered from its record, "
            "nothing is deleted twice)"
        ) from None
    result["acknowledged"], result["missing"] = acknowledged, missing
    out.print_json(json.dumps(result))
    pending = [f"{name} (no such consumer)" if name in missing else name for name, ok in acknowledged.items() if not ok]
    if not acknowledged:
        from cdp_kit.bus import subjects

        raise click.ClickException(f"no service follows {subjects.PRIVACY_DELETED} yet: nothing has purged the person")
    if pending:
        raise click.ClickException(f"not acknowledged within {timeout:g}s by: {', '.join(pending)}")


async def _merged_into(ws: Workspace, address, person_id: str) -> list[str] | None:
    """The persons merged into `person_id` as profile holds them (deleted with it); None when profile does
    not know the person (already deleted: a repeated request) or does not answer (the deletion says why)."""
    async with tls.aio_channel(service_address(ws, "profile", address)) as channel:
        try:
            held = await profile_pb2_grpc.ProfileServiceStub(channel).GetProfile(
                profile_pb2.GetProfileRequest(person_id=person_id), metadata=bearer(ws), timeout=10
            )
        except grpc.aio.AioRpcError:
            return None
    return list(held.merged_from)


def expected_privacy_consumers(ws: Workspace, url: str) -> list[str]:
    """The durable consumers of PRIVACY the platform has: of the services `cdpctl up` runs when `url` is
    its NATS, else of every platform service."""
    from cdp_kit.bus import subjects

    state = ws.read_run() or {}
    running = state.get("services") if state.get("nats") == url else None
    return subjects.privacy_durables(running or [svc.name for svc in SERVICES])


async def privacy_acknowledged(
    url: str, timeout: float, expected: Iterable[str] = (), *, tls: ssl.SSLContext | None = None
) -> tuple[dict[str, bool], list[str]]:
    """Durable consumer of PRIVACY (those on the server and the `expected` ones) -> whether it has
    acknowledged everything the stream holds now, waiting up to `timeout` seconds for all of them (see the
    module docstring); and the expected ones the server does not have."""
    expected = list(expected)
    # The bus only for --wait: every other command here talks gRPC (and cdpctl's start-up stays short).
    from cdp_kit.bus import subjects
    from cdpctl.bus import ANSWER_TIMEOUT, connect

    # Every exchange with the server is bounded: a wedged one (SIGSTOP: the kernel still accepts on its
    # port) fails the wait with one of `cdpctl.bus.NOT_ANSWERING` instead of hanging.
    async with asyncio.timeout(ANSWER_TIMEOUT):
        nc = await connect(url, tls)  # cdpctl's certificate under `cdpctl up --tls`
    try:
        js = nc.jetstream()
        async with asyncio.timeout(ANSWER_TIMEOUT):
            last = (await js.stream_info(subjects.PRIVACY)).state.last_seq
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                listed = await js.consumers_info(subjects.PRIVACY)
            consumers = [c for c in listed if c.config.durable_name]
            done = dict.fromkeys(expected, False)  # gone from the server: nothing acknowledged
            done.update({c.config.durable_name: c.ack_floor.stream_seq >= last for c in consumers})
            if (done and all(done.values())) or loop.time() > deadline:
                present = {c.config.durable_name for c in consumers}
                return dict(sorted(done.items())), sorted(set(expected) - present)
            await asyncio.sleep(0.2)
    finally:
        with contextlib.suppress(TimeoutError):  # what was read stands; a wedged server only delays it
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await nc.close()
