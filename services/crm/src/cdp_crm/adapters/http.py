"""The HTTP exchange every adapter shares: one request, its answer or the failure as an outcome.

A request that times out or whose connection drops may have been committed by the CRM: that is
ANSWER_LOST, retried as is (every write is an upsert by key). 429 and the CRMs' own limit answers are
THROTTLED with their Retry-After; 5xx UNAVAILABLE; 401 AUTH. Log lines carry the method, the path
template's object and the status - never bodies, which hold personal data.

No redirect is followed (a CRM's API does not redirect; one that does - a proxy, a hijacked name - would
get the token, or a token request's client secret, sent on): a 3xx is UNAVAILABLE `REDIRECT`. No answer is
read past `MAX_ANSWER_BYTES`: a body without end is UNAVAILABLE `TOO_LARGE`, its connection closed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from cdp_crm.domain.isolation import ANSWER_LOST, AUTH, THROTTLED, UNAVAILABLE, CrmError

if TYPE_CHECKING:
    from cdp_crm.budgets import SharedBudget

# Called before each request a read sends (the first, and the retry after a new token).
Reserve = Callable[[], Awaitable[None]]

log = logging.getLogger("cdp.crm.adapters")
# The largest answer read: far above any page or batch answer, and a Bulk API results CSV of a
# 150,000-row page stays below it.
MAX_ANSWER_BYTES = 64 << 20
REDIRECTS = (301, 302, 303, 307, 308)


class AnswerTooLarge(Exception):
    """An answer's body went past `MAX_ANSWER_BYTES`."""


async def read_body(response: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The answer's body, `limit` bytes at most: past it the connection is closed and AnswerTooLarge raised."""
    if response.content_length is not None and response.content_length > limit:
        response.close()
        raise AnswerTooLarge(response.content_length)
    parts, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            response.close()
            raise AnswerTooLarge(size)
        parts.append(chunk)
    return b"".join(parts)


async def read_json(response: aiohttp.ClientResponse) -> Any:
    """The answer's body as JSON (a token endpoint's), `MAX_ANSWER_BYTES` at most; ValueError when it is
    not JSON, AnswerTooLarge past the limit; None for an empty body."""
    raw = await read_body(response)
    return orjson.loads(raw) if raw else None


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any = None  # parsed JSON, or the raw text when not JSON
    error: CrmError | None = None  # set when no usable answer came back (network, timeout)
    raw: bytes = field(default=b"", repr=False)


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json: Any = None,
    data: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    what: str = "",
) -> Answer:
    """One request. Never raises for the network: a lost answer is `Answer(error=ANSWER_LOST)`."""
    body = orjson.dumps(json) if json is not None else data
    sent_headers = dict(headers or {})
    if json is not None:
        sent_headers.setdefault("Content-Type", "application/json")
    try:
        async with session.request(
            method,
            url,
            data=body,
            headers=sent_headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            if response.status in REDIRECTS:  # not 304: Zoho's If-Modified-Since answer
                log.warning("crm request redirected", extra={"method": method, "what": what, "status": response.status})
                error = CrmError(
                    UNAVAILABLE, "REDIRECT", "the CRM answered a redirect; none is followed", response.status
                )
                return Answer(response.status, {}, None, error)
            raw = await read_body(response)
            answer_headers = {k: v for k, v in response.headers.items()}
            parsed: Any = None
            if raw:
                try:
                    parsed = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    parsed = raw.decode(errors="replace")
            log.debug("crm request", extra={"method": method, "what": what, "status": response.status})
            return Answer(response.status, answer_headers, parsed, raw=raw)
    except AnswerTooLarge:
        error = CrmError(UNAVAILABLE, "TOO_LARGE", f"the answer went past {MAX_ANSWER_BYTES} bytes; not read")
    except TimeoutError:
        error = CrmError(ANSWER_LOST, "TIMEOUT", "no answer within the timeout; the write may have committed")
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        error = CrmError(ANSWER_LOST, type(exc).__name__, "the connection failed; the write may have committed")
    log.warning("crm request failed", extra={"method": method, "what": what, "crm_code": error.code})
    return Answer(0, {}, None, error)


def transport_error(answer: Answer, code: str = "", message: str = "") -> CrmError | None:
    """The transient error an answer's status means (None: the CRM answered and the body says more)."""
    if answer.error is not None:
        return answer.error
    status, headers = answer.status, answer.headers
    retry_after = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if status == 429:
        return CrmError(THROTTLED, code or "429", message, status, retry_after)
    if status == 401:
        return CrmError(AUTH, code or "401", message, status)
    if status >= 500:
        return CrmError(UNAVAILABLE, code or str(status), message, status, retry_after)
    return None


def unexpected(answer: Answer) -> CrmError | None:
    """A success whose body is not the JSON object the API answers with (a proxy's or a maintenance
    page's 200, a list): UNAVAILABLE, retried like a 5xx, rather than read as results. None otherwise."""
    if 200 <= answer.status < 300 and answer.body is not None and not isinstance(answer.body, dict):
        return CrmError(UNAVAILABLE, "UNEXPECTED_ANSWER", "the answer is not the API's JSON object", answer.status)
    return None


def listed(answer: Answer, key: str) -> CrmError | None:
    """None when the answer's body is an object holding a list of objects under `key` (the records a
    lookup found, none or some); else UNAVAILABLE `UNEXPECTED_ANSWER`. A lookup answered otherwise found
    nothing readable, which is not "no such record": a privacy delete would count it deleted already."""
    items = answer.body.get(key) if isinstance(answer.body, dict) else None
    if isinstance(items, list) and all(isinstance(item, dict) for item in items):
        return None
    return CrmError(UNAVAILABLE, "UNEXPECTED_ANSWER", f"the answer holds no list of {key}", answer.status)


async def metered_read(
    budget: SharedBudget,
    clock: Callable[[], float],
    send: Callable[[Reserve], Awaitable[Answer]],
    failure: Callable[[Answer], CrmError | None],
) -> Answer:
    """One read through an adapter, accounted on the account's shared budget: a unit reserved before every
    request `send` makes (`send` calls the hook it is given) and held until the read's answer is in, the
    answer's limit headers observed, and a throttling answer recorded (its Retry-After, the day's quota
    when the CRM says so). The answer's `error` is what `failure` (the adapter's own error mapping) makes of
    it: None when the CRM answered the read."""
    reservations = []

    async def reserve() -> None:
        reservations.append(await budget.acquire(1, clock))

    answer = await send(reserve)
    error = failure(answer)
    now = clock()
    throttled = (error.retry_after, error.daily) if error is not None and error.reason == THROTTLED else None
    # Each request before the last had its answer already; the last's fate is unknown after a timeout.
    lost = answer.error is not None and answer.error.code == "TIMEOUT"
    for n, reservation in enumerate(reservations):
        last = n == len(reservations) - 1
        await budget.settle(
            reservation, now, answer.headers if last else None, answered=not (last and lost),
            throttled=throttled if last else None,
        )  # fmt: skip
    if not reservations:
        await budget.settle(None, now, answer.headers, throttled=throttled)
    return answer if error is None else replace(answer, error=error)
