"""The HubSpot user's side: records created and edited as in HubSpot's UI (`user_create`, `user_update`, and
``POST /_emulator/user/<object>`` from another process), the signed webhook deliveries they cause, and the
developer API's webhook settings that point them at a target URL.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from cdp_crm_emulators._server import iso_z, json_response
from cdp_crm_emulators.hubspot.answers import error_body, read_json
from cdp_crm_emulators.hubspot.schema import SINGULAR
from cdp_crm_emulators.hubspot.webhooks import webhook_signature_v3


class Conflict(Exception):
    """What HubSpot answers a user who would give a second record one unique value (a second contact with one
    email, made or edited in its UI): 409 with `body` (category ``CONFLICT``, "Contact already exists.
    Existing ID: <id>"), as its API refuses the same write."""

    status = 409

    def __init__(self, body: dict[str, Any], existing: str) -> None:
        super().__init__(body["message"])
        self.body = body
        self.existing = existing


class InboundMixin:
    """Edits by a HubSpot user and the webhooks they send. The state it reads is `HubSpotEmulator`'s (set in its ``__init__``)."""

    def user_create(
        self, obj: str, properties: dict[str, Any], links: list[tuple[str, str, list]] | None = None
    ) -> dict[str, Any]:
        """A record made by a user (HubSpot's UI), linked to `links` ((object, id, types) each) before its
        webhook goes out, as a ticket opened from a contact's page is. A unique value another record holds
        (a contact's email) raises `Conflict`: nothing is made."""
        self._refuse_held(obj, properties, None)
        record = self._write(obj, None, properties, source="CRM_UI")
        for target, target_id, types in links or []:
            self._link(obj, record["id"], target, target_id, types)
        self._emit(obj, record, "creation", properties)
        return self._public(obj, record)

    def user_update(self, obj: str, record_id: str, properties: dict[str, Any]) -> dict[str, Any]:
        """A user's edit of a record; a unique value another record holds raises `Conflict`: nothing changes."""
        self._refuse_held(obj, properties, record_id)
        record = self._write(obj, record_id, properties, source="CRM_UI")
        self._emit(obj, record, "propertyChange", properties)
        return self._public(obj, record)

    def user_merge(self, obj: str, primary: str, other: str) -> dict[str, Any]:
        """A user's merge in HubSpot's UI: `other` merged into `primary` (`merge_records`: `other`'s id retired,
        resolving to `primary`), and its ``<object>.merge`` webhook (``primaryObjectId``, ``mergedObjectIds``,
        ``newObjectId``, ``numberOfPropertiesMoved``, as HubSpot's webhooks API sends it). Returns the
        survivor."""
        if primary == other or primary not in self.objects[obj] or other not in self.objects[obj]:
            raise KeyError(f"cannot merge {other} into {primary}")
        before = dict(self.objects[obj][primary]["properties"])
        record = self.merge_records(obj, primary, other)
        moved = sum(1 for k, v in record["properties"].items() if before.get(k) != v) - 2  # less the stamps
        self._emit(
            obj,
            record,
            "merge",
            {},
            merge={
                "primaryObjectId": int(primary),
                "mergedObjectIds": [int(other)],
                "newObjectId": int(primary),
                "numberOfPropertiesMoved": max(moved, 0),
            },
        )
        return self._public(obj, record)

    def _refuse_held(self, obj: str, properties: dict[str, Any], record_id: str | None) -> None:
        if (holder := self._held_elsewhere(obj, properties, record_id)) is not None:
            body = error_body("CONFLICT", f"{SINGULAR[obj].capitalize()} already exists. Existing ID: {holder}")
            raise Conflict(body, holder)

    async def drain_webhooks(self) -> None:
        while self._webhook_tasks:
            await asyncio.gather(*list(self._webhook_tasks), return_exceptions=True)

    def _emit(
        self,
        obj: str,
        record: dict[str, Any],
        change: str,
        properties: dict[str, Any],
        merge: dict[str, Any] | None = None,
    ) -> None:
        if self.webhook_url is None:
            return
        now_ms = int(self.clock() * 1000)
        base = {
            "subscriptionId": 1,
            "portalId": self.portal_id,
            "appId": 1,
            "occurredAt": now_ms,
            "attemptNumber": 0,
            "objectId": int(record["id"]),
            "changeSource": "CRM_UI",
        }
        subscription = f"{SINGULAR[obj]}.{change}"
        if change == "creation":
            events = [{**base, "eventId": next(self._event_ids), "subscriptionType": subscription}]
        elif merge is not None:
            events = [{**base, "eventId": next(self._event_ids), "subscriptionType": subscription, **merge}]
        else:
            events = [
                {
                    **base,
                    "eventId": next(self._event_ids),
                    "subscriptionType": subscription,
                    "propertyName": k,
                    "propertyValue": v,
                }
                for k, v in properties.items()
            ]
        task = asyncio.get_running_loop().create_task(self._deliver(events))
        self._webhook_tasks.add(task)
        task.add_done_callback(self._webhook_tasks.discard)

    async def _deliver(self, events: list[dict[str, Any]]) -> None:
        assert self.webhook_url is not None
        body = orjson.dumps(events)
        timestamp = str(int(time.time() * 1000))
        headers = {
            "Content-Type": "application/json",
            "X-HubSpot-Request-Timestamp": timestamp,
            "X-HubSpot-Signature-v3": webhook_signature_v3(
                self.client_secret, "POST", self.webhook_url, body, timestamp
            ),
            "X-HubSpot-Signature-Version": "v3",
        }
        async with aiohttp.ClientSession() as session:
            for attempt in range(3):
                try:
                    async with session.post(self.webhook_url, data=body, headers=headers) as response:
                        self.webhook_statuses.append(response.status)
                        if response.status < 500:
                            self.webhook_deliveries += 1
                            return
                except aiohttp.ClientError:
                    pass  # HubSpot retries deliveries; so do we, briefly
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _inspect_user_create(self, request: web.Request) -> web.Response:
        """``POST /_emulator/user/<object>`` ``{"properties": {...}, "associations": [...]}`` (the API create's
        body): `user_create` from another process (a support agent opening a ticket in HubSpot's UI),
        webhooks included."""
        obj = self._object(request)
        body = await read_json(request)
        properties = body.get("properties") or {}
        if (rejected := self._unknown_properties(obj, properties)) is not None:
            return rejected
        links = self._association_targets(body)
        if isinstance(links, web.Response):
            return links
        try:
            return json_response(self.user_create(obj, properties, links), status=201)
        except Conflict as refused:
            return json_response(refused.body, status=refused.status)

    async def _inspect_webhooks(self, request: web.Request) -> web.Response:
        return json_response({"target_url": self.webhook_url, "statuses": self.webhook_statuses})

    async def _webhook_settings(self, request: web.Request) -> web.Response:
        """``PUT /webhooks/v3/<app id>/settings?hapikey=<developer API key>`` with ``{"targetUrl",
        "throttling"}`` points the app's webhooks at `targetUrl` (what `webhook_url` does at start); GET
        reads them (404 before any)."""
        if request.query.get("hapikey") != self.developer_api_key:
            return json_response(
                error_body("INVALID_AUTHENTICATION", "The developer API key is not valid."), status=401
            )
        now = iso_z(self.clock())
        if request.method == "PUT":
            body = await read_json(request)
            target = body.get("targetUrl")
            if not isinstance(target, str) or not target.startswith(("http://", "https://")):
                return json_response(error_body("VALIDATION_ERROR", "targetUrl must be an http(s) URL"), status=400)
            self.webhook_url = target
            self.webhook_settings = {"targetUrl": target, "throttling": body.get("throttling") or {},
                                     "createdAt": self.webhook_settings.get("createdAt", now), "updatedAt": now}  # fmt: skip
        if not self.webhook_settings:
            return json_response(error_body("NOT_FOUND", "No webhook settings for this app."), status=404)
        return json_response(self.webhook_settings)
