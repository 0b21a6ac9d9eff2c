"""HubSpot's answer bodies for errors (one request's, and one record's in a batch), and reading a request's
JSON body as HubSpot does (400 ``VALIDATION_ERROR`` for invalid JSON).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from cdp_crm_emulators._server import new_id


def error_body(category: str, message: str) -> dict[str, Any]:
    return {"status": "error", "message": message, "correlationId": new_id(), "category": category}


def record_error_body(category: str, message: str, ids: list[str]) -> dict[str, Any]:
    return {
        "status": "error",
        "category": category,
        "message": message,
        "context": {"ids": ids},
        "links": {},
        "errors": [],
    }


async def read_json(request: web.Request, default: Any = None) -> Any:
    raw = await request.read()
    if not raw:
        return {} if default is None else default
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(
            text=orjson.dumps(error_body("VALIDATION_ERROR", "Invalid input JSON")).decode(),
            content_type="application/json",
        ) from None
