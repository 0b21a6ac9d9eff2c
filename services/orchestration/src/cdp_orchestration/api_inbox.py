"""A person's in-app inbox through the API: list it, mark messages read (each newly read message is opened
once, `Message Opened` going back in like any outcome), and subscribe to it (the unread first, then each new
message once). The inbox is the in-app channel's; a replica not running that channel refuses these calls
(FAILED_PRECONDITION).

A subscription never ends by itself, and the gRPC server's stop waits up to the grace
(CDP_SHUTDOWN_GRACE) for the calls in flight: one open stream held every stop that long. So each stream ends
as the service starts stopping (`ApiBase.stopping`, set before the server's stop), UNAVAILABLE, which an app
subscribes again on (another replica answers, or this one once restarted); a message added meanwhile is in
the unread it gets first.
"""

from __future__ import annotations

import asyncio

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import FailedPrecondition, Unavailable
from cdp_orchestration.api_base import ApiBase
from cdp_orchestration.channels.inapp import Subscription
from cdp_orchestration.messages import inbox_message, required

STOPPING = "the service is stopping: subscribe again"


class InboxCalls(ApiBase):
    """ListInbox, MarkInboxRead and SubscribeInbox (a part of `api.OrchestrationApi`)."""

    def _inbox(self):
        if self.inbox is None:
            raise FailedPrecondition("the in-app channel is not running in this replica")
        return self.inbox

    async def ListInbox(self, request, context) -> pb.ListInboxResponse:
        person_id = required(request.person_id, "person_id")
        messages, token = await self._inbox().list(
            person_id,
            unread_only=request.unread_only,
            page_size=request.page_size or 50,
            page_token=request.page_token or None,
        )
        return pb.ListInboxResponse(messages=[inbox_message(m) for m in messages], next_page_token=token or "")

    async def MarkInboxRead(self, request, context) -> pb.MarkInboxReadResponse:
        person_id = required(request.person_id, "person_id")
        marked = await self._inbox().mark_read(person_id, list(request.message_ids))
        # Each newly read message is opened once: Message Opened goes back in like any outcome.
        await self.opens.opened(person_id, marked)
        return pb.MarkInboxReadResponse(marked=len(marked))

    async def SubscribeInbox(self, request, context):
        person_id = required(request.person_id, "person_id")
        inbox = self._inbox()
        stopping = self.stopping
        if stopping is not None and stopping.is_set():
            raise Unavailable(STOPPING)
        async with inbox.subscribe(person_id) as subscription:
            watch = asyncio.create_task(_end_at_stop(stopping, subscription)) if stopping is not None else None
            try:
                # Subscribed before listing, so nothing falls between the two; a message in both comes once.
                unread, _ = await inbox.list(person_id, unread_only=True, page_size=500)
                seen = set()
                for message in reversed(unread):
                    seen.add(message.message_id)
                    yield inbox_message(message)
                async for message in subscription:
                    if message.message_id not in seen:
                        yield inbox_message(message)
            finally:
                if watch is not None:
                    watch.cancel()


async def _end_at_stop(stopping: asyncio.Event, subscription: Subscription) -> None:
    """End `subscription` (UNAVAILABLE to its caller) once the service starts stopping."""
    await stopping.wait()
    subscription.end(Unavailable(STOPPING))
