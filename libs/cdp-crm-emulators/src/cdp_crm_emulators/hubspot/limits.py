"""Authentication and the limits (burst, daily, search per second) a request meets before anything else,
the ``X-HubSpot-RateLimit-*`` headers every answer carries, and HubSpot's 429 bodies (the package docstring
says what counts).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cdp_crm_emulators._server import LoggedRequest, json_response, new_id
from cdp_crm_emulators.hubspot.answers import error_body


class LimitsMixin:
    """The middleware that authenticates and counts every API request. The state it reads is `HubSpotEmulator`'s (set in its ``__init__``)."""

    def is_api(self, request: web.Request) -> bool:
        # The developer platform's webhook settings take the developer API key, outside the account's limits.
        return super().is_api(request) and not request.path.startswith("/webhooks/")

    def error_response(self, status: int, request: web.Request) -> web.Response:
        if status == 429:
            return self._throttled("TEN_SECONDLY_ROLLING")
        return json_response(
            error_body("INTERNAL_ERROR" if status >= 500 else "VALIDATION_ERROR", "injected fault"), status=status
        )

    def _roll(self, now: float) -> None:
        while self._burst and self._burst[0] <= now - self.burst_window:
            self._burst.popleft()
        day = int(now // 86400)
        if day != self._day:
            self._day, self._daily_used = day, 0

    def _limit_headers(self) -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(self.burst_window * 1000)),
            "X-HubSpot-RateLimit-Max": str(self.burst_limit),
            "X-HubSpot-RateLimit-Remaining": str(max(0, self.burst_limit - len(self._burst))),
            "X-HubSpot-RateLimit-Daily": str(self.daily_limit),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, self.daily_limit - self._daily_used)),
        }

    def _throttled(self, policy: str) -> web.Response:
        message = {
            "DAILY": "You have reached your daily limit.",
            "SECONDLY": "You have reached your secondly limit.",  # as HubSpot words it (the search limit)
        }.get(policy, "You have reached your ten_secondly_rolling limit.")
        body = {
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "correlationId": new_id(),
            "policyName": policy,
            "groupName": f"publicapi:private-app:{self.portal_id}",
        }
        return json_response(body, status=429, headers=self._limit_headers())

    @web.middleware
    async def _limits(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Authentication and the limits, before anything else (the request log and the fault injector run
        inside): a request is counted the moment it arrives, so a fault injected into it - a 503, a 429,
        a timeout, a dropped connection - has been counted, as HubSpot would have."""
        if not self.is_api(request):
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            body = error_body("INVALID_AUTHENTICATION", "Authentication credentials not found.")
            return self._refused(request, json_response(body, status=401))
        now = self.clock()
        self._roll(now)
        if self._daily_used >= self.daily_limit:
            self._over_budget += 1
            return self._refused(request, self._throttled("DAILY"))
        if len(self._burst) >= self.burst_limit:
            self._over_budget += 1
            return self._refused(request, self._throttled("TEN_SECONDLY_ROLLING"))
        if request.path.startswith("/crm/v3/objects/") and request.path.endswith("/search"):  # not lists
            while self._searches and self._searches[0] <= now - 1.0:
                self._searches.popleft()
            if len(self._searches) >= self.search_per_second:
                self._over_budget += 1
                return self._refused(request, self._throttled("SECONDLY"))
            self._searches.append(now)
        self._burst.append(now)
        self._daily_used += 1
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(self._limit_headers())
            raise
        response.headers.update(self._limit_headers())
        return response

    def _refused(self, request: web.Request, response: web.Response) -> web.Response:
        # Refused before the request log's middleware saw it: logged here, so the log holds every request.
        self.requests.append(LoggedRequest(request.method, request.path_qs, response.status, self.clock()))
        return response
