"""Dynamics 365 / Dataverse changes: change tracking on the Web API.

The first read of an entity set asks ``Prefer: odata.track-changes, odata.maxpagesize=100`` and follows
``@odata.nextLink`` to the last page, whose ``@odata.deltaLink`` is the cursor; every later read GETs that
delta link and gets each record changed since once, at its latest version (and a ``$deletedEntity`` for
each deletion), paged the same way, the next delta link on its last page.

The cursor moves only when a delta has been read to its end: a crash in the middle of a delta reads it again
from the same link. Each change's event id derives from the record id and its ``versionnumber`` (a deletion:
the word "deleted"), so what was posted already is posted again under the same ids and the collector keeps
it once.

Entity sets: contacts (the person; traits and consent a mapping fills), incidents (cases: opened,
resolved or cancelled), tasks (created by a user, completed), opportunities (stage changes, won, lost).
``statecode`` as Dataverse uses it: 0 open or active; 1 resolved, completed, won; 2 cancelled, lost. A
record's person is its contact lookup (``_customerid_value``, ``_regardingobjectid_value``,
``_parentcontactid_value``), read once per page for ``emailaddress1`` and the CDP id field the connection's
mapping matches on.

A delta link Dataverse no longer knows (ExpiredVersionStamp 0x80044352: older than the organisation keeps
change tracking) would fail every read after it: the table is read afresh instead, with a new change-tracking
read, and of its records those modified since the last delta was read (`read_at`, less `RENEW_MARGIN`) are
posted - a change posted before has the same event id, so the collector keeps it once. The same filter
serves `inbound.start: now` (the cursor's `after`): a new connection's first read only takes the delta link.

Changes committed late: a row's ``versionnumber`` is SQL Server's rowversion, stamped when the write is made
(a database-wide counter), not when its transaction commits, and a delta link starts after the highest
version stamped when it was issued. Dataverse does not document that a delta from it lists a row written
before it and committed after (a plug-in's or a bulk job's transaction, up to the platform's two-minute
request limit), and a rowversion cursor would not: so, as the other three readers do, the poller reads each
settled window back (core.Poller._read_back) - ``$filter=modifiedon ge <after> and modifiedon lt <until>``
ordered by ``modifiedon`` and the primary id, 100 rows a page, the window's progress a keyset on
(``modifiedon``, id) - and posts what it finds that the forward read did not (the memo holds the record's
``versionnumber``: one posted already, at that version, is dropped before its contact is read). Where a
window starts: the forward cursor's ``after``, when the last delta read began. A deletion committed late
cannot be read back (a deleted row is not listed).

Merges: a Dynamics user's merge (the Merge action: a subordinate contact merged into a target) deactivates
the subordinate, sets its ``merged`` and its ``masterid`` lookup (``_masterid_value``) to the target, and
updates the target: both are in the next delta. The subordinate's row becomes the target's change naming it
(`Change.merged`; the target read by id when the delta does not hold it), which the poller follows as it
follows a HubSpot merge (news.py `_relink`); the subordinate itself posts nothing (it is not deleted, and
its values are the merged-away contact's).

Calls go through the outbound adapter's `read` (its Entra ID token, renewed once on a 401; a unit of the
account's shared budget each; 429 with Retry-After is Dataverse's service protection).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import Connection
from cdp_crm.inbound.core import (
    AdapterReader,
    Change,
    CrmReadFailed,
    Keyset,
    Person,
    Posted,
    instant,
    person_id_field,
)

log = logging.getLogger("cdp.crm.inbound")

PAGE = 100
# Dataverse's ExpiredVersionStamp: "Version stamp associated with the client has expired. Please perform a
# full sync." - a change-tracking token older than the organisation keeps (ExpireChangeTrackingInDays).
EXPIRED_VERSION_STAMP = "0x80044352"
RENEW_MARGIN = 600.0  # seconds before the last delta read that a fresh read after an expiry still posts
# entity set -> (what it is, the attributes the event reports, the lookups naming its contact, watched)
OBJECTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str | None]] = {
    "contacts": (
        "contact",
        ("firstname", "lastname", "emailaddress1", "telephone1", "mobilephone", "jobtitle", "donotbulkemail"),
        (),
        None,
    ),
    "incidents": (
        "case",
        ("title", "ticketnumber", "prioritycode", "caseorigincode", "statecode", "statuscode", "cdp_idempotencykey"),
        # Dataverse names a polymorphic lookup's value after the attribute (_customerid_value); the local
        # Dataverse after the navigation property it was bound through (_customerid_contact_value).
        ("_customerid_value", "_customerid_contact_value"),
        "statecode",
    ),
    "tasks": (
        "task",
        ("subject", "prioritycode", "scheduledend", "statecode", "statuscode", "cdp_idempotencykey"),
        ("_regardingobjectid_value", "_regardingobjectid_contact_value"),
        "statecode",
    ),
    "opportunities": (
        "deal",
        ("name", "stepname", "salesstage", "estimatedvalue", "actualvalue", "statecode", "cdp_idempotencykey"),
        ("_parentcontactid_value", "_customerid_value", "_customerid_contact_value"),
        "stepname",
    ),
}
LOOKUP_TYPE = "@Microsoft.Dynamics.CRM.lookuplogicalname"


class DynamicsReader(AdapterReader):
    kind = "dynamics"
    objects = tuple(OBJECTS)
    reads_back = True  # `pages(..., until=)`: the poller reads the overlap back (core.INBOUND_OVERLAP)
    adapter: DynamicsAdapter

    def __init__(
        self,
        connection: Connection,
        adapter: DynamicsAdapter,
        budget: SharedBudget,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(connection, adapter, budget, clock=clock)
        self.cdp_field = person_id_field(connection, "contacts")
        self.prefer = f'odata.track-changes,odata.maxpagesize={PAGE},odata.include-annotations="{LOOKUP_TYPE[1:]}"'
        self.prefer_window = f'odata.maxpagesize={PAGE},odata.include-annotations="{LOOKUP_TYPE[1:]}"'

    async def pages(
        self, obj: str, cursor: dict[str, Any] | None, until: str | None = None, posted: Posted | None = None
    ) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        """`until`, `posted`: a read-back's window (core.Poller._read_back, `_window`)."""
        if until is not None:
            async for page in self._window(obj, cursor, until, posted):
                yield page
            return
        cursor = cursor or {}
        url = cursor.get("delta") or obj
        # A fresh read returns every record: with `after` (inbound.start: now, or a delta link expired)
        # only those modified since are news.
        since = instant(cursor["after"]) if cursor.get("after") and not cursor.get("delta") else None
        started = _iso(self.clock())
        renewed = False
        while True:
            try:
                answer = await self._get(url, obj)
            except DeltaExpired:
                if renewed or not cursor.get("delta"):
                    raise
                # Dataverse no longer knows the link's version (older than the organisation keeps change
                # tracking, or the table's tracking was reset): read afresh, keeping what changed since the
                # last delta was read (less a margin; a change posted again has the same event id and the
                # collector drops it). A deletion within the gap cannot be seen any more.
                renewed, url = True, obj
                read_at = cursor.get("read_at")
                since = instant(read_at) - dt.timedelta(seconds=RENEW_MARGIN) if read_at else None
                log.warning(
                    "dynamics change tracking expired; reading the table afresh",
                    extra={"connection": self.connection.id, "object": obj, "crm_code": EXPIRED_VERSION_STAMP},
                )
                continue
            rows = answer.get("value", [])
            if since is not None:
                rows = [
                    r for r in rows if "reason" in r or not r.get("modifiedon") or instant(r["modifiedon"]) >= since
                ]
            rows, losers = await self._merges(obj, rows)
            people = await self._people(obj, rows)
            changes = _merged_into(obj, [self._change(obj, row, people) for row in rows], losers)
            delta = answer.get("@odata.deltaLink")
            following = answer.get("@odata.nextLink")
            if delta is not None or following is None:
                # The delta read to its end: from now on, what changed after it. `after`: where the settled
                # window read back may reach (what was stamped before this read began).
                yield changes, ({"delta": delta, "read_at": started, "after": started} if delta else cursor)
                return
            # The middle of a delta: read again from its start after a crash (a fresh read from its `after`).
            yield changes, ({"after": _iso(since.timestamp())} if since is not None else cursor)
            url = following

    async def _window(
        self, obj: str, cursor: dict[str, Any] | None, until: str, posted: Posted | None
    ) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        """The rows modified from the keyset `cursor` to before `until`, as they are now (module docstring);
        those `posted` names (id and versionnumber: read and posted already) left out before their contacts
        are looked up."""
        keyset = Keyset.of(cursor)
        primary = _PRIMARY.get(obj, "opportunityid")
        query = urllib.parse.urlencode({
            "$filter": f"modifiedon ge {_iso(instant(keyset.after).timestamp())} and modifiedon lt {until}",
            "$orderby": f"modifiedon asc,{primary} asc",
        })  # fmt: skip
        url: str | None = f"{obj}?{query}"
        while url is not None:
            answer = await self.adapter.read(
                url, self.budget, self.clock, headers={"Prefer": self.prefer_window}, what=obj
            )
            page = self._json(answer, obj)
            rows = page.get("value", [])
            fresh = [rows[i] for i in keyset.fresh([(str(r[primary]), str(r["modifiedon"])) for r in rows])]
            if fresh:
                keyset = keyset.advance([(str(r[primary]), str(r["modifiedon"])) for r in fresh])
                if posted is not None:
                    known = await posted([(str(r[primary]), str(r.get("versionnumber"))) for r in fresh])
                    fresh = [r for r in fresh if (str(r[primary]), str(r.get("versionnumber"))) not in known]
                fresh, losers = await self._merges(obj, fresh)
                people = await self._people(obj, fresh) if fresh else {}
                yield _merged_into(obj, [self._change(obj, r, people) for r in fresh], losers), keyset.doc()
            url = page.get("@odata.nextLink")

    async def _merges(self, obj: str, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A page's rows with its merged subordinates replaced by the targets they were merged into (module
        docstring), and the subordinates' rows."""
        losers = [r for r in rows if r.get("merged") is True and r.get("_masterid_value") and "reason" not in r]
        if not losers:
            return rows, []
        kept = [r for r in rows if r not in losers]
        return kept + await self._masters(obj, losers, kept), losers

    async def _masters(
        self, obj: str, losers: list[dict[str, Any]], rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The targets the page's merged subordinates were merged into that the page does not hold, each read
        by id (merges are rare; a target deleted since is left out: its deletion is the news then)."""
        primary = _PRIMARY.get(obj, "opportunityid")
        held = {str(r.get(primary)) for r in rows}
        found = []
        for master in sorted({str(r["_masterid_value"]) for r in losers} - held):
            try:
                found.append(await self._get(f"{obj}({master})", obj))
            except CrmReadFailed:
                continue
        return found

    async def _get(self, url: str, what: str) -> dict[str, Any]:
        answer = await self.adapter.read(url, self.budget, self.clock, headers={"Prefer": self.prefer}, what=what)
        if answer.error is not None and answer.error.code == EXPIRED_VERSION_STAMP:
            raise DeltaExpired(f"dynamics {what}: change tracking token expired {answer.error.code}")
        return self._json(answer, what)

    async def _people(self, obj: str, rows: list[dict[str, Any]]) -> dict[str, Person]:
        kind, _, lookups, _ = OBJECTS[obj]
        if kind == "contact":
            return {str(r["contactid"]): self._person(r) for r in rows if "contactid" in r and "reason" not in r}
        ids = {i for r in rows if (i := _contact_of(r, lookups))}
        people: dict[str, Person] = {}
        select = ",".join(["emailaddress1", *([self.cdp_field] if self.cdp_field else [])])
        for contact_id in sorted(ids):
            try:
                row = await self._get(f"contacts({contact_id})?$select={select}", "contacts")
            except CrmReadFailed:
                continue  # deleted since, or not readable: the change still goes, without the person's email
            people[contact_id] = self._person({**row, "contactid": contact_id})
        return people

    def _person(self, row: dict[str, Any]) -> Person:
        cdp_id = row.get(self.cdp_field) if self.cdp_field else None
        return Person(str(row["contactid"]), row.get("emailaddress1") or None, cdp_id or None)

    def _change(self, obj: str, row: dict[str, Any], people: dict[str, Person]) -> Change:
        kind, reported, lookups, watched_field = OBJECTS[obj]
        if "reason" in row and str(row.get("@odata.context", "")).endswith("$deletedEntity"):
            record_id = str(row["id"])
            person = people.get(record_id) if kind == "contact" else None
            return Change(obj, record_id, "deleted", kind, {}, deleted=True, person=person)
        primary = _PRIMARY.get(obj, "opportunityid")
        record_id = str(row[primary])
        state = row.get("statecode")
        watched = row.get(watched_field) if watched_field else None
        closed = won = None
        if kind in ("case", "task"):
            closed = state not in (None, 0) if kind == "case" else state == 1
        if kind == "deal":
            closed, won = state in (1, 2), state == 1
            watched = {1: "won", 2: "lost"}.get(state, watched)  # closing a deal is its last stage change
        created = bool(row.get("createdon") and row.get("modifiedon")) and (
            instant(row["createdon"]) == instant(row["modifiedon"])
        )
        contact = record_id if kind == "contact" else _contact_of(row, lookups)
        return Change(
            obj=obj,
            record_id=record_id,
            stamp=str(row.get("versionnumber") or row.get("modifiedon")),
            kind=kind,
            properties={k: row.get(k) for k in reported},
            created=created,
            watched=watched,
            closed=closed,
            won=won,
            own=bool(row.get("cdp_idempotencykey")) and created,
            person=people.get(contact) if contact else None,
            record=row,
            at=row.get("modifiedon"),
        )


_PRIMARY = {"contacts": "contactid", "incidents": "incidentid", "tasks": "activityid"}


def _merged_into(obj: str, changes: list[Change], losers: list[dict[str, Any]]) -> list[Change]:
    """`changes` with each merge target naming the subordinates merged into it (`Change.merged`)."""
    retired: dict[str, list[str]] = {}
    for row in losers:
        retired.setdefault(str(row["_masterid_value"]), []).append(str(row[_PRIMARY.get(obj, "opportunityid")]))
    if not retired:
        return changes
    return [dataclasses.replace(c, merged=tuple(sorted(retired[c.record_id]))) if c.record_id in retired else c
            for c in changes]  # fmt: skip


class DeltaExpired(CrmReadFailed):
    """Dataverse refused the delta link as expired (EXPIRED_VERSION_STAMP)."""


def _iso(seconds: float) -> str:
    at = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def _contact_of(row: dict[str, Any], lookups: tuple[str, ...]) -> str | None:
    for name in lookups:
        value = row.get(name)
        if value and row.get(name + LOOKUP_TYPE, "contact") == "contact":
            return str(value)
    return None
