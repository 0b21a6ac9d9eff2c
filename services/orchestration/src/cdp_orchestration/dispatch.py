"""Channel dispatchers: `actions.<channel>.>` -> the channel's adapter, each action sent once.

One durable consumer per channel (`orchestration-dispatch-<channel>`) hands each `ActionMessage` to the
adapter (`cdp_orchestration.channels`). The send is recorded in `orchestration_sends` under the action id
before the message is acknowledged, so a redelivery (a crash after the send, an acknowledgement lost)
finds the record and sends nothing: an action reaches its provider at most once per record, and the
record is written as soon as the provider answered. The window between the provider's answer and the
record is the one place a crash can send twice; adapters pass the action id to providers that take an
idempotency key (`channels` lists them).

Outcomes: accepted and rejected (for good) are recorded; a retryable failure is retried with the
provider's Retry-After or the consumer's backoff, and dead-lettered with its reason when retries run out.
Logs name the action id, channel and reason code, never an address or content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, ConsumerRunner, ConsumerSpec, Delivery, subjects
from cdp_kit.storage import Put, Store
from cdp_orchestration.channels import Channel
from cdp_orchestration.channels.wire import action_from_message

log = logging.getLogger("cdp.orchestration.dispatch")

SENDS = "orchestration_sends"


class Dispatcher:
    def __init__(self, channel: Channel, store: Store) -> None:
        self.channel = channel
        self.store = store

    async def handle(self, batch: Sequence[Delivery]) -> None:
        for delivery in batch:
            try:
                action = action_from_message(pb.ActionMessage.FromString(delivery.data))
            except Exception as exc:
                delivery.reject("invalid_action", f"not an ActionMessage: {type(exc).__name__}")
                continue
            if await self.store.get(SENDS, action.action_id) is not None:
                continue  # sent already: a redelivery
            outcome = await self.channel.send(action)
            if not outcome.ok and outcome.retryable:
                log.warning("action %s on %s not sent yet: %s", action.action_id, self.channel.name, outcome.reason)
                delivery.retry(outcome.reason, outcome.retry_after)
                continue
            record = {
                "channel": self.channel.name,
                "person_id": action.person_id,
                "status": outcome.status,
                "reason": outcome.reason,
                "provider_id": outcome.provider_id or "",
                "at": time.time(),
            }
            await self.store.bulk_write([Put(SENDS, action.action_id, record)])
            if not outcome.ok:
                log.warning("action %s on %s failed for good: %s", action.action_id, self.channel.name, outcome.reason)


def dispatcher(bus: Bus, store: Store, channel: Channel, *, ack_wait: float = 60.0) -> ConsumerRunner:
    spec = ConsumerSpec(
        stream=subjects.ACTIONS,
        durable=f"orchestration-dispatch-{channel.name}",
        filter_subjects=(subjects.actions_of(channel.name),),
        batch_size=32,
        ack_wait=ack_wait,
        description=f"orchestration: send {channel.name} actions",
    )
    return bus.consumer(spec, Dispatcher(channel, store).handle)
