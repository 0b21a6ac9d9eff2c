"""`cdp.crm.v1.CrmService`: protobuf in, the connector's state out. No sync logic here.

Connections and their health come from the loaded document and this replica's deliveries; runs, record
states, dead letters and budgets from the store (so any replica answers for all). A stream run is the
sum of its partitions' documents. Bad requests are INVALID_ARGUMENT naming the field; an unknown
connection or run is NOT_FOUND.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp_crm.budgets import SharedBudget
from cdp_crm.connectors import unset
from cdp_crm.delivery import Deliverer
from cdp_crm.domain.mapping import Connection, MappingInvalid, ObjectMapping, load_connections
from cdp_crm.runs import Runs
from cdp_crm.state import DEAD_LETTERS, MERGED, PENDING, RECORDS, RUNS
from cdp_kit.auth import TokenAuthenticator
from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from cdp_kit.interceptors import current_caller
from cdp_kit.storage import Store
from cdp_kit.storage.port import check_key
from cdp_kit.timestamps import from_seconds

SCOPES = {
    "ListConnections": "crm:read",
    "GetConnection": "crm:read",
    "ValidateConnections": "crm:read",
    "StartBackfill": "crm:admin",
    "GetRun": "crm:read",
    "ListRuns": "crm:read",
    "GetRecordStatus": "crm:read",
    "ListDeadLetters": "crm:read",
    "ReplayDeadLetters": "crm:admin",
    "GetBudget": "crm:read",
}

KINDS = {
    "salesforce": crm_pb2.CRM_KIND_SALESFORCE,
    "hubspot": crm_pb2.CRM_KIND_HUBSPOT,
    "dynamics": crm_pb2.CRM_KIND_DYNAMICS,
    "zoho": crm_pb2.CRM_KIND_ZOHO,
}
MODES = {"upsert": crm_pb2.MODE_UPSERT, "update_only": crm_pb2.MODE_UPDATE_ONLY, "mirror": crm_pb2.MODE_MIRROR}
CONNECTION_STATES = {
    "active": crm_pb2.CONNECTION_STATE_ACTIVE,
    "auth_failed": crm_pb2.CONNECTION_STATE_AUTH_FAILED,
    "unavailable": crm_pb2.CONNECTION_STATE_UNAVAILABLE,
    "throttled": crm_pb2.CONNECTION_STATE_THROTTLED,
}
RUN_KINDS = {
    "backfill": crm_pb2.RUN_KIND_BACKFILL,
    "import": crm_pb2.RUN_KIND_BACKFILL,  # inbound.start: all - a backfill the other way, CRM to CDP
    "stream": crm_pb2.RUN_KIND_STREAM,
    "replay": crm_pb2.RUN_KIND_REPLAY,
}
RUN_STATES = {
    "running": crm_pb2.RUN_STATE_RUNNING,
    "succeeded": crm_pb2.RUN_STATE_SUCCEEDED,
    "succeeded_with_errors": crm_pb2.RUN_STATE_SUCCEEDED_WITH_ERRORS,
    "failed": crm_pb2.RUN_STATE_FAILED,
    "cancelled": crm_pb2.RUN_STATE_CANCELLED,
}
RECORD_STATES = {
    "synced": crm_pb2.RECORD_STATE_SYNCED,
    "pending": crm_pb2.RECORD_STATE_PENDING,
    "dead_lettered": crm_pb2.RECORD_STATE_DEAD_LETTERED,
    "out_of_scope": crm_pb2.RECORD_STATE_OUT_OF_SCOPE,
    "anonymised": crm_pb2.RECORD_STATE_ANONYMISED,
    "deleted": crm_pb2.RECORD_STATE_DELETED,
    "merged": crm_pb2.RECORD_STATE_MERGED,
}
PAGE_MAX = 1000
# The most queued changes a stream run's pending figure counts (the store's largest page; past it, this many).
QUEUED_COUNT_MAX = 10_000


def _ts(seconds: float | None):
    return from_seconds(seconds) if seconds else None


def _page(size: int, token: str) -> tuple[int, int]:
    if size < 0 or size > PAGE_MAX:
        raise InvalidArgument("page_size", f"must be 0 (default 100) to {PAGE_MAX}")
    try:
        offset = int(token) if token else 0
    except ValueError:
        raise InvalidArgument("page_token", "is not a token this service returned") from None
    if offset < 0:
        raise InvalidArgument("page_token", "is not a token this service returned")
    return size or 100, offset


def mapping_message(m: ObjectMapping) -> crm_pb2.Mapping:
    def spec(fm) -> str:
        return fm.source if fm.source is not None else f"value:{fm.value!r}"

    return crm_pb2.Mapping(
        id=m.id, object=m.object, mode=MODES[m.mode], triggers=sorted(m.triggers),
        match={fm.crm_field: spec(fm) for fm in m.match}, fields={fm.crm_field: spec(fm) for fm in m.fields},
        segment=m.segment or "", list=m.list or "", action=m.action or "", idempotency_field=m.idempotency_field or "",
    )  # fmt: skip


def run_message(run_id: str, doc: Mapping[str, Any]) -> crm_pb2.SyncRun:
    run = crm_pb2.SyncRun(
        run_id=run_id, kind=RUN_KINDS.get(doc["kind"], 0), state=RUN_STATES.get(doc["state"], 0),
        connection_id=doc["connection"], mapping_id=doc.get("mapping", ""), total=doc.get("total", 0),
        processed=doc.get("processed", 0), created=doc.get("created", 0), updated=doc.get("updated", 0),
        unchanged=doc.get("unchanged", 0), skipped=doc.get("skipped", 0), dead_lettered=doc.get("dead_lettered", 0),
        pending_retry=doc.get("pending_retry", 0), api_units=doc.get("api_units", 0), error=doc.get("error", ""),
        absent=doc.get("absent", 0),
        # A replay over several connections is kept under none (runs.replay) and names them.
        connection_ids=doc.get("connections") or ([doc["connection"]] if doc["connection"] else []),
    )  # fmt: skip
    if doc.get("started_at"):
        run.started_at.CopyFrom(from_seconds(doc["started_at"]))
    if doc.get("finished_at"):
        run.finished_at.CopyFrom(from_seconds(doc["finished_at"]))
    return run


def dead_letter_message(doc: Mapping[str, Any]) -> crm_pb2.DeadLetter:
    letter = crm_pb2.DeadLetter(
        id=doc["record"], connection_id=doc["connection"], mapping_id=doc["mapping"].partition("/")[2],
        person_id=doc.get("person_id", ""), reason=doc["reason"], crm_code=doc["crm_code"],
        crm_message=doc["crm_message"], http_status=doc["http_status"], attempts=doc.get("attempts", 1),
    )  # fmt: skip
    letter.failed_at.CopyFrom(from_seconds(doc["failed_at"]))
    return letter


class CrmApi(crm_pb2_grpc.CrmServiceServicer):
    def __init__(
        self,
        *,
        store: Store,
        connections: tuple[Connection, ...],
        deliverer: Deliverer,
        budgets: Mapping[str, SharedBudget],
        runs: Runs,
        describe=None,
        clock=time.time,
        unstarted: Mapping[str, tuple[str, ...]] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.connections = {c.id: c for c in connections}
        # Connections not started, with the names of their unset credential variables (never a value).
        self.unstarted = dict(unstarted or {})
        self.environ = os.environ if environ is None else environ  # where ValidateConnections checks variables
        self.deliverer = deliverer
        self.budgets = budgets  # by connection id
        self.runs = runs
        self.describe = describe  # async (connections) -> schemas, for ValidateConnections(describe=true)
        self.clock = clock

    # --- connections --------------------------------------------------------------------------------

    def _connection(self, connection_id: str, *, started: bool = False) -> Connection:
        if not connection_id:
            raise InvalidArgument("connection_id", "is required")
        connection = self.connections.get(connection_id)
        if connection is None:
            raise NotFound(f"no connection {connection_id!r}; ListConnections names them")
        if started and connection_id in self.unstarted:
            variables = ", ".join(self.unstarted[connection_id])
            raise FailedPrecondition(f"connection {connection_id!r} is not started: {variables} not set")
        return connection

    def _connection_message(self, c: Connection) -> crm_pb2.Connection:
        message = crm_pb2.Connection(
            id=c.id, kind=KINDS[c.kind], account=c.account, url=c.url or "", credentials=dict(c.credentials),
            mappings=[mapping_message(m) for m in c.mappings],
        )  # fmt: skip
        health = self.deliverer.health.get(c.id)
        if c.id in self.unstarted:
            message.state = crm_pb2.CONNECTION_STATE_AUTH_FAILED
            message.last_error_reason = "credentials_not_set"
            message.last_error_code = ",".join(self.unstarted[c.id])  # the variables' names, never values
        elif health is not None:
            message.state = CONNECTION_STATES.get(health.state, crm_pb2.CONNECTION_STATE_ACTIVE)
            message.last_error_reason = health.last_error_reason
            message.last_error_code = health.last_error_code
            if health.last_error_at:
                message.last_error_at.CopyFrom(from_seconds(health.last_error_at))
            if health.last_synced_at:
                message.last_synced_at.CopyFrom(from_seconds(health.last_synced_at))
        return message

    async def ListConnections(self, request, context):
        return crm_pb2.ListConnectionsResponse(
            connections=[self._connection_message(c) for c in self.connections.values()]
        )

    async def GetConnection(self, request, context):
        return self._connection_message(self._connection(request.connection_id))

    async def ValidateConnections(self, request, context):
        form = request.document.WhichOneof("form")
        if form is None:
            raise InvalidArgument("document", "give the document as json or yaml")
        text = getattr(request.document, form)
        if request.describe:
            # Describing spends the account's API budget (a request per object the document names): the
            # admin's to spend, as a backfill is, not any reader's.
            TokenAuthenticator.authorize(current_caller(), "crm:admin", "ValidateConnections with describe")
        problems: list[crm_pb2.Problem] = []
        try:
            connections = load_connections(text, form=form)
            unset_variables = [p for c in connections for p in unset(c, self.environ)]
            if unset_variables:  # where the connector runs: a connection missing one would not start
                raise MappingInvalid(unset_variables)
            if request.describe and self.describe is not None:
                load_connections(text, await self.describe(connections), form=form)
        except MappingInvalid as invalid:
            problems = [crm_pb2.Problem(mapping=p.mapping, field=p.field, message=p.message) for p in invalid.problems]
        return crm_pb2.ValidateConnectionsResponse(problems=problems)

    # --- runs ---------------------------------------------------------------------------------------

    async def StartBackfill(self, request, context):
        self._connection(request.connection_id, started=True)
        run_id, doc = await self.runs.start_backfill(request.connection_id, request.mapping_id, bulk=request.bulk)
        return run_message(run_id, doc)

    async def GetRun(self, request, context):
        if not request.run_id:
            raise InvalidArgument("run_id", "is required")
        if request.run_id.startswith("stream-"):
            connection = request.run_id.removeprefix("stream-")
            self._connection(connection)
            return await self._stream_run(connection)
        # A run id the store cannot hold (over 1,024 characters, a NUL) was refused by the store naming its
        # own `key`, not the request's field.
        check_key(RUNS, request.run_id, field="run_id")
        record = await self.store.get(RUNS, request.run_id)
        if record is None:
            raise NotFound(f"no run {request.run_id!r}")
        return run_message(record.key, record.doc)

    async def _stream_run(self, connection: str) -> crm_pb2.SyncRun:
        total: dict[str, Any] = {"kind": "stream", "state": "running", "connection": connection, "started_at": 0.0}
        for record in await self.store.find(RUNS, "connection", connection, limit=PAGE_MAX):
            doc = record.doc
            if doc["kind"] != "stream":
                continue
            for name, value in doc.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    total[name] = total.get(name, 0) + value
            started = doc.get("started_at", 0.0)
            total["started_at"] = min(total["started_at"] or started, started)
        # Pending is what is queued for the CRM now (crm_pending), not the partitions' counters: those add
        # one every time a change is queued again, and never go down when a queued change is written, so
        # they showed changes pending when none were, and could not show a change gone missing either.
        total["pending_retry"] = len(await self.store.find(PENDING, "connection", connection, limit=QUEUED_COUNT_MAX))
        return run_message(f"stream-{connection}", total)

    async def ListRuns(self, request, context):
        size, offset = _page(request.page_size, request.page_token)
        connections = [request.connection_id] if request.connection_id else list(self.connections)
        if request.connection_id:
            self._connection(request.connection_id)
        runs = [await self._stream_run(c) for c in connections]
        others = []
        for connection in connections:
            for record in await self.store.find(RUNS, "connection", connection, limit=PAGE_MAX):
                if record.doc["kind"] != "stream":
                    others.append(run_message(record.key, record.doc))
        # A replay over several connections is kept under none (runs.replay): listed under each connection
        # it replays to, and once when no connection is asked for.
        for record in await self.store.find(RUNS, "connection", "", limit=PAGE_MAX):
            if record.doc["kind"] != "stream" and (
                not request.connection_id or request.connection_id in record.doc.get("connections", ())
            ):
                others.append(run_message(record.key, record.doc))
        others.sort(key=lambda r: r.started_at.ToNanoseconds(), reverse=True)
        runs = [*others, *runs]
        page = runs[offset : offset + size]
        token = str(offset + size) if offset + size < len(runs) else ""
        return crm_pb2.ListRunsResponse(runs=page, next_page_token=token)

    # --- records ------------------------------------------------------------------------------------

    async def GetRecordStatus(self, request, context):
        subject = request.WhichOneof("subject")
        if subject == "person_id":
            if not request.person_id:
                raise InvalidArgument("person_id", "is required")
            records = await self.store.find(RECORDS, "person_id", request.person_id, limit=PAGE_MAX)
        elif subject == "crm_record":
            ref = request.crm_record
            self._connection(ref.connection_id)
            if not ref.crm_id:
                raise InvalidArgument("crm_record.crm_id", "is required")
            records = [
                r
                for r in await self.store.find(RECORDS, "crm_id", ref.crm_id, limit=PAGE_MAX)
                if r.doc["connection"] == ref.connection_id and (not ref.object or r.doc["object"] == ref.object)
            ]
        else:
            raise InvalidArgument("subject", "give a person_id or a crm_record")
        return crm_pb2.GetRecordStatusResponse(records=[self._status(r.key, r.doc) for r in records])

    def _status(self, key: str, doc: Mapping[str, Any]) -> crm_pb2.RecordStatus:
        status = crm_pb2.RecordStatus(
            connection_id=doc["connection"], mapping_id=doc["mapping"], object=doc["object"], record_key=key,
            crm_id=doc.get("crm_id") or "", person_id=doc.get("person_id", ""),
            state=RECORD_STATES.get(doc["state"], 0), synced_stamp=doc.get("synced_stamp", 0),
            reason=doc.get("reason", ""), crm_code=doc.get("crm_code", ""),
            merged_into=doc.get("merged_into", "") if doc["state"] == MERGED else "",
            kept=bool(doc.get("kept")) if doc["state"] == MERGED else False,
        )  # fmt: skip
        if doc.get("synced_at"):
            status.synced_at.CopyFrom(from_seconds(doc["synced_at"]))
        return status

    async def ListDeadLetters(self, request, context):
        size, offset = _page(request.page_size, request.page_token)
        if request.connection_id:
            self._connection(request.connection_id)
            letters = [
                r.doc for r in await self.store.find(DEAD_LETTERS, "connection", request.connection_id, limit=10_000)
            ]
        else:
            letters = [r.doc async for r in self.store.scan_all(DEAD_LETTERS)]
        letters = [
            d for d in letters
            if (not request.mapping_id or d["mapping"].partition("/")[2] == request.mapping_id)
            and (not request.reason or d["reason"] == request.reason)
        ]  # fmt: skip
        letters.sort(key=lambda d: d["failed_at"], reverse=True)
        page = letters[offset : offset + size]
        token = str(offset + size) if offset + size < len(letters) else ""
        return crm_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letter_message(d) for d in page], next_page_token=token
        )

    async def ReplayDeadLetters(self, request, context):
        if request.connection_id:
            self._connection(request.connection_id)
        if request.mapping_id and not request.connection_id:
            raise InvalidArgument("connection_id", "is required with mapping_id")
        run_id, doc, replayed = await self.runs.replay(
            list(request.ids), request.connection_id, request.mapping_id, request.reason
        )
        if run_id is None or doc is None:  # nothing to replay: no run started
            return crm_pb2.ReplayDeadLettersResponse(replayed=0)
        return crm_pb2.ReplayDeadLettersResponse(run=run_message(run_id, doc), replayed=replayed)

    # --- budgets ------------------------------------------------------------------------------------

    async def GetBudget(self, request, context):
        accounts: dict[str, SharedBudget] = {}
        kinds: dict[str, str] = defaultdict(str)
        for connection_id, budget in self.budgets.items():
            accounts.setdefault(budget.account, budget)
            kinds[budget.account] = self.connections[connection_id].kind
        if request.account and request.account not in accounts:
            raise NotFound(f"no connection uses account {request.account!r}")
        budgets = []
        for account, budget in accounts.items():
            if request.account and account != request.account:
                continue
            s = await budget.status(self.clock())
            message = crm_pb2.Budget(
                account=account, kind=KINDS[kinds[account]], burst_limit=s["burst_limit"] or 0,
                burst_window_seconds=s["burst_window_seconds"] or 0.0, burst_remaining=s["burst_remaining"] or 0,
                daily_limit=s["daily_limit"] or 0, daily_used=s["daily_used"], daily_remaining=s["daily_remaining"] or 0,
            )  # fmt: skip
            if s["blocked_until"]:
                message.blocked_until.CopyFrom(from_seconds(s["blocked_until"]))
            budgets.append(message)
        return crm_pb2.GetBudgetResponse(budgets=budgets)
