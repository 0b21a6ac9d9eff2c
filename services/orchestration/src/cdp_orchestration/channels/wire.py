"""`Action` ↔ `cdp.orchestration.v1.ActionMessage`, the payload of ``actions.<channel>`` messages.

The message's `content` map holds the rendered parts: ``subject``, ``title``, ``body``, ``html``, ``url``;
any other key is push / webhook data (`Content.data`). Its `address` map holds what the arbiter read from
the profile, one key per channel (`ADDRESS_KEYS`), and who the person is to identity (`IDENTITY_KEYS`:
their userId, else an anonymous id of theirs), which outcome events are sent back in under. Journey coordinates (journey id and version, instance,
node, category, CRM kind, signals, decision time) travel in `Action.attributes` so outcome events can
echo them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import InvalidArgument
from cdp_orchestration.channels.base import Action, Content

#: channel -> the key of `ActionMessage.address` it sends to (in-app and CRM need no address)
ADDRESS_KEYS = {
    "email": "email",
    "sms": "phone",
    "push": "push_token",
    "webpush": "webpush_subscription",
    "webhook": "webhook_url",
}
CHANNELS = (*ADDRESS_KEYS, "inapp", "crm")
#: keys of `ActionMessage.address` naming the person as identity knows them (for outcome events)
USER_ID, ANONYMOUS_ID = IDENTITY_KEYS = ("user_id", "anonymous_id")
_PARTS = ("subject", "title", "body", "html", "url")
_COORDINATES = ("journey_id", "instance_id", "node_id", "category", "crm_kind")


def action_from_message(message: pb.ActionMessage) -> Action:
    if message.channel not in CHANNELS:
        raise InvalidArgument("channel", f"{message.channel!r} is not a channel; use one of {', '.join(CHANNELS)}")
    content = dict(message.content)
    attributes: dict[str, Any] = {name: getattr(message, name) for name in _COORDINATES if getattr(message, name)}
    if message.journey_version:
        attributes["journey_version"] = message.journey_version
    if message.signals:
        attributes["signals"] = {signal.name: signal.value for signal in message.signals}
    if message.HasField("decided_at"):
        attributes["decided_at"] = message.decided_at.ToDatetime(tzinfo=UTC).isoformat()
    key = ADDRESS_KEYS.get(message.channel)
    return Action(
        action_id=message.action_id,
        person_id=message.person_id,
        channel=message.channel,
        address=message.address.get(key, "") if key else "",
        user_id=message.address.get(USER_ID) or None,
        anonymous_id=message.address.get(ANONYMOUS_ID) or None,
        content=Content(
            body=content.pop("body", ""),
            subject=content.pop("subject", None),
            title=content.pop("title", None),
            html=content.pop("html", None),
            url=content.pop("url", None),
            data=content,
        ),
        attributes=attributes,
    )


def message_from_action(action: Action) -> pb.ActionMessage:
    attributes = action.attributes
    message = pb.ActionMessage(
        action_id=action.action_id,
        person_id=action.person_id,
        channel=action.channel,
        journey_version=int(attributes.get("journey_version", 0)),
        **{name: str(attributes[name]) for name in _COORDINATES if attributes.get(name)},
    )
    for name, value in dict(action.content.data).items():
        message.content[name] = value
    for part in _PARTS:
        value = getattr(action.content, part)
        if value:
            message.content[part] = value
    for name, value in dict(attributes.get("signals") or {}).items():
        message.signals.add(name=name, value=str(value))
    if attributes.get("decided_at"):
        message.decided_at.FromDatetime(datetime.fromisoformat(attributes["decided_at"]))
    key = ADDRESS_KEYS.get(action.channel)
    if key and action.address:
        message.address[key] = action.address
    if action.user_id:
        message.address[USER_ID] = action.user_id
    if action.anonymous_id:
        message.address[ANONYMOUS_ID] = action.anonymous_id
    return message
