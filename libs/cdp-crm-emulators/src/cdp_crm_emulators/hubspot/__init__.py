"""A local HubSpot: private-app tokens, CRM v3 objects, lists v3, the burst and daily limits, signed webhooks.

Objects: contacts (unique ``email``), companies (unique ``domain``), deals, tickets and tasks; every object also has
the unique properties ``cdp_id`` and ``cdp_idempotency_key`` so a sync can upsert any of them by its own key.
A create, update or batch upsert that would give a second record one unique value (two contacts with one email)
is refused as HubSpot does: 409, category ``CONFLICT``, "Contact already exists. Existing ID: <id>" (a batch
as a whole). ``DELETE /crm/v3/objects/<object>/<id>`` archives one record (204).
A property outside an object's schema fails the request with ``VALIDATION_ERROR`` / ``PROPERTY_DOESNT_EXIST``,
as HubSpot does; records rejected one by one (an invalid email, a fault-injected rejection) come back in the
``errors`` of a 207 while the rest of the batch is written.

Limits - every authenticated API request that is let in counts, stamped when it arrives, whatever it
then gets: an answer, a 5xx, a timeout, a dropped connection (injected faults happen inside HubSpot, after
it counted the request, as they would there); a request refused for a limit changes nothing and is not
counted again:
- `burst_limit` requests per rolling `burst_window` seconds (190 / 10 s): 429 ``TEN_SECONDLY_ROLLING``;
- `daily_limit` requests per UTC day: 429 ``DAILY``.
- `search_per_second` CRM object searches (``/crm/v3/objects/<object>/search``) per second (5): 429 ``SECONDLY``.
Every answer carries the ``X-HubSpot-RateLimit-*`` headers. ``over_budget`` (`budget()`) counts the
requests that arrived over a limit: a client that keeps to the limits never has one.

Associations: a single create may carry ``associations`` (``to.id`` + ``types``), and
``PUT /crm/v4/objects/<from>/<id>/associations/default/<to>/<id>`` links two records; a task or ticket is
tied to its contact this way. ``GET /crm/v4/objects/<from>/<id>/associations/<to>`` lists them.

Reads for customers' scripts (hubspot-api-client's ``get_page`` / ``get_all`` and the properties API):
``GET /crm/v3/objects/<object>`` pages through records by an id cursor (``limit`` at most 100, default 10),
``GET /crm/v3/properties/<object>`` lists the properties the portal knows (`pages`), ``POST /crm/v3/lists/search``
finds lists by name (`lists`).

Inbound: `user_update` / `user_create` edit records as a HubSpot user would (a unique value another record
holds raises `Conflict`, carrying the API's 409 body; ``POST /_emulator/user/<object>`` answers it) and, with
`webhook_url` set (at start, or by the developer API's ``PUT /webhooks/v3/<app id>/settings?hapikey=`` as an
app's settings are), POST the change events there signed with ``X-HubSpot-Signature-v3`` (base64
HMAC-SHA256 over method, URL, body and ``X-HubSpot-Request-Timestamp`` with the app's `client_secret`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

from cdp_crm_emulators._server import Emulator
from cdp_crm_emulators.hubspot.inbound import Conflict, InboundMixin
from cdp_crm_emulators.hubspot.limits import LimitsMixin
from cdp_crm_emulators.hubspot.lists import ListsMixin
from cdp_crm_emulators.hubspot.objects import BATCH_LIMIT, SEARCH_PAGE_LIMIT, ObjectsMixin
from cdp_crm_emulators.hubspot.pages import PAGE_LIMIT, PagesMixin
from cdp_crm_emulators.hubspot.schema import PROPERTIES

__all__ = ["BATCH_LIMIT", "PAGE_LIMIT", "SEARCH_PAGE_LIMIT", "Conflict", "HubSpotEmulator"]


class HubSpotEmulator(LimitsMixin, InboundMixin, ObjectsMixin, PagesMixin, ListsMixin, Emulator):
    """The emulator: its state and routes are here; the limits, the user's side, objects, the list page
    and properties read, and lists are each a mixin of their own module."""

    name = "hubspot"

    def __init__(
        self,
        *,
        tokens: set[str] | None = None,
        portal_id: int = 62515,
        burst_limit: int = 190,
        burst_window: float = 10.0,
        daily_limit: int = 1_000_000,
        search_per_second: int = 5,
        webhook_url: str | None = None,
        client_secret: str = "hubspot-app-secret",
        developer_api_key: str = "local-developer-key",
        merge_new_ids: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tokens = tokens if tokens is not None else {"pat-local-hubspot"}
        self.portal_id = portal_id
        self.burst_limit = burst_limit
        self.burst_window = burst_window
        self.daily_limit = daily_limit
        self.search_per_second = search_per_second
        self.webhook_url = webhook_url
        self.client_secret = client_secret
        self.developer_api_key = developer_api_key
        # A merge of contacts or companies makes a new record with a new id, both ids retired (HubSpot's
        # behaviour since its changelog "Updated merge functionality for contacts and companies": the
        # default); False: the primary keeps its id (HubSpot's before, and still for deals and tickets).
        self.merge_new_ids = merge_new_ids
        self.objects: dict[str, dict[str, dict[str, Any]]] = {obj: {} for obj in PROPERTIES}
        self._index: dict[tuple[str, str], dict[str, str]] = {}
        self.lists: dict[str, dict[str, Any]] = {}
        self.memberships: dict[str, dict[str, str]] = {}
        self.webhook_deliveries = 0
        self.webhook_settings: dict[str, Any] = {}
        self.webhook_statuses: list[int] = []  # what the target answered each delivery attempt
        self._ids = itertools.count(1001)
        self._burst: deque[float] = deque()
        self._searches: deque[float] = deque()
        self.links: dict[tuple[str, str], dict[tuple[str, str], list[dict[str, Any]]]] = {}
        self._day = -1
        self._daily_used = 0
        self._over_budget = 0
        self._event_ids = itertools.count(1)
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        # (object, id) merged away -> the surviving record's id (objects.merge_records).
        self.retired: dict[tuple[str, str], str] = {}
        # Search index lag (objects.index_late): seconds for each coming write, and per (object, id) a write
        # not indexed yet - when it will be, and the record as the index holds it until then.
        self._index_lag: list[float] = []
        self._unindexed: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        r = self.app.router
        r.add_post("/crm/v3/objects/{object}/batch/upsert", self._batch_upsert)
        r.add_post("/crm/v3/objects/{object}/batch/read", self._batch_read)
        r.add_post("/crm/v3/objects/{object}/batch/archive", self._batch_archive)
        r.add_post("/crm/v3/objects/{object}/search", self._search)
        r.add_post("/crm/v3/objects/{object}/merge", self._merge)
        r.add_post("/crm/v3/objects/{object}", self._create)
        r.add_get("/crm/v3/objects/{object}", self._list_page)
        r.add_get("/crm/v3/objects/{object}/{id}", self._read_one)
        r.add_get("/crm/v3/properties/{object}", self._properties_read)
        r.add_patch("/crm/v3/objects/{object}/{id}", self._update)
        r.add_delete("/crm/v3/objects/{object}/{id}", self._archive_one)
        r.add_put("/crm/v4/objects/{object}/{id}/associations/default/{to_object}/{to_id}", self._associate_default)
        r.add_get("/crm/v4/objects/{object}/{id}/associations/{to_object}", self._list_associations)
        r.add_post("/crm/v3/lists", self._create_list)
        r.add_post("/crm/v3/lists/", self._create_list)
        r.add_post("/crm/v3/lists/search", self._search_lists)
        r.add_get("/crm/v3/lists/{list_id}", self._get_list)
        r.add_put("/crm/v3/lists/{list_id}/memberships/add", self._add_members)
        r.add_put("/crm/v3/lists/{list_id}/memberships/remove", self._remove_members)
        r.add_put("/crm/v3/lists/{list_id}/memberships/add-and-remove", self._add_and_remove)
        r.add_get("/crm/v3/lists/{list_id}/memberships", self._get_members)
        r.add_put("/webhooks/v3/{app_id}/settings", self._webhook_settings)
        r.add_post("/_emulator/user/{object}", self._inspect_user_create)
        r.add_get("/_emulator/webhooks", self._inspect_webhooks)
        r.add_get("/webhooks/v3/{app_id}/settings", self._webhook_settings)
        # Outermost: the limits see every request before an injected fault does (`_limits`).
        self.app.middlewares.insert(0, self._limits)

    # --- inspection ------------------------------------------------------------------------------

    def records(self, obj: str) -> list[dict[str, Any]]:
        return [self._public(obj, record) for record in self.objects.get(obj, {}).values()]

    def find(self, obj: str, prop: str, value: str) -> dict[str, Any] | None:
        record_id = self._lookup(obj, prop, value)
        return None if record_id is None else self._public(obj, self.objects[obj][record_id])

    def associations(self, obj: str, record_id: str) -> list[tuple[str, str]]:
        """(object, id) of every record linked to this one."""
        return list(self.links.get((obj, record_id), {}))

    def members(self, list_id: str) -> list[str]:
        return list(self.memberships.get(list_id, {}))

    def budget(self) -> dict[str, Any]:
        now = self.clock()
        self._roll(now)
        return {
            "burst_limit": self.burst_limit,
            "burst_window_seconds": self.burst_window,
            "burst_used": len(self._burst),
            "daily_limit": self.daily_limit,
            "daily_used": self._daily_used,
            "over_budget": self._over_budget,
        }

    def state(self) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "lists": self.lists,
            "memberships": self.memberships,
            "next_id": next(self._ids),
            "retired": [[obj, rid, survivor] for (obj, rid), survivor in self.retired.items()],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.lists = state.get("lists", {})
        self.memberships = state.get("memberships", {})
        self._ids = itertools.count(state.get("next_id", 1001))
        self.retired = {(obj, rid): survivor for obj, rid, survivor in state.get("retired", [])}
        for obj, rid, target, tid, types in state.get("links", []):
            self.links.setdefault((obj, rid), {})[(target, tid)] = types
        for obj, table in state.get("objects", {}).items():
            for record in table.values():
                self._store(obj, record)
