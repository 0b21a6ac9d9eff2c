"""Operator commands on what journeys do to people: the approval gate's list (`approvals`, with `approve`
and `reject`), a person's decision history (`decisions`: "why did or didn't this person get that?") and a
person's in-app inbox (`inbox`). PERSON is a person id, or TYPE VALUE such as `user_id u1` (resolved by
identity). Nothing here logs a person's identifiers.
"""

from __future__ import annotations

import asyncio
import os

import click

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdpctl.common import all_pages, as_dict, emit, enum_name, out, resolve_person
from cdpctl.journeys_render import show_approvals, show_decisions, show_inbox
from cdpctl.journeys_service import PAGE, call, options
from cdpctl.platform import Workspace

APPROVAL_STATES = ("pending", "approved", "rejected", "expired")

# ----------------------------------------------------------------------------------------- approvals


@click.group(invoke_without_command=True)
@click.option(
    "--state", "states", multiple=True, type=click.Choice(APPROVAL_STATES), help="only these (default: pending)"
)
@click.option("--journey", "journey_id", default="", help="one journey's")
@click.option("--limit", default=100, show_default=True, help="at most this many (0: all)")
@options
@click.pass_context
def approvals(ctx: click.Context, states: tuple[str, ...], journey_id: str, limit: int, as_json: bool, address) -> None:
    """Actions held by an approval gate: list them (pending by default), or approve / reject one."""
    if ctx.invoked_subcommand is not None:
        return
    ws: Workspace = ctx.obj
    wanted = [pb.ApprovalState.Value(f"APPROVAL_STATE_{s.upper()}") for s in states]

    async def work(stub, md):
        return await all_pages(
            lambda token: stub.ListApprovals(
                pb.ListApprovalsRequest(states=wanted, journey_id=journey_id, page_size=PAGE, page_token=token),
                metadata=md,
                timeout=10,
            ),
            "approvals",
            limit,
        )

    documents = [as_dict(a) for a in call(ws, address, as_json, work)]
    if as_json:
        emit(documents)
        return
    show_approvals(documents)


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
    @options
    @click.pass_obj
    def command(ws: Workspace, action_id: str, note: str, decided_by: str, as_json: bool, address) -> None:
        request = pb.DecideApprovalRequest(action_id=action_id, decided_by=decided_by, note=note)
        reply = call(ws, address, as_json, lambda stub, md: getattr(stub, rpc)(request, metadata=md, timeout=60))
        document = as_dict(reply)
        if as_json:
            emit(document)
        else:
            out.print(f"action {action_id}: {enum_name(document.get('state', ''), 'APPROVAL_STATE_')}")

    return command


approve = _decide("approve", "ApproveAction", "Let a held action go on to the arbiter's other checks and its channel.")
reject = _decide("reject", "RejectAction", "Drop a held action for good (recorded as rejected).")


# ------------------------------------------------------------------------------- decisions and inbox


@click.command()
@click.argument("person", nargs=-1, required=True)
@click.option("--journey", "journey_id", default="", help="only this journey's actions")
@click.option("--action", "action_id", default="", help="only this action")
@click.option("--limit", default=100, show_default=True, help="at most this many, newest first (0: all)")
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@options
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
    first, after the actions held now for the profile (`held`: no decision yet), with the latest entry each
    journey turned them away from (`not_entered`: re-entry, cooldown, max_concurrent, entry if, paused)."""
    person_id = asyncio.run(resolve_person(ws, identity_address, person))

    async def work(stub, md):
        return await all_pages(
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

    documents = [as_dict(d) for d in call(ws, address, as_json, work)]
    if as_json:
        emit(documents)
        return
    show_decisions(person_id, documents, filtered=bool(journey_id or action_id))


@click.command()
@click.argument("person", nargs=-1, required=True)
@click.option("--unread", is_flag=True, help="unread messages only")
@click.option("--limit", default=100, show_default=True, help="at most this many (0: all)")
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@options
@click.pass_obj
def inbox(
    ws: Workspace, person: tuple[str, ...], unread: bool, limit: int, identity_address, as_json: bool, address
) -> None:
    """A person's in-app inbox (PERSON_ID, or TYPE VALUE), as the person's apps read it."""
    person_id = asyncio.run(resolve_person(ws, identity_address, person))

    async def work(stub, md):
        return await all_pages(
            lambda token: stub.ListInbox(
                pb.ListInboxRequest(person_id=person_id, unread_only=unread, page_size=PAGE, page_token=token),
                metadata=md,
                timeout=10,
            ),
            "messages",
            limit,
        )

    documents = [as_dict(m) for m in call(ws, address, as_json, work)]
    if as_json:
        emit(documents)
        return
    show_inbox(person_id, documents)
