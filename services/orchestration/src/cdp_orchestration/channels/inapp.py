"""In-app messages: an inbox per person on the store, and live subscriptions fed as messages are added.

Layout: collection ``inbox``, one document per message, keyed ``<person id>/<inverted ms>:<action id>``
so that a prefix scan lists one person's inbox newest first and pages with the store's cursor. The
message id is the action id, held in a unique index: adding an action twice (a redelivery, a crash
between storing and acknowledging) stores it once and notifies subscribers once.

Subscriptions are in-process (the gRPC stream sits on top of them): `subscribe(person_id)` registers at
once, so nothing added after it returns is missed, and yields each message added for that person. A
subscriber that falls more than `queue_size` messages behind is ended with `SubscriberLagged` rather than
holding memory for ever: the app re-lists the inbox and subscribes again. Subscriptions see messages
added through this process; a service with several replicas routes a person's subscription to the
replica owning the person's partition.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.errors import CdpError, InvalidArgument, NotFound
from cdp_kit.storage import Delete, DuplicateValue, Store, VersionConflict
from cdp_orchestration.channels.base import Action, Channel, Outcome

COLLECTION = "inbox"
_NEVER = 10**13  # ms: year 2286; inverted timestamps stay 13 digits and sort newest first


class SubscriberLagged(CdpError):
    """The subscriber fell too far behind; list the inbox again and re-subscribe."""

    reason = "subscriber_lagged"


@dataclass(frozen=True, slots=True)
class InboxMessage:
    message_id: str
    person_id: str
    title: str
    body: str
    url: str | None
    data: dict[str, str]
    created_at_ms: int
    read_at_ms: int | None

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> InboxMessage:
        return cls(
            message_id=doc["action_id"],
            person_id=doc["person_id"],
            title=doc["title"],
            body=doc["body"],
            url=doc.get("url"),
            data=dict(doc.get("data") or {}),
            created_at_ms=doc["created_at_ms"],
            read_at_ms=doc.get("read_at_ms"),
        )


@dataclass(eq=False)
class Subscription:
    """An async iterator of a person's new inbox messages; `close()` (or leaving `async with`) ends it."""

    person_id: str
    _inbox: InboxChannel
    _queue: asyncio.Queue[InboxMessage | BaseException | None] = field(default_factory=asyncio.Queue)

    def __aiter__(self) -> AsyncIterator[InboxMessage]:
        return self

    async def __anext__(self) -> InboxMessage:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._inbox._unsubscribe(self)
        self._queue.put_nowait(None)

    def end(self, error: BaseException) -> None:
        """End it with `error`, raised to its reader once the messages queued before are read."""
        self._inbox._unsubscribe(self)
        self._queue.put_nowait(error)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _check_person(person_id: object) -> str:
    if not isinstance(person_id, str) or not person_id or "/" in person_id or len(person_id) > 200:
        raise InvalidArgument("person_id", "must be a non-empty id of at most 200 characters without '/'")
    return person_id


