"""Operator commands on the CRM connector: what it is connected to, how much API budget is left, its runs,
the records it wrote and the records a CRM refused.

    cdpctl crm status                        connections (state, dead letters held now, last error - marked
                                             past once the connection writes again -, last sync), budget
                                             left per account, the latest runs
    cdpctl crm runs [--connection C]         backfills, replays and each connection's continuous sync
    cdpctl crm backfill CONNECTION [--mapping M] [--bulk] [--wait]
    cdpctl crm dead-letters [--connection C] [--mapping M] [--reason R] [--replay [--wait]]
    cdpctl crm record PERSON                 where a person (PERSON_ID, or TYPE VALUE) stands in every mapping
    cdpctl crm record --crm-id CONNECTION OBJECT ID    one CRM record
    cdpctl crm validate FILE [--describe]    a connections document, every problem naming mapping and field

Every command takes --json (the API's messages as JSON on stdout; a refused call becomes
{"error": {"code", "message", "fields"}} on stdout, exit code 1) and --address (default: the connector
`cdpctl up` runs). A refused call names the field the service named. `backfill --wait` and
`dead-letters --replay --wait` show progress until the run ends and exit 1 when it failed; a replay with
no dead letter matching starts no run and says so. Dead letters show the CRM's reason and code, never its
message on the terminal (it may quote the refused value): --json carries it for whoever needs it.
Ids are shown whole, whatever the terminal's width (an id cut short cannot be used in the next command).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress
from rich.table import Table

from cdp.crm.v1 import crm_pb2 as pb
from cdp.crm.v1 import crm_pb2_grpc
from cdpctl.common import (
    PERSON_USAGE,
    all_pages,
    as_dict,
    call_service,
    console,
    emit,
    enum_name,
    out,
    resolve_person,
    service_options,
    short_time,
)
from cdpctl.platform import Workspace

PAGE = 500
DEAD_LETTER_REASONS = ("invalid_value", "unknown_field", "duplicate", "not_found", "permission", "rejected")


_options = service_options("crm")
_dict, _emit, _enum, _short, _pages = as_dict, emit, enum_name, short_time, all_pages


def _call(ws: Workspace, address: str | None, as_json: bool, work: Callable[[Any, tuple], Awaitable[Any]]) -> Any:
    return call_service(ws, "crm", crm_pb2_grpc.CrmServiceStub, address, as_json, work)


def _whole(table: Table, *headers: str) -> Table:
    """`table` with the columns named `headers` never shortened: ids, which the next command takes whole."""
    for column in table.columns:
        if column.header in headers:
            column.no_wrap = True
            column.min_width = max(
                len(line) for cell in [column.header, *column.cells] for line in str(cell).split("\n")
            )
    return table


def _run_connections(run: dict) -> str:
    """The connections a run covers: its one, or - a replay over several, which names none as its own -
    "(several): a, b"."""
    if run.get("connectionId"):
        return run["connectionId"]
    return "(several): " + ", ".join(run.get("connectionIds") or []) if run.get("connectionIds") else "(several)"


def _runs_table(runs: list[dict], title: str = "runs") -> Table:
    table = Table(title=title)
    # A run's dead-lettered count adds up what it dead-lettered over its life (a stream run: since it
    # started), fixed and replayed ones included; the dead letters held now are `crm status`'s and
    # `crm dead-letters`' own.
    for column in ("run", "kind", "state", "connection", "mapping", "progress", "written", "unchanged",
                   "dead-lettered\n(total)", "pending", "started", "finished"):  # fmt: skip
        table.add_column(column)
    for run in runs:
        total, processed = int(run.get("total", 0)), int(run.get("processed", 0))
        progress = f"{processed}/{total}" if total else str(processed)
        if int(run.get("absent", 0)):  # people gone since the count: processed + absent = total
            progress += f" ({run['absent']} absent)"
        written = int(run.get("created", 0)) + int(run.get("updated", 0))
        table.add_row(
            run.get("runId", ""),
            _enum(run.get("kind", ""), "RUN_KIND_"),
            _enum(run.get("state", ""), "RUN_STATE_"),
            _run_connections(run),
            run.get("mappingId", "") or "(all)",
            progress,
            str(written),
            run.get("unchanged", "0"),
            run.get("deadLettered", "0"),
            run.get("pendingRetry", "0"),
            _short(run.get("startedAt")),
            _short(run.get("finishedAt")),
        )
    return _whole(table, "run", "kind", "state", "connection", "mapping", "dead-lettered\n(total)")


@click.group()
def crm() -> None:
    """The CRM connector: connections, budgets, runs, record status, dead letters."""


@crm.command("status")
@click.option("--runs", "run_count", default=5, show_default=True, help="how many of the latest runs to show")
@_options
@click.pass_obj
def crm_status(ws: Workspace, run_count: int, as_json: bool, address) -> None:
    """Each connection's state, the API budget left per CRM account and the latest runs."""

    async def work(stub, md):
        connections = await stub.ListConnections(pb.ListConnectionsRequest(), metadata=md, timeout=10)
        budgets = await stub.GetBudget(pb.GetBudgetRequest(), metadata=md, timeout=10)
        runs = await stub.ListRuns(pb.ListRunsRequest(page_size=max(1, run_count)), metadata=md, timeout=10)
        held = {}
        for c in connections.connections:  # what `crm dead-letters` lists now, per connection
            letters = await _pages(
                lambda token, cid=c.id: stub.ListDeadLetters(
                    pb.ListDeadLettersRequest(connection_id=cid, page_size=PAGE, page_token=token),
                    metadata=md,
                    timeout=10,
                ),
                "dead_letters",
                0,
            )
            held[c.id] = len(letters)
        return connections.connections, budgets.budgets, runs.runs[:run_count], held

    connections, budgets, runs, held = _call(ws, address, as_json, work)
    document = {
        "connections": [_connection(c, held.get(c.id, 0)) for c in connections],
        "budgets": [_dict(b) for b in budgets],
        "runs": [_dict(r) for r in runs],
    }
    if as_json:
        _emit(document)
        return
    table = Table(title="crm connections")
    for column in ("connection", "kind", "account", "state", "mappings", "dead letters now", "last synced",
                   "last error"):  # fmt: skip
        table.add_column(column)
    for c in document["connections"]:
        state = _enum(c.get("state", ""), "CONNECTION_STATE_")
        colour = "green" if state == "active" else "yellow"
        error = " / ".join(x for x in (c.get("lastErrorReason"), c.get("lastErrorCode")) if x)
        if error and c.get("lastErrorAt"):
            error += f" at {_short(c['lastErrorAt'])}"
        if error and c.get("lastErrorPast"):
            error = f"[dim]past: {error}[/]"
        table.add_row(
            c["id"],
            _enum(c.get("kind", ""), "CRM_KIND_"),
            c.get("account", ""),
            f"[{colour}]{state}[/]",
            ", ".join(m["id"] for m in c.get("mappings", [])),
            str(c["deadLetters"]),
            _short(c.get("lastSyncedAt")),
            error,
        )
    out.print(_whole(table, "connection", "account", "dead letters now"))
    table = Table(title="API budget left")
    for column in ("account", "kind", "burst left", "daily used", "daily left", "blocked until"):
        table.add_column(column)
    for b in document["budgets"]:
        burst = (
            f"{b.get('burstRemaining', '0')} of {b['burstLimit']} / {b.get('burstWindowSeconds', 0):g} s"
            if int(b.get("burstLimit", 0))
            else "-"
        )
        daily_limit = int(b.get("dailyLimit", 0))
        daily = f"{b.get('dailyRemaining', '0')} of {daily_limit}" if daily_limit else "-"
        table.add_row(
            b.get("account", ""),
            _enum(b.get("kind", ""), "CRM_KIND_"),
            burst,
            b.get("dailyUsed", "0"),
            daily,
            _short(b.get("blockedUntil")),
        )
    out.print(_whole(table, "account"))
    out.print(_runs_table(document["runs"], "latest runs"))


