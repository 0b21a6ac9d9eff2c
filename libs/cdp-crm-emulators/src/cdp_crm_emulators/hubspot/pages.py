"""The reads customers' own scripts make with hubspot-api-client and the connector does not: the object list
page (``basic_api.get_page``, which ``get_all`` pages through) and the properties read
(``crm.properties.core_api.get_all``). Both are API requests like any other: the limits middleware counts
them against the burst and daily limits before they get here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cdp_crm_emulators._server import iso_z, json_response
from cdp_crm_emulators.hubspot.answers import error_body
from cdp_crm_emulators.hubspot.schema import DEFAULT_PROPERTIES, PROPERTIES, definitions, object_named

PAGE_LIMIT = 100  # the most a list page holds, as HubSpot documents it; 10 when not asked
DEFAULT_PAGE = 10


def asked_properties(request: web.Request) -> list[str] | None:
    """The ``properties`` a read asks for: the client repeats the parameter (``properties=a&properties=b``),
    a hand-written URL joins them with commas; HubSpot takes both. None when none is asked for."""
    names = [n.strip() for value in request.query.getall("properties", []) for n in value.split(",")]
    return [n for n in names if n] or None


class PagesMixin:
    """The list page and the properties read. The state it reads is `HubSpotEmulator`'s."""

    async def _list_page(self, request: web.Request) -> web.Response:
        """``GET /crm/v3/objects/<object>?limit=&after=&properties=&archived=``: records in id order,
        ``limit`` (1-100, default 10) of them from the cursor ``after``, and ``paging.next`` (``after``
        and a ``link`` to that page) while more are left. The cursor is the id of the next record, not a
        position: a record archived or created between two pages neither repeats nor skips another.
        Without ``properties`` the object's default properties come back, as HubSpot's do.
        ``archived=true`` lists archived records: the portal keeps none (an archive removes the record),
        so that page is empty."""
        obj = self._object(request)
        try:
            limit = int(request.query.get("limit", DEFAULT_PAGE))
            after = int(request.query.get("after") or 0)
        except ValueError:
            return json_response(error_body("VALIDATION_ERROR", "limit and after must be integers"), status=400)
        if not 1 <= limit <= PAGE_LIMIT:
            return json_response(
                error_body("VALIDATION_ERROR", f"limit must be between 1 and {PAGE_LIMIT}: {limit}"), status=400
            )
        wanted = asked_properties(request) or list(DEFAULT_PROPERTIES[obj])
        wanted = [name for name in wanted if name in PROPERTIES[obj]]  # HubSpot leaves out names it lacks
        if request.query.get("archived", "false").lower() == "true":
            return json_response({"results": []})
        ids = sorted(int(i) for i in self.objects[obj] if int(i) >= after)
        page = ids[: limit + 1]
        answer: dict[str, Any] = {
            "results": [self._public(obj, self.objects[obj][str(i)], wanted) for i in page[:limit]],
        }
        if len(page) > limit:
            cursor = str(page[limit])
            link = request.url.with_query({**request.query, "after": cursor})
            answer["paging"] = {"next": {"after": cursor, "link": str(link)}}
        return json_response(answer)

    async def _properties_read(self, request: web.Request) -> web.Response:
        """``GET /crm/v3/properties/<object>`` (a name or a type id, ``0-1``): the properties the portal
        knows for it, ``{"results": [...]}``; an object it lacks answers as the objects API does (404,
        ``Unable to infer object type``)."""
        obj = object_named(request.match_info["object"])
        if obj is None:
            self._object(request)  # raises the objects API's answer for an unknown object
        if request.query.get("archived", "false").lower() == "true":
            return json_response({"results": []})
        return json_response({"results": definitions(obj, iso_z(0))})
