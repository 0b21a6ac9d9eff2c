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

Calls use the outbound adapter's Entra ID token (renewed once on a 401) and are reserved from the account's
shared budget; 429 with Retry-After is Dataverse's service protection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from cdp_crm.adapters.dynamics import API, DynamicsAdapter
from cdp_crm.adapters.http import Answer, exchange, transport_error
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import PERSON_ID, Connection
from cdp_crm.inbound.core import Change, CrmReadFailed, Person, backwards, instant

PAGE = 100
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


class DynamicsReader:
    kind = "dynamics"
    objects = tuple(OBJECTS)

    def __init__(
        self,
        connection: Connection,
        adapter: DynamicsAdapter,
        budget: SharedBudget,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
    ) -> None:
        self.connection = connection
        self.adapter = adapter
        self.budget = budget
        self.clock = clock
        self.timeout = timeout
        self.base = adapter._url  # the environment URL the adapter writes to
        self.mapped = backwards(connection)
        self.cdp_field = next(
            (
                fm.crm_field
                for m in connection.mappings
                if m.object.lower() == "contacts" and m.kind == "record"
                for fm in m.match
                if fm.source == PERSON_ID
            ),
            None,
        )
        self.prefer = f'odata.track-changes,odata.maxpagesize={PAGE},odata.include-annotations="{LOOKUP_TYPE[1:]}"'

    async def pages(
        self, obj: str, cursor: dict[str, Any] | None
    ) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        url = cursor["delta"] if cursor else f"{self.base}{API}/{obj}"
        while True:
            answer = await self._get(url, obj)
            rows = answer.get("value", [])
            people = await self._people(obj, rows)
            changes = [self._change(obj, row, people) for row in rows]
            delta = answer.get("@odata.deltaLink")
            following = answer.get("@odata.nextLink")
            if delta is not None or following is None:
                # The delta read to its end: from now on, what changed after it.
                yield changes, ({"delta": delta} if delta else (cursor or {}))
                return
            yield changes, (cursor or {})  # the middle of a delta: read it again from its start after a crash
            url = following

    async def _get(self, url: str, what: str) -> dict[str, Any]:
        for attempt in (0, 1):
            if self.adapter._token is None and (failed := await self.adapter._authenticate()) is not None:
                raise CrmReadFailed(f"dynamics token: {failed.code}")
            token = self.adapter._token
            await self.budget.acquire(1, self.clock)
            answer: Answer = await exchange(
                self.adapter._session,
                "GET",
                url,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Prefer": self.prefer,
                    "OData-Version": "4.0",
                    "OData-MaxVersion": "4.0",
                    "Accept": "application/json",
                },
                timeout=self.timeout,
                what=what,
            )
            await self.budget.observe(answer.headers, self.clock())
            if answer.status == 401 and attempt == 0:
                if (failed := await self.adapter._authenticate(stale=token)) is not None:
                    raise CrmReadFailed(f"dynamics token: {failed.code}")
                continue
            error = transport_error(answer)
            if error is not None:
                if answer.status == 429:
                    await self.budget.throttled(self.clock(), retry_after=error.retry_after, daily=False)
                raise CrmReadFailed(f"dynamics {what} failed: {error.reason} {error.code}")
            if answer.status >= 400 or not isinstance(answer.body, dict):
                code = (answer.body.get("error") or {}).get("code") if isinstance(answer.body, dict) else None
                raise CrmReadFailed(f"dynamics {what} answered {answer.status} {code or ''}".strip())
            return answer.body
        raise AssertionError("unreachable")

    async def _people(self, obj: str, rows: list[dict[str, Any]]) -> dict[str, Person]:
        kind, _, lookups, _ = OBJECTS[obj]
        if kind == "contact":
            return {str(r["contactid"]): self._person(r) for r in rows if "contactid" in r and "reason" not in r}
        ids = {i for r in rows if (i := _contact_of(r, lookups))}
        people: dict[str, Person] = {}
        select = ",".join(["emailaddress1", *([self.cdp_field] if self.cdp_field else [])])
        for contact_id in sorted(ids):
            try:
                row = await self._get(f"{self.base}{API}/contacts({contact_id})?$select={select}", "contacts")
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
        primary = {"contacts": "contactid", "incidents": "incidentid", "tasks": "activityid"}.get(obj, "opportunityid")
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


def _contact_of(row: dict[str, Any], lookups: tuple[str, ...]) -> str | None:
    for name in lookups:
        value = row.get(name)
        if value and row.get(name + LOOKUP_TYPE, "contact") == "contact":
            return str(value)
    return None