def _connection(message, dead_letters: int) -> dict:
    """A connection as `crm status` shows it: with the dead letters held for it now (`deadLetters`), and its
    last error marked past (`lastErrorPast`) once the connection is active again - it wrote since."""
    connection = _dict(message)
    connection["deadLetters"] = dead_letters
    if connection.get("lastErrorReason") or connection.get("lastErrorCode"):
        connection["lastErrorPast"] = connection.get("state") == "CONNECTION_STATE_ACTIVE"
    return connection


@crm.command("runs")
@click.option("--connection", "connection_id", default="", help="only this connection's runs")
@click.option("--limit", default=20, show_default=True, help="at most this many, newest first (0: all)")
@_options
@click.pass_obj
def crm_runs(ws: Workspace, connection_id: str, limit: int, as_json: bool, address) -> None:
    """Backfills, replays and each connection's continuous sync, newest first."""

    async def work(stub, md):
        return await _pages(
            lambda token: stub.ListRuns(
                pb.ListRunsRequest(connection_id=connection_id, page_size=PAGE, page_token=token),
                metadata=md,
                timeout=10,
            ),
            "runs",
            limit,
        )

    documents = [_dict(r) for r in _call(ws, address, as_json, work)]
    if as_json:
        _emit(documents)
    else:
        out.print(_runs_table(documents))


