"""Webhooks: an HTTPS POST of JSON, signed, retried with exponential backoff.

Every request carries

- ``Idempotency-Key: <action id>`` - the same on every attempt and every redelivery of the action, so a
  receiver that keeps the keys it has processed acts once;
- ``X-CDP-Timestamp: <unix seconds>`` and ``X-CDP-Signature: v2=<hex>``, the hex HMAC-SHA256 under
  CDP_WEBHOOK_SECRET of ``<timestamp>.POST <destination>.<body>`` (`signed_string`): the timestamp as
  sent, a dot, ``POST``, a space, the destination, a dot, the raw body. The destination is the URL the
  request was sent to (`destination_of`): scheme and host lowercase (an international name in its
  ``xn--`` form, an IPv6 address in brackets), ``:<port>`` only when it is not the scheme's default, then
  the request target exactly as on the request line (path, ``?`` and query; ``/`` for an empty path); no
  user info, no fragment. So ``https://Hooks.Shop.example:443/in?x=1`` is signed as
  ``https://hooks.shop.example/in?x=1``. A receiver recomputes it with *its own* origin, the one it gave
  out (never one built from the request's Host header, which whoever posts the request sets), plus the
  request target it received, over the raw body, and refuses a timestamp older than a few minutes. A
  request signed for one URL is then refused at any other: a receiver that got it (a URL taken from a
  trait, say) cannot forward it to another receiver that trusts the same secret. Each attempt is signed
  afresh. The v1 signature (``<timestamp>.<body>`` alone) is no longer sent, not even beside v2: a
  receiver that still accepts it accepts a forwarded request, so sending it would keep that open.

The body is the action as JSON (``{"action_id", "person_id", "subject", "title", "body", "url",
"data", "attributes"}``) or, with CDP_WEBHOOK_PAYLOAD=slack, a Slack incoming-webhook message (``{"text": …}``,
mrkdwn, the subject in bold on the first line, the url as a link on the last) that Slack, Mattermost,
Rocket.Chat and Teams' Slack connector all accept. The rendered parts are text there, not markup: Slack's
three control characters (``&``, ``<``, ``>``) are escaped as Slack documents (``&amp;``, ``&lt;``,
``&gt;``), so a trait cannot write ``<!channel>`` or a link whose text hides where it leads.

A URL can come from a profile trait (the action's address, the person's ``webhook_url``), so where a
webhook may go is checked before anything is sent, and a refusal is final (rejected, never retried):

- a URL taken from a trait may name only a host listed in CDP_WEBHOOK_ALLOWED_HOSTS; with none listed
  (the default) every such URL is rejected with ``host_not_allowed`` and only CDP_WEBHOOK_URL, which the
  operator wrote, is called. Whoever can write a trait (a browser holding the public write key that
  claims a person's email, say) could otherwise have that person's webhooks, signed, sent to them;
- CDP_WEBHOOK_ALLOWED_HOSTS, when set, is the list of hosts any URL may name, CDP_WEBHOOK_URL's
  included; any other is rejected with ``host_not_allowed``;
- a host that is, or resolves to, a loopback, private, link-local, multicast, unspecified or reserved
  address (the metadata service at 169.254.169.254 among them) is rejected with
  ``destination_not_allowed`` unless the host is listed (`destinations`); the connection goes to the
  address that was checked;
- redirects are not followed: a 3xx is the receiver's answer, a failure for good (``http_302``);
- at most RESPONSE_LIMIT bytes of an answer are read: the status is the answer, the body is not kept.

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

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver
from yarl import URL

from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields, parse_retry_after
from cdp_orchestration.channels.destinations import (
    DestinationRefused,
    GuardedResolver,
    literal,
    normal_host,
    parse_url,
    read_at_most,
    refusal,
)
from cdp_orchestration.channels.settings import WebhookSettings

log = logging.getLogger("cdp.orchestration.channels.webhook")

SIGNATURE_HEADER = "X-CDP-Signature"
TIMESTAMP_HEADER = "X-CDP-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: bytes of a receiver's answer read at most; the status is what counts, and a receiver (or whatever a
#: URL names) cannot make the service hold an unbounded body
RESPONSE_LIMIT = 64 * 1024


def slack_escape(text: str) -> str:
    """`text` as Slack shows it literally: its control characters &, < and > as HTML entities, and no
    others (Slack decodes only these three)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str) -> str:
    # Inside <...>, "|" starts the link's text: a URL carrying one could show a harmless address and lead
    # elsewhere. "|" is not a character a URL may hold as it is (RFC 3986), so it is percent-encoded.
    return "<" + slack_escape(url).replace("|", "%7C") + ">"


