"""Who a backfill reaches: every person the profile service holds, or, without it, those the connector follows.

`ProfileDirectory` - every live person of the profile service. The profile service has no paged listing
RPC, so the listing is read from its store (`CDP_CRM_PROFILE_STORE_URL`, the `profiles` collection the
training library reads too: one document per person id, a live one holding its `profile` part; a person
merged away or deleted holds none and is skipped). Each page's current fields come from the profile
service itself (`BatchGetProfiles` at `CDP_PROFILE_ADDRESS`, flattened by `cdp_kit.profile_fields`), so
the connector decodes no profile document of its own. Segments come from the connector's view
(`crm_persons`: segments.entered/exited), the only place they are held per person.

`ConnectorView` - the persons the connector has seen change (`crm_persons`), with the fields it keeps:
what a backfill reads when no profile service is configured.

A page whose fields the profile service did not answer for (UNAVAILABLE, DEADLINE_EXCEEDED: far behind,
restarting) raises `Unavailable` with the time to wait; the backfill asks again from its last page
(runs.py). A refusal (any other code) raises `ProfileRefused`: asking again will not help.

Both page through their listing in key order and say, with each page, the last listing key it covered:
a backfill keeps that as its resume point (`after`), so one resumed after a crash reads on from the page
after the last it finished (and reading a page again is harmless: every write is an upsert, what is
unchanged makes no call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_crm.inputs import storable
from cdp_crm.state import PERSONS
from cdp_kit.errors import Unavailable
from cdp_kit.profile_fields import profile_fields
from cdp_kit.storage import Store
from cdp_kit.storage.port import encode_cursor

# The profile service's collection of profiles in its store (cdp_profile.records.PROFILES).
PROFILE_COLLECTION = "profiles"
# Persons per BatchGetProfiles call (the profile service takes at most 500).
FETCH_BATCH = 500

# What the profile service says when it did not answer a call, rather than refused it: far behind under
# load (a read past its deadline), restarting or unreachable, or shedding load. Asked again later, such a
# call may well be answered; any other code (a refused token, a bad request) will be answered the same way.
UNANSWERED = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# Seconds before a call the profile service did not answer is worth asking again.
RETRY_AFTER = 5.0

Fetch = Callable[[Sequence[str]], Awaitable[dict[str, dict[str, Any]]]]
# person id -> the identifiers the profile holds for them ("type:value"), by the profile service's
# BatchGetProfiles: where a person came from a CRM record, its id is one of them.
Identifiers = Callable[[Sequence[str]], Awaitable[dict[str, list[str]]]]


@dataclass
class Person:
    person_id: str
    fields: dict[str, Any]
    segments: set[str] = field(default_factory=set)
    stamp: int = 0  # the connector's stream position for the person (0: never seen change)


class People(Protocol):
    name: str

    async def count(self) -> int: ...

    def pages(self, size: int, after: str | None = None) -> AsyncIterator[tuple[list[Person], str]]:
        """Pages of up to `size` persons listed after the key `after`, each with its last listing key."""
        ...


class ConnectorView:
    name = "connector"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def count(self) -> int:
        return await self.store.count(PERSONS)

    async def pages(self, size: int, after: str | None = None) -> AsyncIterator[tuple[list[Person], str]]:
        cursor = encode_cursor(after) if after else None
        while True:
            page = await self.store.scan(PERSONS, cursor=cursor, limit=size)
            if page.records:
                # The documents are this page's own (decoded for it): read as they are, not copied.
                yield (
                    [Person(r.key, r.doc.get("fields", {}), set(r.doc.get("segments", ())), r.doc.get("stamp", 0))
                     for r in page.records],
                    page.records[-1].key,
                )  # fmt: skip
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


class ProfileDirectory:
    name = "profiles"

    def __init__(self, profiles: Store, fetch: Fetch, connector: Store) -> None:
        self.profiles = profiles  # the profile service's store, read only
        self.fetch = fetch
        self.connector = connector

    async def count(self) -> int:
        return await self.profiles.count(PROFILE_COLLECTION)  # merged-away persons included: an upper bound

    async def pages(self, size: int, after: str | None = None) -> AsyncIterator[tuple[list[Person], str]]:
        cursor = encode_cursor(after) if after else None
        while True:
            page = await self.profiles.scan(PROFILE_COLLECTION, cursor=cursor, limit=size)
            ids = [r.key for r in page.records if "profile" in r.doc]
            if ids:
                fields = await self.fetch(ids)
                views = await self.connector.get_many(PERSONS, ids)
                persons = []
                for pid in ids:
                    if pid not in fields:
                        continue  # deleted since the listing was read
                    view = views.get(pid)
                    doc = view.doc if view is not None else {}
                    persons.append(Person(pid, fields[pid], set(doc.get("segments", [])), doc.get("stamp", 0)))
                yield persons, page.records[-1].key
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


class ProfileRefused(Exception):
    """The profile service refused a call (a code other than `UNANSWERED`): asking again will not help."""


def unanswered(exc: BaseException) -> bool:
    """Whether `exc` says the profile service did not answer (`Unavailable`, from `_batch_get`; a timeout or
    a connection error from another reader), so the same call may succeed later."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in UNANSWERED
    return isinstance(exc, Unavailable | TimeoutError | ConnectionError)


def _batch_get(channel: grpc.aio.Channel, token: str, timeout: float, read: Callable[[Any], Any], retry_after: float):
    """Person ids -> `read(profile)`, through the profile service's BatchGetProfiles, FETCH_BATCH at a time;
    `Unavailable(retry_after)` when the service does not answer (`UNANSWERED`), `ProfileRefused` when it
    refuses."""
    stub = profile_pb2_grpc.ProfileServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def get(person_ids: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for start in range(0, len(person_ids), FETCH_BATCH):
            request = profile_pb2.BatchGetProfilesRequest(person_ids=list(person_ids[start : start + FETCH_BATCH]))
            try:
                answer = await stub.BatchGetProfiles(request, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in UNANSWERED:
                    raise Unavailable(f"profile service: {exc.code().name}", retry_after=retry_after) from None
                raise ProfileRefused(f"profile service: {exc.code().name}") from None
            for profile in answer.profiles:
                found[profile.person_id] = read(profile)
        return found

    return get


def profile_fetch(
    channel: grpc.aio.Channel, token: str, *, timeout: float = 30.0, retry_after: float = RETRY_AFTER
) -> Fetch:
    """`Fetch` through the profile service's BatchGetProfiles: person id -> flat fields."""
    # What the store cannot keep reads as gone, as in a profile change (inputs.storable).
    return _batch_get(channel, token, timeout, lambda profile: storable(profile_fields(profile)), retry_after)


def profile_identifiers(
    channel: grpc.aio.Channel, token: str, *, timeout: float = 30.0, retry_after: float = RETRY_AFTER
) -> Identifiers:
    """`Identifiers` through the profile service's BatchGetProfiles: person id -> their identifiers."""
    return _batch_get(channel, token, timeout, lambda profile: list(profile.identifiers), retry_after)