async def _follow(stub, md, run, show: bool, what: str):
    """`run` read again until it ends, its progress on the terminal meanwhile (`show`); the run as it ended."""
    with Progress(console=console, disable=not show, transient=True) as progress:
        task = progress.add_task(f"{what} {run.run_id}", total=None)
        while run.state == pb.RUN_STATE_RUNNING:
            progress.update(task, completed=run.processed, total=run.total or None)
            await asyncio.sleep(0.5)
            run = await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=md, timeout=10)
    return run


@crm.command("backfill")
@click.argument("connection_id", metavar="CONNECTION")
@click.option(
    "--mapping", "mapping_id", default="", help="only this mapping (default: every mapping with the backfill trigger)"
)
@click.option("--bulk", is_flag=True, help="use the CRM's bulk path where it has one (Salesforce Bulk API 2.0)")
@click.option("--wait", is_flag=True, help="show progress until the run ends; exit 1 when it failed")
@_options
@click.pass_obj
def crm_backfill(ws: Workspace, connection_id: str, mapping_id: str, bulk: bool, wait: bool, as_json: bool, address):
    """Sync every person the connector follows through a connection's mappings now. A backfill already
    running for the same scope is returned rather than started twice."""
    show = wait and not as_json and sys.stderr.isatty()

    async def work(stub, md):
        run = await stub.StartBackfill(
            pb.StartBackfillRequest(connection_id=connection_id, mapping_id=mapping_id, bulk=bulk),
            metadata=md,
            timeout=30,
        )
        if not wait:
            return run
        return await _follow(stub, md, run, show, "backfill")

    run = _dict(_call(ws, address, as_json, work))
    state = _enum(run.get("state", ""), "RUN_STATE_")
    if as_json:
        _emit(run)
    else:
        out.print(_runs_table([run], "backfill"))
        if run.get("error"):
            out.print(f"[red]{run['error']}[/]")
    if wait and state in ("failed", "cancelled"):
        raise SystemExit(1)


@crm.command("dead-letters")
@click.option("--connection", "connection_id", default="", help="only this connection's")
@click.option("--mapping", "mapping_id", default="", help="only this mapping's")
@click.option("--reason", default="", type=click.Choice(("", *DEAD_LETTER_REASONS)), help="only this reason")
@click.option("--limit", default=100, show_default=True, help="at most this many, newest first (0: all)")
@click.option("--replay", is_flag=True, help="send every dead letter matching the filters again (after a fix)")
@click.option("--wait", is_flag=True, help="with --replay: show progress until the run ends; exit 1 when it failed")
@_options
@click.pass_obj
def crm_dead_letters(
    ws: Workspace, connection_id: str, mapping_id: str, reason: str, limit: int, replay: bool, wait: bool,
    as_json: bool, address,
) -> None:  # fmt: skip
    """Records a CRM refused, with its reason and the CRM's own code; --replay sends them again, re-projected
    from the person's current profile, as a replay run (none when nothing matches); --wait follows it to its
    outcome."""
    if wait and not replay:
        raise click.UsageError("--wait goes with --replay")
    if replay:
        show = wait and not as_json and sys.stderr.isatty()

        async def replay_work(stub, md):
            request = pb.ReplayDeadLettersRequest(connection_id=connection_id, mapping_id=mapping_id, reason=reason)
            answer = await stub.ReplayDeadLetters(request, metadata=md, timeout=30)
            if wait and answer.HasField("run"):
                answer.run.CopyFrom(await _follow(stub, md, answer.run, show, "replay"))
            return answer

        answer = _dict(_call(ws, address, as_json, replay_work))
        run = answer.get("run")
        if as_json:
            _emit(answer)
        elif not run:
            out.print("no dead letters to replay: no run started")
        else:
            if wait:
                out.print(f"replayed {answer.get('replayed', '0')} dead letter(s)")
            else:
                out.print(f"replaying {answer.get('replayed', '0')} dead letter(s)")
            out.print(_runs_table([run], "replay"))
            if run.get("error"):
                out.print(f"[red]{run['error']}[/]")
        if wait and run and _enum(run.get("state", ""), "RUN_STATE_") in ("failed", "cancelled"):
            raise SystemExit(1)
        return

    async def work(stub, md):
        return await _pages(
            lambda token: stub.ListDeadLetters(
                pb.ListDeadLettersRequest(
                    connection_id=connection_id, mapping_id=mapping_id, reason=reason, page_size=PAGE, page_token=token
                ),
                metadata=md,
                timeout=10,
            ),
            "dead_letters",
            limit,
        )

    documents = [_dict(d) for d in _call(ws, address, as_json, work)]
    if as_json:
        _emit(documents)
        return
    if not documents:
        out.print("no dead letters")
        return
    table = Table(title="dead letters")
    for column in ("record", "connection", "mapping", "person", "reason", "CRM code", "HTTP", "attempts", "failed"):
        table.add_column(column)
    for d in documents:
        table.add_row(
            d.get("id", ""),
            d.get("connectionId", ""),
            d.get("mappingId", ""),
            d.get("personId", ""),
            d.get("reason", ""),
            d.get("crmCode", ""),
            str(d.get("httpStatus", "")),
            str(d.get("attempts", "")),
            _short(d.get("failedAt")),
        )
    out.print(_whole(table, "record", "connection", "mapping", "person"))


