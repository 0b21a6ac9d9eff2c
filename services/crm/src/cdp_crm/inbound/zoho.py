"""Zoho CRM v8 changes: modified-since polling on the records listing.

Per module one listing a poll - ``GET /crm/v8/<Module>?fields=...&sort_by=Modified_Time&sort_order=asc``
with ``If-Modified-Since`` one second before the cursor's stamp (Zoho's times have whole seconds and it
lists what changed after the header's time: the second itself is asked again, and the ids read at it are
skipped, `core.Keyset`) - continued with ``page_token`` while ``info.more_records``. A 304 or 204 means
nothing changed. The cursor moves after every hundred records the collector took. A write committed late (a
workflow's field update) carries a Modified_Time the cursor may have passed: the poller reads each settled
window back (core.Poller._read_back; the listing has no upper bound, so it is read up to the first record
past the window).

Modules: Contacts (the person; traits and consent a mapping fills), Cases (opened, status changes,
closed), Tasks (created by a user, completed), Deals (stage changes, won, lost). A record's person is its
contact lookup (Related_To, Who_Id, Contact_Name), read once per page with ``ids`` for Email and the CDP
id field the connection's mapping matches on.

Calls go through the outbound adapter's `read` (its OAuth token, refreshed once on a 401; a unit of the
account's shared budget each); 429 LIMIT_REACHED is the day's credits spent.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

from cdp_crm.adapters.zoho import ZohoAdapter
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

PAGE = 200
# module -> (what it is, the fields the event reports, the lookup naming its contact, the watched field)
OBJECTS: dict[str, tuple[str, tuple[str, ...], str | None, str | None]] = {
    "Contacts": (
        "contact",
        ("Email", "First_Name", "Last_Name", "Phone", "Mobile", "Title", "Email_Opt_Out"),
        None,
        None,
    ),
    "Cases": ("case", ("Subject", "Status", "Priority", "Case_Origin", "CDP_Idempotency_Key"), "Related_To", "Status"),
    "Tasks": ("task", ("Subject", "Status", "Priority", "Due_Date", "CDP_Idempotency_Key"), "Who_Id", "Status"),
    "Deals": ("deal", ("Deal_Name", "Stage", "Amount", "Closing_Date", "CDP_Idempotency_Key"), "Contact_Name", "Stage"),
}


class ZohoReader(AdapterReader):
    kind = "zoho"
    objects = tuple(OBJECTS)
    reads_back = True  # `pages(..., until=)`: the poller reads the overlap back (core.INBOUND_OVERLAP)
    adapter: ZohoAdapter

    def __init__(
        self,
        connection: Connection,
        adapter: ZohoAdapter,
        budget: SharedBudget,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(connection, adapter, budget, clock=clock)
        self.cdp_field = person_id_field(connection, "contacts")

    async def pages(
        self, obj: str, cursor: dict[str, Any] | None, until: str | None = None, posted: Posted | None = None
    ) -> AsyncIterator[tuple[list[Change], dict[str, Any]]]:
        """`until`, `posted`: a read-back's window (core.Poller._read_back) - the listing (which has no upper
        bound) read only up to the first record modified at `until` or later, those `posted` names (read
        and posted already) left out before their contacts are looked up."""
        kind, reported, link, _ = OBJECTS[obj]
        end = instant(until) if until is not None else None
        keyset = Keyset.of(cursor)
        fields = dict.fromkeys(["Created_Time", "Modified_Time", *reported, *((link,) if link else ())])
        if kind == "contact" and self.cdp_field:
            fields[self.cdp_field] = None
        fields.update(dict.fromkeys(self.mapped.get(obj.lower(), {})))
        query = {
            "fields": ",".join(fields),
            "sort_by": "Modified_Time",
            "sort_order": "asc",
            "per_page": str(PAGE),
        }
        since = instant(keyset.after) - dt.timedelta(seconds=1)
        headers = {"If-Modified-Since": since.strftime("%Y-%m-%dT%H:%M:%S+00:00")}
        answer = await self._get(f"/{obj}?{urllib.parse.urlencode(query)}", headers, obj)
        while answer is not None:
            rows = answer.get("data", [])
            ended = False
            if end is not None:  # sorted by Modified_Time: the window ends at the first row past it
                within = [r for r in rows if instant(r["Modified_Time"]) < end]
                ended = len(within) < len(rows)
                rows = within
            fresh = [rows[i] for i in keyset.fresh([(str(r["id"]), r["Modified_Time"]) for r in rows])]
            for start in range(0, len(fresh), POST_CHUNK):
                chunk = fresh[start : start + POST_CHUNK]
                read = [(str(r["id"]), r["Modified_Time"]) for r in chunk]
                keyset = keyset.advance(read)
                if posted is not None:
                    known = await posted(read)
                    chunk = [r for r, pair in zip(chunk, read, strict=True) if pair not in known]
                people = await self._people(obj, chunk) if chunk else {}
                yield [self._change(obj, r, people) for r in chunk], keyset.doc()
            if ended:
                return
            info = answer.get("info") or {}
            token = info.get("next_page_token")
            if not info.get("more_records") or not token:
                return
            following = {**query, "page_token": token}
            answer = await self._get(f"/{obj}?{urllib.parse.urlencode(following)}", headers, obj)

    async def _get(self, path: str, headers: dict[str, str], what: str) -> dict[str, Any] | None:
        """The listing's answer; None when nothing changed (304) or nothing is there (204)."""
        answer = await self.adapter.read(path, self.budget, self.clock, headers=headers, what=what)
        if answer.error is None and answer.status in (204, 304):
            return None
        return self._json(answer, what)

    async def _people(self, obj: str, rows: list[dict[str, Any]]) -> dict[str, Person]:
        kind, _, link, _ = OBJECTS[obj]
        if kind == "contact":
            return {str(r["id"]): self._person(r) for r in rows}
        ids = sorted({i for r in rows if (i := _lookup_id(r.get(link) if link else None))})
        if not ids:
            return {}
        fields = ",".join(["Email", *([self.cdp_field] if self.cdp_field else [])])
        people: dict[str, Person] = {}
        for start in range(0, len(ids), 100):  # `ids` takes at most 100
            query = urllib.parse.urlencode({"ids": ",".join(ids[start : start + 100]), "fields": fields})
            answer = await self._get(f"/Contacts?{query}", {}, "Contacts")
            for r in (answer or {}).get("data", []):
                people[str(r["id"])] = self._person(r)
        return people

    def _person(self, row: dict[str, Any]) -> Person:
        cdp_id = row.get(self.cdp_field) if self.cdp_field else None
        return Person(str(row["id"]), row.get("Email") or None, cdp_id or None)

    def _change(self, obj: str, row: dict[str, Any], people: dict[str, Person]) -> Change:
        kind, reported, link, watched_field = OBJECTS[obj]
        record_id = str(row["id"])
        stamp = row["Modified_Time"]
        created = instant(row.get("Created_Time") or stamp) == instant(stamp)
        status = str(row.get(watched_field) or "") if watched_field else ""
        closed = won = None
        if kind == "case":
            closed = status.lower() == "closed"
        elif kind == "task":
            closed = status.lower() == "completed"
        elif kind == "deal":
            closed, won = status.lower().startswith("closed"), status.lower() == "closed won"
        contact = record_id if kind == "contact" else _lookup_id(row.get(link) if link else None)
        return Change(
            obj=obj,
            record_id=record_id,
            stamp=stamp,
            kind=kind,
            properties={k: row.get(k) for k in reported},
            created=created,
            watched=row.get(watched_field) if watched_field else None,
            closed=closed,
            won=won,
            own=bool(row.get("CDP_Idempotency_Key")) and created,
            person=people.get(contact) if contact else None,
            record=row,
        )


def _lookup_id(value: Any) -> str | None:
    """A lookup field's record id: Zoho answers ``{"id": ..., "name": ...}``."""
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None
