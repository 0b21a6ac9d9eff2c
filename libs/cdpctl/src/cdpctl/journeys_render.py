"""How the orchestration commands show what the service answered on a terminal: a journey's one line, and
the tables of journeys, validation problems, instances, stats, approvals, decisions and inbox messages.

Each takes the API's messages as `--json` prints them (`common.as_dict`: camelCase, enums by name, 64-bit
integers as strings) or the reply itself, and prints to stdout; nothing here calls the service. Ids an
operator copies into another command are never cut.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdpctl.common import enum_name, out, short_time

# The rule orchestration names for an action held until the profile applies the person's latest event.
HELD_FOR_PROFILE = "profile_wait"


def journey_line(journey: dict) -> str:
    state = enum_name(journey.get("state", ""), "JOURNEY_STATE_")
    live = journey.get("version", "0")
    draft = journey.get("draftVersion")
    versions = f"live v{live}" if live != "0" else "never published"
    if draft and draft != live:
        versions += f", draft v{draft}"
    line = f"journey {journey.get('id')} ({journey.get('name', '')}): {state}, {versions}"
    if journey.get("invalid"):
        line += f" - NO LONGER VALIDATES: {journey['invalid']} (takes no entries; publish a fixed version)"
    for warning in journey.get("warnings") or ():
        line += f" - WARNING: {warning}"  # what the live version names is gone (a segment deleted since)
    return line


def show_problems(file: str, problems: list[dict[str, str]]) -> None:
    if not problems:
        out.print(f"{file}: valid")
        return
    # The heading is a line of its own: a long path must not wrap the count into pieces (a table title
    # wraps at the table's width).
    out.print(f"{file}: {len(problems)} problem{'' if len(problems) == 1 else 's'}", soft_wrap=True, highlight=False)
    table = Table()
    for column in ("node", "field", "problem"):
        table.add_column(column)
    for p in problems:
        table.add_row(p["node"] or "(journey)", p["field"], p["message"])
    out.print(table)


def show_journeys(documents: list[dict[str, Any]]) -> None:
    table = Table(title="journeys")
    for column in ("journey", "name", "state", "live", "draft", "priority", "running"):
        table.add_column(column)
    for j in documents:
        table.add_row(
            j["id"],
            j.get("name", ""),
            enum_name(j.get("state", ""), "JOURNEY_STATE_"),
            j.get("version", "0"),
            j.get("draftVersion", ""),
            str(j.get("priority", 0)),
            j.get("activeInstances", "0"),
        )
    out.print(table)


def show_instances(documents: list[dict[str, Any]], title: str, *, steps: bool) -> None:
    table = Table(title=title)
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
            enum_name(i.get("state", ""), "INSTANCE_STATE_"),
            i.get("nodeId", ""),
            i.get("variant", ""),
            short_time(i.get("enteredAt")),
            short_time(i.get("endedAt")),
            i.get("endReason", "") + (" (converted)" if i.get("converted") else ""),
        )
    out.print(table)
    if steps:
        for i in documents:
            out.print(f"[bold]{i['id']}[/]")
            for step in i.get("steps", []):
                out.print(f"  {short_time(step.get('at'))}  {step.get('nodeId', '')}  {step.get('outcome', '')}")


def show_stats(journey_id: str, reply: pb.JourneyStats) -> None:
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


def show_approvals(documents: list[dict[str, Any]]) -> None:
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
            enum_name(a.get("state", ""), "APPROVAL_STATE_"),
            short_time(a.get("requestedAt")),
            short_time(a.get("expiresAt")),
        )
    out.print(table)


# A send record's status while its action still has attempts behind it (orchestration's dispatch.PENDING).
PENDING_DELIVERY = "pending"


def show_decisions(person_id: str, documents: list[dict[str, Any]], *, filtered: bool) -> None:
    if not documents:
        out.print(
            f"no decisions about person {person_id}: no journey has tried to reach them"
            + (" with that" if filtered else "")
            + " or turned them away at its entry"
        )
        return
    table = Table(title=f"decisions about person {person_id}, newest first")
    for column in ("when", "decision", "why", "rule", "journey", "channel", "action"):
        table.add_column(column)
    for d in documents:
        kind = enum_name(d.get("kind", ""), "DECISION_KIND_")
        colour = {"sent": "green", "deferred": "yellow", "awaiting_approval": "yellow", "not_entered": "yellow"}.get(
            kind, "red"
        )
        reason = d.get("reason", "")
        if d.get("rule") == HELD_FOR_PROFILE:
            # Not a decision yet: the arbiter waits for the profile to apply the person's latest event, and
            # decides when it has, or at `until` on the fields it knows (reason profile_unavailable).
            kind = "held"
            if d.get("until"):
                reason += f"; decided by {short_time(d['until'])} at the latest"
        elif d.get("until") and "until" not in reason:
            reason += f" (until {short_time(d['until'])})"
        if kind == "sent" and d.get("delivery"):
            # The arbiter let it through; what the channel's provider made of it is the send's own record.
            delivery = d["delivery"]
            kind = f"sent: {delivery}"
            if delivery not in ("accepted", PENDING_DELIVERY):
                colour = "red"
                reason = "; ".join(part for part in (reason, d.get("deliveryReason", "")) if part)
        table.add_row(
            short_time(d.get("decidedAt")),
            f"[{colour}]{kind}[/]",
            reason,
            d.get("rule", ""),
            d.get("journeyId", ""),
            d.get("channel", ""),
            d.get("actionId", ""),
        )
    out.print(table)


def show_inbox(person_id: str, documents: list[dict[str, Any]]) -> None:
    table = Table(title=f"inbox of person {person_id}")
    for column in ("message", "title", "body", "received", "read"):
        table.add_column(column)
    for m in documents:
        table.add_row(
            m["messageId"],
            m.get("title", ""),
            m.get("body", ""),
            short_time(m.get("createdAt")),
            short_time(m.get("readAt")),
        )
    out.print(table)