@crm.command("record")
@click.argument("person", nargs=-1)
@click.option(
    "--crm-id", nargs=3, default=None, metavar="CONNECTION OBJECT ID", help="one CRM record by its CRM id instead"
)
@click.option("--identity-address", help="identity gRPC address, to resolve TYPE VALUE")
@_options
@click.pass_obj
def crm_record(ws: Workspace, person: tuple[str, ...], crm_id, identity_address, as_json: bool, address) -> None:
    """Where a person (PERSON_ID, or TYPE VALUE) stands in every mapping: synced, pending, dead-lettered,
    merged into another person's record (which one, and whether it stays in the CRM), erased."""
    if crm_id and person:
        raise click.UsageError("name a PERSON or --crm-id, not both")
    if crm_id:
        connection_id, obj, record_id = crm_id
        request = pb.GetRecordStatusRequest(
            crm_record=pb.CrmRecordRef(connection_id=connection_id, object=obj, crm_id=record_id)
        )
    else:
        if not person:
            raise click.UsageError(PERSON_USAGE)
        request = pb.GetRecordStatusRequest(person_id=asyncio.run(resolve_person(ws, identity_address, person)))

    async def work(stub, md):
        return await stub.GetRecordStatus(request, metadata=md, timeout=10)

    documents = [_dict(r) for r in _call(ws, address, as_json, work).records]
    if as_json:
        _emit(documents)
        return
    if not documents:
        out.print("no CRM record for this person yet")
        return
    table = Table(title="CRM records")
    for column in ("connection", "mapping", "object", "CRM id", "state", "synced", "reason"):
        table.add_column(column)
    for r in documents:
        reason = " / ".join(x for x in (r.get("reason"), r.get("crmCode")) if x)
        if r.get("mergedInto"):  # its person merged into another: the survivor's record took its place
            reason = f"into {r['mergedInto']}" + (" (kept in the CRM)" if r.get("kept") else "")
        table.add_row(
            r.get("connectionId", ""),
            r.get("mappingId", ""),
            r.get("object", ""),
            r.get("crmId", ""),
            _enum(r.get("state", ""), "RECORD_STATE_"),
            _short(r.get("syncedAt")),
            reason,
        )
    out.print(_whole(table, "connection", "mapping", "object", "CRM id"))


@crm.command("validate")
@click.argument("file")
@click.option("--describe", is_flag=True, help="also check objects and fields against each CRM's own schema")
@_options
@click.pass_obj
def crm_validate(ws: Workspace, file: str, describe: bool, as_json: bool, address) -> None:
    """Check a connections document (JSON, or YAML by its .yaml/.yml suffix; - reads stdin) without applying
    it: every problem, each naming the mapping and field. Exit 1 when there is one."""
    if file == "-":
        text = sys.stdin.read()
        document = (
            pb.ConnectionsDocument(json=text) if text.lstrip().startswith("{") else pb.ConnectionsDocument(yaml=text)
        )
    else:
        path = Path(file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {file}: {exc.strerror}", param_hint="FILE") from None
        yaml_form = path.suffix.lower() in (".yaml", ".yml")
        document = pb.ConnectionsDocument(yaml=text) if yaml_form else pb.ConnectionsDocument(json=text)

    async def work(stub, md):
        request = pb.ValidateConnectionsRequest(document=document, describe=describe)
        return await stub.ValidateConnections(request, metadata=md, timeout=60)

    problems = [_dict(p) for p in _call(ws, address, as_json, work).problems]
    if as_json:
        _emit({"problems": problems})
    elif not problems:
        out.print(f"{file}: no problems")
    else:
        for problem in problems:
            where = "/".join(x for x in (problem.get("mapping"), problem.get("field")) if x)
            out.print(f"[red]{where}[/]: {problem.get('message', '')}", highlight=False)
    if problems:
        raise SystemExit(1)