class InboxChannel(Channel):
    name = "inapp"

    def __init__(self, store: Store, *, queue_size: int = 100, clock: Any = time.time) -> None:
        self._store = store
        self._queue_size = queue_size
        self._clock = clock
        self._subscribers: dict[str, set[Subscription]] = {}
        self._ready = False

    async def start(self) -> InboxChannel:
        await self._store.ensure_index(COLLECTION, "action_id", unique=True)
        self._ready = True
        return self

    async def send(self, action: Action) -> Outcome:
        try:
            await self.add(action)
        except InvalidArgument as exc:
            return Outcome.failed(f"invalid_{exc.field}", retryable=False)
        except Exception as exc:  # the store being down must become a retryable outcome, not a crash
            return Outcome.failed(f"store_{type(exc).__name__}", retryable=True)
        return Outcome.accepted(provider_id=action.action_id)

    async def add(self, action: Action) -> InboxMessage:
        """Store the action's message in the person's inbox (once) and notify their subscribers."""
        if not self._ready:
            await self.start()
        person_id = _check_person(action.person_id)
        now_ms = int(self._clock() * 1000)
        doc = {
            "person_id": person_id,
            "action_id": action.action_id,
            "title": action.content.heading or "",
            "body": action.content.body,
            "url": action.content.url,
            "data": dict(action.content.data),
            "created_at_ms": now_ms,
            "read_at_ms": None,
        }
        key = f"{person_id}/{_NEVER - now_ms:013d}:{action.action_id}"
        try:
            await self._store.put(COLLECTION, key, doc, expected_version=0)
        except (DuplicateValue, VersionConflict):
            (existing,) = await self._store.find(COLLECTION, "action_id", action.action_id, limit=1)
            return InboxMessage.from_doc(existing.doc)
        message = InboxMessage.from_doc(doc)
        for subscription in list(self._subscribers.get(person_id, ())):
            if subscription._queue.qsize() >= self._queue_size:
                self._unsubscribe(subscription)
                subscription._queue.put_nowait(
                    SubscriberLagged("the inbox subscriber fell behind; list and re-subscribe")
                )
            else:
                subscription._queue.put_nowait(message)
        return message

    async def list(
        self, person_id: str, *, unread_only: bool = False, page_size: int = 50, page_token: str | None = None
    ) -> tuple[list[InboxMessage], str | None]:
        """One page of the person's inbox, newest first, and the token of the next page (None: no more).
        With `unread_only` read messages are left out of the page, so it may hold fewer than `page_size`."""
        _check_person(person_id)
        if not 1 <= page_size <= 500:
            raise InvalidArgument("page_size", f"must be 1-500, got {page_size}")
        page = await self._store.scan(COLLECTION, prefix=f"{person_id}/", cursor=page_token or None, limit=page_size)
        messages = [InboxMessage.from_doc(r.doc) for r in page.records]
        if unread_only:
            messages = [m for m in messages if m.read_at_ms is None]
        return messages, page.next_cursor

    async def mark_read(self, person_id: str, message_ids: list[str]) -> list[str]:
        """Mark these messages read; returns the ids that were unread until now (each is an ``opened``
        outcome: `outcomes.Feedback(message_id, "opened", "inapp")`). An id that is not in this person's
        inbox raises NotFound (naming no id: ids of other people's messages are not to be probed)."""
        _check_person(person_id)
        marked: list[str] = []
        now_ms = int(self._clock() * 1000)
        for message_id in dict.fromkeys(message_ids):
            found = await self._store.find(COLLECTION, "action_id", message_id, limit=1) if message_id else []
            if not found or found[0].doc["person_id"] != person_id:
                raise NotFound("message_ids: a message is not in this person's inbox")
            record = found[0]
            while record.doc.get("read_at_ms") is None:
                try:
                    await self._store.put(
                        COLLECTION, record.key, {**record.doc, "read_at_ms": now_ms}, expected_version=record.version
                    )
                    marked.append(message_id)
                    break
                except VersionConflict:
                    record = await self._store.get(COLLECTION, record.key)  # type: ignore[assignment]
                    if record is None:
                        break
        return marked

    async def forget(self, person_id: str) -> int:
        """Delete the person's whole inbox (a privacy deletion) and end their subscriptions; returns how
        many messages were deleted."""
        _check_person(person_id)
        keys = [record.key async for record in self._store.scan_all(COLLECTION, prefix=f"{person_id}/")]
        for start in range(0, len(keys), 500):
            await self._store.bulk_write([Delete(COLLECTION, key) for key in keys[start : start + 500]])
        for subscription in list(self._subscribers.get(person_id, ())):
            subscription.close()
        return len(keys)

    def subscribe(self, person_id: str) -> Subscription:
        _check_person(person_id)
        subscription = Subscription(person_id, self)
        self._subscribers.setdefault(person_id, set()).add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.person_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.person_id]

    async def close(self) -> None:
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                subscription.close()
