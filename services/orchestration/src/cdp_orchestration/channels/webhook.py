"""Webhooks: an HTTPS POST of JSON, signed, retried with exponential backoff.

Every request carries

- ``Idempotency-Key: <action id>`` - the same on every attempt and every redelivery of the action, so a
  receiver that keeps the keys it has processed acts once;
- ``X-CDP-Timestamp: <unix seconds>`` and ``X-CDP-Signature: v1=<hex>``, the HMAC-SHA256 under
  CDP_WEBHOOK_SECRET of ``<timestamp>.<body>``. A receiver recomputes it over the raw body and refuses a
  timestamp older than a few minutes, so a captured request cannot be replayed later. Each attempt is
  signed afresh.

The body is the action as JSON (``{"action_id", "person_id", "subject", "title", "body", "url",
"data", "attributes"}``) or, with CDP_WEBHOOK_PAYLOAD=slack, a Slack incoming-webhook message (``{"text": …}``,
mrkdwn, the subject in bold on the first line) that Slack, Mattermost, Rocket.Chat and Teams' Slack
connector all accept.

A URL can come from a profile trait, so CDP_WEBHOOK_ALLOWED_HOSTS limits the hosts a webhook may reach
(an action naming another host is rejected with ``host_not_allowed`` and nothing is sent).

Retries: a 5xx, 429, timeout or connection error is tried again after ``base * 2**(n-1)`` seconds (at
most CDP_WEBHOOK_BACKOFF_MAX) with full jitter, or after the Retry-After the receiver sent, up to
CDP_WEBHOOK_MAX_ATTEMPTS attempts. A Retry-After longer than CDP_WEBHOOK_BACKOFF_MAX is not slept here:
the action comes back retryable with `retry_after`, so the dispatcher re-schedules it rather than holding
a worker. A 5xx, timeout or connection error that outlasts these attempts is one failed attempt of the
dispatcher's (CDP_ORCHESTRATION_MAX_ATTEMPTS of them, then the action is dead-lettered; see `dispatch`).
A 429 is the receiver saying "later", not a failed send (`Outcome.later`): the dispatcher hands such an
action back without using one of its attempts, however often the receiver asks, for at most
CDP_ORCHESTRATION_DEFER_SECONDS since the action was published (then it fails as ``http_429``). 404
and 410 (Slack's ``channel_not_found``, ``channel_is_archived``) reject the address; any other 4xx fails
for good.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields, parse_retry_after
from cdp_orchestration.channels.settings import WebhookSettings

log = logging.getLogger("cdp.orchestration.channels.webhook")

SIGNATURE_HEADER = "X-CDP-Signature"
TIMESTAMP_HEADER = "X-CDP-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, timestamp: str, signature: str, body: bytes, *, tolerance: float = 300.0) -> bool:
    """What a receiver checks: the signature over this body and a timestamp within `tolerance` seconds."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - stamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, stamp, body), signature)


class WebhookChannel(Channel):
    name = "webhook"

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._session = session
        self._owns_session = session is None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._settings.timeout))
        return self._session

    def body(self, action: Action) -> bytes:
        content = action.content
        if self._settings.payload == "slack":
            text = f"*{content.heading}*\n{content.body}" if content.heading else content.body
            if content.url:
                text += f"\n<{content.url}>"
            return orjson.dumps({"text": text})
        return orjson.dumps(
            {
                "action_id": action.action_id,
                "person_id": action.person_id,
                "subject": content.subject,
                "title": content.title,
                "body": content.body,
                "url": content.url,
                "data": dict(content.data),
                "attributes": dict(action.attributes),
            }
        )

    def headers(self, action: Action, body: bytes, now: float | None = None) -> dict[str, str]:
        timestamp = int(time.time() if now is None else now)
        return {
            "Content-Type": "application/json",
            "User-Agent": "cdp-orchestration",
            IDEMPOTENCY_HEADER: action.action_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._settings.secret, timestamp, body),
        }

    def destination(self, action: Action) -> str:
        # One receiver's 429 says nothing about another's: each host is paused on its own.
        return (urlsplit(action.address or self._settings.default_url or "").hostname or "").lower()

    async def send(self, action: Action) -> Outcome:
        url = action.address or self._settings.default_url
        parts = urlsplit(url or "")
        allowed = self._settings.allowed_hosts
        if parts.scheme not in ("http", "https") or not parts.netloc:
            outcome = Outcome.rejected("invalid_address") if url else Outcome.failed("no_url", retryable=False)
        elif allowed and (parts.hostname or "").lower() not in {host.lower() for host in allowed}:
            outcome = Outcome.rejected("host_not_allowed")
        else:
            outcome = await self._deliver(action, url)  # type: ignore[arg-type]
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "webhook %s", outcome.status, extra=log_fields(action, reason=outcome.reason))
        return outcome

    async def _deliver(self, action: Action, url: str) -> Outcome:
        s = self._settings
        body = self.body(action)
        outcome = Outcome.failed("not_attempted", retryable=True)
        for attempt in range(1, s.max_attempts + 1):
            outcome = await self._attempt(url, body, action)
            if outcome.ok or not outcome.retryable or attempt == s.max_attempts:
                break
            wait = outcome.retry_after
            if wait is None:
                wait = random.uniform(0, min(s.backoff_max, s.backoff_base * 2 ** (attempt - 1)))
            elif wait > s.backoff_max:
                break  # the receiver asked for a long pause: the caller re-schedules (outcome.retry_after)
            log.info("webhook retry", extra=log_fields(action, reason=outcome.reason, attempt=attempt, wait=wait))
            await self._sleep(wait)
        return outcome

    async def _attempt(self, url: str, body: bytes, action: Action) -> Outcome:
        try:
            async with self._client().post(url, data=body, headers=self.headers(action, body)) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await response.read()
        except TimeoutError:
            return Outcome.failed("timeout", retryable=True)
        except aiohttp.ClientError:
            return Outcome.failed("connect", retryable=True)
        if 200 <= status < 300:
            return Outcome.accepted()
        reason = f"http_{status}"
        if status == 429:
            return Outcome.later(reason, retry_after=retry_after)
        if status >= 500:
            return Outcome.failed(reason, retryable=True, retry_after=retry_after)
        if status in (404, 410):
            return Outcome.rejected(reason)
        return Outcome.failed(reason, retryable=False)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None
