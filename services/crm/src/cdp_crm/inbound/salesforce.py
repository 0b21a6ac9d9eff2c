"""Salesforce's changes: modified-since polling with SOQL on `SystemModstamp`.

Per object one query a poll - ``SELECT ... FROM <Object> WHERE SystemModstamp >= <cursor> ORDER BY
SystemModstamp, Id`` - followed through its ``nextRecordsUrl`` pages (Salesforce keeps the query's result
set, so a record edited while the pages are read is in the next poll, never skipped). The cursor
(`core.Keyset`: the last stamp and the ids read at it) moves after every chunk of a page the collector took,
so a kill in the middle of a 2,000-record page re-reads from the last chunk, not from the page's start.

Objects: Contact and Lead (the person: their fields, and traits or consent a mapping fills), Case (opened,
status changes, closed), Task (created by a user, its outcome when it completes), Opportunity (stage
changes, won, lost), CampaignMember (added, its status - the campaign engagement). A record's person is
its ContactId / WhoId / LeadId, read in one query per page for their Email and the CDP id field the
connection's mapping matches on.

Merges: a Salesforce user's merge of Contacts or Leads (the UI's, or the SOAP API's merge()) keeps the
master's Id and deletes each losing record with ``MasterRecordId`` set to the master's (the deletion moves
its ``SystemModstamp``; a read of its Id answers 404 ENTITY_IS_DELETED; an upsert by its external id value
creates a new record). So Contact and Lead are read with ``/queryAll`` and ``(IsDeleted = false OR
MasterRecordId != null)`` - the same one query a page, the losers of merges in it ("To find all records that
have been merged since a given point in time, use queryAll() with a SELECT statement", the merge() call's
guide) and no other deleted record. A loser read becomes the master's change naming it (`Change.merged`, its
record read by Id in one query for the page's merges unless the page holds it), which the poller follows
as it follows a HubSpot merge (news.py `_relink`).

Calls go through the outbound adapter's `read` (its token, renewed once on INVALID_SESSION_ID; a unit of
the account's shared budget each); 403 REQUEST_LIMIT_EXCEEDED is the day's allocation spent.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

from cdp_crm.adapters.salesforce import API_VERSION, SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import Connection
from cdp_crm.inbound.core import (
    POST_CHUNK,
    AdapterReader,
    Change,
    Keyset,
    Person,
    Posted,
    instant,
    person_id_field,
)

# object -> (what it is, the fields the event reports, the field naming its person, the watched field)
OBJECTS: dict[str, tuple[str, tuple[str, ...], str | None, str | None]] = {
    "Contact": ("contact", ("Email", "FirstName", "LastName", "Phone", "Title", "HasOptedOutOfEmail"), None, None),
    "Lead": ("lead", ("Email", "FirstName", "LastName", "Company", "Status"), None, "Status"),
    "Case": (
        "case",
        (
            "CaseNumber",
            "Subject",
            "Status",
            "Priority",
            "Origin",
            "Type",
            "Reason",
            "IsClosed",
            "CDP_Idempotency_Key__c",
        ),
        "ContactId",
        "Status",
    ),
    "Task": (
        "task",
        ("Subject", "Status", "Priority", "TaskSubtype", "IsClosed", "CDP_Idempotency_Key__c"),
        "WhoId",
        "Status",
    ),
    "Opportunity": (
        "deal",
        ("Name", "StageName", "Amount", "CloseDate", "IsClosed", "IsWon", "CDP_Idempotency_Key__c"),
        "ContactId",
        "StageName",
    ),
    "CampaignMember": ("campaign_member", ("CampaignId", "Status", "HasResponded"), "ContactId", "Status"),
}
PREFIXES = {"003": "Contact", "00Q": "Lead"}  # whose record an id is: a polymorphic WhoId names either
_BASE = f"/services/data/v{API_VERSION}"


class SalesforceReader(AdapterReader):
    kind = "salesforce"
    objects = tuple(OBJECTS)
    reads_back = True  # `pages(..., until=)`: the poller reads the overlap back (core.INBOUND_OVERLAP)
    adapter: SalesforceAdapter

    def __init__(
        self,
        connection: Connection,
        adapter: SalesforceAdapter,
        budget: SharedBudget,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(connection, adapter, budget, clock=clock)
        # The field holding the CDP person id on each person object (a WhoId names a Contact or a Lead).
        self.cdp_field = {
            target.lower(): field for target in PREFIXES.values() if (field := person_id_field(connection, target))
        }

    async def pages(
        self, obj: str, cursor: dict[str, Any] | None, until: str | None = None, posted: Posted | None = None
    ) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        """`until`, `posted`: a read-back's window (core.Poller._read_back) - rows stamped before `until`, those
        `posted` names (read and posted already) left out before their persons are looked up."""
        kind, reported, link, _ = OBJECTS[obj]
        keyset = Keyset.of(cursor)
        person_fields = (*self._person_fields(obj),) if kind in ("contact", "lead") else ()
        fields = dict.fromkeys(
            ["Id", "CreatedDate", "SystemModstamp", *reported, *((link,) if link else ()), *person_fields]
        )
        if obj == "CampaignMember":
            fields["LeadId"] = None
        fields.update(dict.fromkeys(self.mapped.get(obj.lower(), {})))
        mergeable = kind in ("contact", "lead")
        if mergeable:  # the losers of merges, deleted with MasterRecordId (module docstring)
            fields.update(dict.fromkeys(["IsDeleted", "MasterRecordId"]))
        # A read-back's window (core.Poller._read_back) ends before `until`.
        before = f" AND SystemModstamp < {_literal(until)}" if until is not None else ""
        merged = " AND (IsDeleted = false OR MasterRecordId != null)" if mergeable else ""
        soql = (
            f"SELECT {', '.join(fields)} FROM {obj} WHERE SystemModstamp >= {_literal(keyset.after)}{before}"
            f"{merged} ORDER BY SystemModstamp, Id"
        )
        resource = "/queryAll?" if mergeable else "/query?"
        answer = await self._get(resource + urllib.parse.urlencode({"q": soql}), f"query {obj}")
        while True:
            rows = answer.get("records", [])
            for start in range(0, len(rows), POST_CHUNK):
                chunk = rows[start : start + POST_CHUNK]
                pairs = [(r["Id"], r["SystemModstamp"]) for r in chunk]
                fresh = [chunk[i] for i in keyset.fresh(pairs)]
                if not fresh:
                    continue
                read = [(r["Id"], r["SystemModstamp"]) for r in fresh]
                keyset = keyset.advance(read)
                if posted is not None:
                    known = await posted(read)
                    fresh = [r for r, pair in zip(fresh, read, strict=True) if pair not in known]
                losers = [r for r in fresh if r.get("IsDeleted") and r.get("MasterRecordId")]
                live = [r for r in fresh if not r.get("IsDeleted")]
                masters = await self._masters(obj, list(fields), losers, live) if losers else []
                people = await self._people(obj, [*live, *masters]) if live or masters else {}
                changes = [self._change(obj, r, people) for r in [*live, *masters]]
                yield _merged_into(changes, losers), keyset.doc()
            following = answer.get("nextRecordsUrl")
            if answer.get("done", True) or not following:
                return
            answer = await self._get(following.removeprefix(_BASE), f"query {obj} (more)")

    async def _masters(
        self, obj: str, fields: list[str], losers: list[dict[str, Any]], live: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The records the page's merged-away rows were merged into that the page does not hold, read by Id
        in one query (a master deleted since is not found: its own deletion is the news then)."""
        held = {r["Id"] for r in live}
        wanted = sorted({str(r["MasterRecordId"]) for r in losers} - held)
        if not wanted:
            return []
        shown = [f for f in fields if f not in ("IsDeleted", "MasterRecordId")]
        soql = f"SELECT {', '.join(shown)} FROM {obj} WHERE Id IN ({', '.join(_quoted(i) for i in wanted)})"
        answer = await self._get("/query?" + urllib.parse.urlencode({"q": soql}), f"query {obj} (merged into)")
        return list(answer.get("records", []))

    def _person_fields(self, obj: str) -> tuple[str, ...]:
        field = self.cdp_field.get(obj.lower())
        return ("Email", field) if field else ("Email",)

    async def _get(self, path: str, what: str) -> dict[str, Any]:
        return self._json(await self.adapter.read(path, self.budget, self.clock, what=what), what)

    async def _people(self, obj: str, rows: list[dict[str, Any]]) -> dict[str, Person]:
        """The person each row is or names (by the person's Salesforce id)."""
        kind, _, link, _ = OBJECTS[obj]
        if kind in ("contact", "lead"):
            field = self.cdp_field.get(obj.lower())
            return {
                r["Id"]: Person(r["Id"], r.get("Email") or None, (r.get(field) if field else None) or None)
                for r in rows
            }
        ids = {str(r.get(name)) for r in rows for name in (link, "LeadId") if name and r.get(name)}
        people: dict[str, Person] = {}
        for prefix, target in PREFIXES.items():
            wanted = sorted(i for i in ids if i.startswith(prefix))
            if not wanted:
                continue
            fields = ", ".join(dict.fromkeys(["Id", *self._person_fields(target)]))
            quoted = ", ".join(_quoted(i) for i in wanted)
            soql = f"SELECT {fields} FROM {target} WHERE Id IN ({quoted})"
            answer = await self._get("/query?" + urllib.parse.urlencode({"q": soql}), f"query {target} (people)")
            field = self.cdp_field.get(target.lower())
            for r in answer.get("records", []):
                people[r["Id"]] = Person(r["Id"], r.get("Email") or None, (r.get(field) if field else None) or None)
        return people

    def _change(self, obj: str, row: dict[str, Any], people: dict[str, Person]) -> Change:
        kind, reported, link, watched = OBJECTS[obj]
        stamp = row["SystemModstamp"]
        created = instant(row.get("CreatedDate") or stamp) == instant(stamp)
        if kind in ("contact", "lead"):
            person = people.get(row["Id"])
        else:
            ref = row.get(link) if link else None
            person = people.get(str(ref)) if ref else None
            if person is None and row.get("LeadId"):
                person = people.get(str(row["LeadId"]))
        closed = won = None
        if kind in ("case", "task", "deal"):
            closed = bool(row.get("IsClosed"))
        if kind == "deal":
            won = bool(row.get("IsWon"))
        return Change(
            obj=obj,
            record_id=row["Id"],
            stamp=stamp,
            kind=kind,
            properties={k: row.get(k) for k in reported},
            created=created,
            watched=row.get(watched) if watched else None,
            closed=closed,
            won=won,
            own=bool(row.get("CDP_Idempotency_Key__c")) and created,
            person=person,
            record={k: v for k, v in row.items() if k != "attributes"},
        )


def _quoted(text: str) -> str:
    """A SOQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _merged_into(changes: list[Change], losers: list[dict[str, Any]]) -> list[Change]:
    """`changes` with each master naming the rows merged into it (`Change.merged`), in its change."""
    retired: dict[str, list[str]] = {}
    for row in losers:
        retired.setdefault(str(row["MasterRecordId"]), []).append(str(row["Id"]))
    if not retired:
        return changes
    return [dataclasses.replace(c, merged=tuple(sorted(retired[c.record_id]))) if c.record_id in retired else c
            for c in changes]  # fmt: skip


def _literal(stamp: str) -> str:
    """A SOQL datetime literal (unquoted, UTC)."""
    return instant(stamp).strftime("%Y-%m-%dT%H:%M:%S.") + f"{instant(stamp).microsecond // 1000:03d}Z"