def destination_of(url: URL) -> str:
    """The destination a v2 signature names: origin (scheme, host, a port that is not the default) and the
    request target as sent on the request line; no user info, no fragment."""
    return str(url.origin()) + url.raw_path_qs


def signed_string(timestamp: int, destination: str, body: bytes) -> bytes:
    return f"{timestamp}.POST {destination}.".encode() + body


def sign(secret: str, timestamp: int, body: bytes, *, url: str) -> str:
    """The ``X-CDP-Signature`` value for `body` sent at `timestamp` to `url` (a destination, `destination_of`)."""
    mac = hmac.new(secret.encode(), signed_string(timestamp, url, body), hashlib.sha256)
    return "v2=" + mac.hexdigest()


def verify(secret: str, timestamp: str, signature: str, body: bytes, *, url: str, tolerance: float = 300.0) -> bool:
    """What a receiver checks: the signature over this body sent to `url` (the receiver's own URL: its
    origin and the request target it received) and a timestamp within `tolerance` seconds."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - stamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, stamp, body, url=url), signature)


class WebhookChannel(Channel):
    name = "webhook"

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        resolver: AbstractResolver | None = None,
    ) -> None:
        """`resolver` answers for host names (tests stand in for DNS with it); whatever it answers passes
        the destination check. The channel owns its session, so every connection passes that check."""
        self._settings = settings
        self._sleep = sleep
        self._allowed = {normal_host(host) for host in settings.allowed_hosts}
        self._names = resolver
        self._resolver: GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._resolver = GuardedResolver(self._settings.allowed_hosts, self._names)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self._resolver),
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            )
        return self._session

    def body(self, action: Action) -> bytes:
        content = action.content
        if self._settings.payload == "slack":
            body = slack_escape(content.body)
            text = f"*{slack_escape(content.heading)}*\n{body}" if content.heading else body
            if content.url:
                text += "\n" + _slack_link(content.url)
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

    def headers(self, action: Action, url: URL, body: bytes, now: float | None = None) -> dict[str, str]:
        timestamp = int(time.time() if now is None else now)
        return {
            "Content-Type": "application/json",
            "User-Agent": "cdp-orchestration",
            IDEMPOTENCY_HEADER: action.action_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._settings.secret, timestamp, body, url=destination_of(url)),
        }

    def destination(self, action: Action) -> str:
        # One receiver's 429 says nothing about another's: each host is paused on its own.
        url = parse_url(action.address or self._settings.default_url or "")
        return normal_host(url.raw_host) if url is not None else ""

    async def send(self, action: Action) -> Outcome:
        text = action.address or self._settings.default_url
        # Parsed once, by the parser aiohttp connects with, so the host checked is the host connected to.
        url = parse_url(text or "")
        host = normal_host(url.raw_host) if url is not None else ""
        address = literal(host)
        refused = None
        if url is None or url.scheme not in ("http", "https") or not host:
            outcome = Outcome.rejected("invalid_address") if text else Outcome.failed("no_url", retryable=False)
        elif (self._allowed or action.address) and host not in self._allowed:
            # A URL from a trait (action.address) goes only to a host the operator listed: none listed, none.
            outcome = Outcome.rejected("host_not_allowed")
        elif address is not None and host not in self._allowed and (refused := refusal(address)):
            # aiohttp connects to an IP literal without resolving it: the resolver's check is made here.
            outcome = Outcome.rejected("destination_not_allowed")
        else:
            outcome = await self._deliver(action, url)
        level = logging.INFO if outcome.ok else logging.WARNING
        extra = log_fields(action, reason=outcome.reason, url_from="trait" if action.address else "setting")
        if refused is not None:
            extra["refused"] = refused
        log.log(level, "webhook %s", outcome.status, extra=extra)
        return outcome

    async def _deliver(self, action: Action, url: URL) -> Outcome:
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

    async def _attempt(self, url: URL, body: bytes, action: Action) -> Outcome:
        try:
            # A redirect is not followed: the checks above hold for the URL the action names, and a
            # receiver could otherwise point the signed request anywhere (the metadata service, say).
            async with self._client().post(
                url, data=body, headers=self.headers(action, url, body), allow_redirects=False
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await read_at_most(response, RESPONSE_LIMIT)
        except TimeoutError:
            return Outcome.failed("timeout", retryable=True)
        except aiohttp.InvalidUrlClientError:  # a host aiohttp will not connect to as written ("127.1")
            return Outcome.rejected("invalid_address")
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, DestinationRefused):
                log.warning("webhook destination refused", extra=log_fields(action, refused=error.os_error.kind))
                return Outcome.rejected("destination_not_allowed")
            return Outcome.failed("connect", retryable=True)
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
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()  # the connector closes only a resolver it made itself
        self._session = self._resolver = None
