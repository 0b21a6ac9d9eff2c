"""The one interface every channel adapter implements: `Channel.send(action) -> Outcome`.

An `Action` is what the arbiter let through, already rendered: a stable `action_id` (the same on every
redelivery of the `actions.<channel>` message), the person it is for, the address on that channel and the
content. Each adapter hands the action id to its provider as the idempotency handle where the protocol has
one (SMTP Message-ID, the webhook Idempotency-Key header, the CRM message's Nats-Msg-Id, the in-app inbox
key), so a redelivered action is not delivered twice by anything that honours it.

`send` never raises for a provider's answer or a network fault: it returns an `Outcome`:

- ``accepted``: the provider took the message (its own id, when it gives one, is `provider_id`);
- ``failed``: not sent; `retryable` says whether sending the same action later can succeed (a timeout, a
  5xx, a 429 - with `retry_after` when the provider said how long) or not (bad credentials, a message
  the provider will never take). `deferred` (`Outcome.later`): the provider asked for time (a 429) -
  not a failed send, so the dispatcher hands the action back without using one of its attempts;
- ``rejected``: the provider refused *this address* for good (an unknown mailbox, an unregistered device,
  a gone subscription): retrying is pointless and the address should be marked.

`reason` is a short machine code (``smtp_550``, ``http_503``, ``timeout``, ``UNREGISTERED``) that decision
records and outcome events carry. Logs written here and in the adapters name the action id, the channel
and the reason, never the address or the content (they are customer data).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from cdp_kit.errors import InvalidArgument

OutcomeStatus = Literal["accepted", "failed", "rejected"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Content:
    """Rendered content, the parts of the journey's template (templates are rendered before a channel
    sees them).

    `body` is the text every channel carries (the SMS, the email's plain part, the push body); `subject`
    the email subject and CRM task subject; `title` the push / in-app title (falls back to `subject`);
    `html` an email's HTML alternative; `url` where a click leads; `data` string key/values for push
    payloads and webhook bodies."""

    body: str = ""
    subject: str | None = None
    title: str | None = None
    html: str | None = None
    url: str | None = None
    data: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @property
    def heading(self) -> str | None:
        return self.title or self.subject


@dataclass(frozen=True, slots=True)
class Action:
    """One action on one channel for one person.

    `address` is what the channel sends to: an email address, an E.164 phone number, an FCM registration
    token, a Web Push subscription (its JSON), a webhook URL (empty: the configured default). In-app and
    CRM actions need none. `user_id` (else `anonymous_id`) is an identifier of the person identity knows,
    which outcome events are sent back in under so they land on the same person. `attributes` carries what the journey wants echoed
    (journey id, node id, category); it goes into outcome events, never into logs."""

    action_id: str
    person_id: str
    channel: str
    content: Content
    address: str = ""
    user_id: str | None = None
    anonymous_id: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        for name in ("action_id", "person_id", "channel"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidArgument(name, "is required: a non-empty string")
        if len(self.action_id) > 200:
            # It becomes a Message-ID, a header value and a store key: keep it short and printable.
            raise InvalidArgument("action_id", f"is {len(self.action_id)} characters; at most 200")
        if not self.action_id.isascii() or not self.action_id.isprintable() or " " in self.action_id:
            raise InvalidArgument("action_id", "must be printable ASCII without spaces")


@dataclass(frozen=True, slots=True)
class Outcome:
    status: OutcomeStatus
    reason: str = ""
    retryable: bool = False
    provider_id: str | None = None
    retry_after: float | None = None
    deferred: bool = False

    @classmethod
    def accepted(cls, provider_id: str | None = None) -> Outcome:
        return cls("accepted", provider_id=provider_id)

    @classmethod
    def failed(cls, reason: str, *, retryable: bool, retry_after: float | None = None) -> Outcome:
        return cls("failed", reason=reason, retryable=retryable, retry_after=retry_after)

    @classmethod
    def later(cls, reason: str, *, retry_after: float | None = None) -> Outcome:
        """The provider is rate-limiting (a 429): send again after `retry_after` (its Retry-After, when it
        gave one). Not sent, retryable, and not counted as a failed attempt."""
        return cls("failed", reason=reason, retryable=True, retry_after=retry_after, deferred=True)

    @classmethod
    def rejected(cls, reason: str) -> Outcome:
        return cls("rejected", reason=reason)

    @property
    def ok(self) -> bool:
        return self.status == "accepted"


class Channel(abc.ABC):
    """A channel adapter. Create it with its provider settings, `await send(action)` as often as needed
    (concurrently is fine), `await close()` once (or use it as an async context manager)."""

    #: the channel name in `actions.<name>` and in outcome events
    name: ClassVar[str]

    @abc.abstractmethod
    async def send(self, action: Action) -> Outcome: ...

    #: whether `probe` can tell, without sending anything, that the provider answers at all
    probes: ClassVar[bool] = False

    async def probe(self, action: Action) -> bool:
        """Whether the provider that would take `action` answers at all (its destination's), asked without
        sending anything - an SMTP relay's greeting. False when it says nothing in time. Only for
        channels with `probes`: the dispatcher asks it, away from any batch, while the destination's
        breaker is open (`dispatch.py`); the others are probed with an action's send."""
        raise NotImplementedError

    def destination(self, action: Action) -> str:
        """Who answers this action's send, as far as rate limits go: a provider that asks for a pause
        (Retry-After) holds the dispatcher's other sends to the same destination. One provider account per
        channel by default; channels that reach many receivers (webhooks, push services) name the host."""
        return ""

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def log_fields(action: Action, **more: Any) -> dict[str, Any]:
    """`extra=` for a log line about an action: ids and codes only."""
    return {"action_id": action.action_id, "channel": action.channel, **more}


async def read_json(response: Any) -> dict[str, Any]:
    """An HTTP response's JSON object, or {} when the body is not one (a proxy's HTML error page, an
    empty body): a provider's answer is judged by its status first, its body only adds detail."""
    try:
        body = await response.json(content_type=None)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from an HTTP Retry-After header (delta-seconds or an HTTP-date), None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
