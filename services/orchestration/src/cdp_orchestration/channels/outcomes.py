"""Provider feedback → outcome events: Segment ``track`` calls the service sends in through the collector.

Three steps, so each source stays small: a parser turns what a provider said into `Feedback` (which
action, which outcome, why); the service looks the action up (person, user id, journey); `track_event`
builds the event. Sources: a channel's own `Outcome` (`feedback_from_outcome`), Twilio status callbacks
(`feedback_from_twilio`, after `sms.verify_twilio_signature`), RFC 3464 bounce reports
(`feedback_from_bounce`), and opens / clicks recorded by whatever tracks them (`Feedback` directly).

Every event has a deterministic ``messageId`` (``outcome:<action id>:<outcome>``, plus the occurrence for
repeatable ones such as clicks), so a callback delivered twice, or a redelivered action accepted twice,
lands once: the collector drops duplicate message ids. The event names are in the package docstring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import Message
from typing import Any, Literal

from cdp_orchestration.channels.base import Action, Outcome

OutcomeName = Literal["sent", "delivered", "bounced", "failed", "opened", "clicked", "converted"]

EVENT_NAMES: dict[str, str] = {
    "sent": "Message Sent",
    "delivered": "Message Delivered",
    "bounced": "Message Bounced",
    "failed": "Message Failed",
    "opened": "Message Opened",
    "clicked": "Message Clicked",
    "converted": "Message Converted",
}

# Twilio MessageStatus → outcome; queued/accepted/scheduled/sending are steps on the way, not outcomes.
TWILIO_STATUSES: dict[str, OutcomeName] = {
    "sent": "sent",
    "delivered": "delivered",
    "undelivered": "bounced",
    "failed": "failed",
    "read": "opened",
}

_MESSAGE_ID = re.compile(r"<([^@<>\s]+)@[^<>\s]+>")


@dataclass(frozen=True, slots=True)
class Feedback:
    action_id: str
    outcome: OutcomeName
    channel: str
    reason: str | None = None
    provider_id: str | None = None
    at: datetime | None = None
    #: tells repeatable outcomes apart (the link of a click, the time of an open); None for one-off ones
    occurrence: str | None = None


def feedback_from_outcome(action: Action, outcome: Outcome, *, final: bool = True) -> Feedback | None:
    """What a send's own outcome says. A retryable failure says nothing until the caller gives up
    (`final=True` with the last outcome); `rejected` is a bounce: the address will not take messages."""
    if outcome.status == "accepted":
        return Feedback(action.action_id, "sent", action.channel, provider_id=outcome.provider_id)
    if outcome.status == "rejected":
        return Feedback(action.action_id, "bounced", action.channel, reason=outcome.reason)
    if outcome.retryable and not final:
        return None
    return Feedback(action.action_id, "failed", action.channel, reason=outcome.reason)


def feedback_from_twilio(params: Mapping[str, str], action_id: str) -> Feedback | None:
    """A Twilio status callback's form parameters (``action_id`` comes from the callback URL's query)."""
    outcome = TWILIO_STATUSES.get(params.get("MessageStatus", ""))
    if outcome is None:
        return None
    return Feedback(
        action_id,
        outcome,
        "sms",
        reason=f"twilio_{params['ErrorCode']}" if params.get("ErrorCode") else None,
        provider_id=params.get("MessageSid"),
    )


def feedback_from_bounce(raw: bytes) -> list[Feedback]:
    """Bounces in an RFC 3464 delivery status notification (``multipart/report;
    report-type=delivery-status``) for a message whose Message-ID we set; [] for anything else, and for
    ``Action: delayed`` reports (the relay is still trying)."""
    report = message_from_bytes(raw, policy=policy.compat32)
    if report.get_content_type() != "multipart/report":
        return []
    action_id: str | None = None
    statuses: list[tuple[str, str]] = []
    for part in report.walk():
        kind = part.get_content_type()
        if kind == "message/delivery-status":
            blocks = part.get_payload()
            for block in blocks[1:] if isinstance(blocks, list) else []:
                statuses.append((str(block.get("Action", "")).strip().lower(), str(block.get("Status", "")).strip()))
        elif kind in ("text/rfc822-headers", "message/rfc822"):
            action_id = action_id or _original_action_id(part)
    if action_id is None:
        return []
    return [
        Feedback(action_id, "bounced", "email", reason=status or None)
        for action, status in statuses
        if action == "failed"
    ]


def _original_action_id(part: Message) -> str | None:
    if part.get_content_type() == "message/rfc822":
        payload = part.get_payload()
        original = payload[0] if isinstance(payload, list) and payload else None
    else:
        text = part.get_payload(decode=True) or b""
        original = message_from_bytes(text, policy=policy.compat32)
    if original is None:
        return None
    if original.get("X-CDP-Action-Id"):
        return str(original["X-CDP-Action-Id"]).strip()
    match = _MESSAGE_ID.fullmatch(str(original.get("Message-ID", "")).strip())
    return match.group(1) if match else None


def track_event(
    feedback: Feedback,
    *,
    person_id: str,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The Segment ``track`` call for one outcome, sent under an identifier identity resolves to the person:
    their `user_id` when known, else one of their anonymous ids. With neither the event names no one
    (`attributed` says so) and must not be posted: the collector would refuse it, and sending the person id
    as an anonymous id would make identity a new person. The person id is in the properties either way."""
    at = feedback.at or now or datetime.now(UTC)
    message_id = f"outcome:{feedback.action_id}:{feedback.outcome}"
    if feedback.occurrence:
        message_id += f":{feedback.occurrence}"
    properties: dict[str, Any] = {**(attributes or {})}
    properties.update(action_id=feedback.action_id, channel=feedback.channel, person_id=person_id)
    if feedback.reason:
        properties["reason"] = feedback.reason
    if feedback.provider_id:
        properties["provider_id"] = feedback.provider_id
    event: dict[str, Any] = {
        "type": "track",
        "event": EVENT_NAMES[feedback.outcome],
        "messageId": message_id,
        "timestamp": at.isoformat(),
        "properties": properties,
        "context": {"library": {"name": "cdp-orchestration", "version": "1"}},
    }
    if user_id:
        event["userId"] = user_id
    elif anonymous_id:
        event["anonymousId"] = anonymous_id
    return event


def attributed(event: Mapping[str, Any]) -> bool:
    """Whether an outcome event names the person by an identifier identity knows (it can be posted)."""
    return bool(event.get("userId") or event.get("anonymousId"))
