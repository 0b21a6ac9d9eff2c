"""CRM tasks and cases: the ``actions.crm`` message the CRM connector turns into a Salesforce task, a
HubSpot ticket, ...

The orchestration service does not call a CRM itself: `crm_message` builds the message (an
`ActionMessage` with channel ``crm``, its `crm_kind` - ``task`` or ``case`` -, the subject, the body and
the person's top signals for whoever picks it up) and its ``Nats-Msg-Id`` header, the action id, so
JetStream drops a republished copy within its duplicate window. `CrmChannel` hands it to the `publish`
function the service supplies (which knows the subject and the partition) and reports the publish as the
outcome: accepted once JetStream acknowledged it, failed and retryable when it did not.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cdp_kit.errors import InvalidArgument
from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields
from cdp_orchestration.channels.wire import message_from_action

log = logging.getLogger("cdp.orchestration.channels.crm")

KINDS = ("task", "case")


@dataclass(frozen=True, slots=True)
class CrmMessage:
    person_id: str
    body: bytes
    headers: dict[str, str]


def crm_message(action: Action) -> CrmMessage:
    kind = action.attributes.get("crm_kind")
    if kind not in KINDS:
        raise InvalidArgument("crm_kind", f"must be task or case, got {kind!r}")
    if not (action.content.subject or action.content.title):
        raise InvalidArgument("content.subject", "a CRM task or case needs a subject")
    message = message_from_action(action)
    return CrmMessage(action.person_id, message.SerializeToString(), {"Nats-Msg-Id": action.action_id})


class CrmChannel(Channel):
    name = "crm"

    def __init__(self, publish: Callable[[CrmMessage], Awaitable[object]]) -> None:
        self._publish = publish

    async def send(self, action: Action) -> Outcome:
        try:
            message = crm_message(action)
        except InvalidArgument as exc:
            outcome = Outcome.failed(f"invalid_{exc.field}", retryable=False)
        else:
            try:
                await self._publish(message)
                outcome = Outcome.accepted(provider_id=action.action_id)
            except Exception as exc:  # the bus refusing or timing out: the action is retried, not lost
                outcome = Outcome.failed(f"publish_{type(exc).__name__}", retryable=True)
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "crm %s", outcome.status, extra=log_fields(action, reason=outcome.reason))
        return outcome
