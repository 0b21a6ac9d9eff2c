"""A person's data on request: the export (everything held, following merges) and the deletion.

A deletion is one group commit: the timeline entries of the person and of every person merged into
it are deleted; the person and those absorbed persons become bare markers (`deleted_at`, no personal
data) that drop events already in flight; the request's result and its `privacy.deleted` notice
(person ids, and the hashed identifiers only when the person is suppressed) are stored under the request
id, so a repeated request answers the same. The identifiers are hashed with the platform's secret key
(HMAC-SHA-256, `cdp_kit.identifier_hash`): the notice names the key by its id, and without the key a
hash cannot be tested against a list of emails or phone numbers.
Once durable, the deletion is completed (`complete`): the notice is published on `privacy.deleted`
(identity, orchestration and the CRM connector act on it), the person's `removed` change on
`profiles.changed` (scoring and segmentation drop what they hold), and the store erases the bytes the
deleted records left in its files. Until all of that is done the request stays pending: when JetStream
does not take the messages the request answers UNAVAILABLE, and the deletion is completed by itself as soon
as it does (a retry every few seconds, and at start-up), or by the request repeated with the same id, which
answers once it is complete.

The partitioned engine keeps each batch's change messages in its outbox until they are published, and
those may hold the person's values. After the deletion's commit, every partitioned stream is brought to
a quiescent point (everything applied is durable, published and acknowledged), so every outbox record
left is published: they are deleted before the store erases. The `removed` change is published only at
that point too: a change of the person applied before the deletion and not yet stored by JetStream (in
flight, or retried through an outage) would otherwise reach profiles.changed after it, and scoring and
segmentation, which drop the person on `removed`, would take them up again from its values. The wait is
bounded (`QUIET_WAIT`): past it the request answers UNAVAILABLE and the completion is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import OutMessage
from cdp_kit.bus.subjects import PRIVACY_DELETED
from cdp_kit.errors import AlreadyExists, Unavailable
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.storage import Delete, Put
from cdp_kit.timestamps import from_seconds, to_seconds
from cdp_profile.domain import ProfileChange
from cdp_profile.domain.profile import SHARED_IDENTIFIER_TYPES
from cdp_profile.records import DELETIONS, SCORES, TIMELINE, timeline_prefix
from cdp_profile.timeline import row_keys

if TYPE_CHECKING:
    from cdp_profile.engine import ProfileEngine

log = logging.getLogger("cdp.profile.privacy")

#: Identifier types a suppression leaves out: they name a browser or a device, which people share (the
#: record's bound forgets them first, so the person's own identifiers a suppression hashes stay listed).
SHARED_TYPES = SHARED_IDENTIFIER_TYPES

#: Attempts at the store's erase, 0.1 s apart, before it is left to the store's next writes.
ERASE_TRIES = 10

#: Seconds between attempts to complete the deletions JetStream did not take.
RETRY_EVERY = 2.0

#: Seconds a completion waits for the changes applied before it to be stored by JetStream (module docstring).
QUIET_WAIT = 5.0


def _same_request(doc: dict[str, Any], request_id: str, person_id: str, suppress: bool) -> None:
    """A repeated request id must repeat its deletion: the same person (or one merged into it) and mode.
    Another person's deletion under a used id answered the first one's result, success, and deleted
    nobody: a support engineer reusing an id saw every service acknowledge and the person still there."""
    result = doc["result"]
    merged = doc.get("merged")
    if merged is None and doc.get("notice"):
        merged = list(privacy_pb2.PrivacyDeleted.FromString(bytes.fromhex(doc["notice"])).merged_person_ids)
    persons = {result["person_id"], *(merged or ())}
    if person_id in persons and bool(result["suppressed"]) == suppress:
        return
    mode = "with suppression" if result["suppressed"] else "without suppression"
    raise AlreadyExists(
        f"request_id {request_id!r} was used for the deletion of person {result['person_id']} ({mode}); "
        "repeating a request must name the same person and mode: give this deletion a new request id",
        reason="request_id_reused",
    )


class Privacy:
    def __init__(self, engine: ProfileEngine, hash_keys: IdentifierHashKeys | None = None) -> None:
        self._engine = engine
        # The current key hashes new notices' identifiers (default: the published development key).
        self.hash_keys = hash_keys or IdentifierHashKeys.for_development()
        self._completing = asyncio.Lock()
        self._retrying = False

    async def export(self, person_id: str) -> tuple[str, dict[str, Any]]:
        """Everything held about a person (following merges): its id and the export document."""
        profile = await self._engine.profile(person_id)
        return profile.person_id, profile.export()

    async def delete(self, person_id: str, *, suppress: bool, request_id: str | None) -> dict[str, Any]:
        engine = self._engine
        hot, store = engine.hot, engine.store
        request_id = request_id or uuid.uuid4().hex
        done = await store.get(DELETIONS, request_id)
        if done is not None:
            _same_request(done.doc, request_id, person_id, suppress)
            if done.doc.get("pending"):
                await self.complete()  # UNAVAILABLE again while JetStream still does not take it
            return done.doc["result"]
        profile = await engine.profile(person_id)
        person = profile.person_id
        engine.owned_profile_or_fail(person)
        view = profile.view(now=engine.clock())
        origins = [person, *view.merged_from]
        hash_key = self.hash_keys.current
        identifiers = profile.identifiers()
        # A suppression names the identifiers that are the person's own: a browser's or a device's id may be
        # another person's too (a shared tablet, a kiosk quarantined by identity, a visitor linked through
        # one), and suppressing it would drop their events for good (PRIVACY keeps the notice for ever).
        hashes = sorted(hash_key.hash(k) for k in identifiers if k.partition(":")[0] not in SHARED_TYPES)
        ops: list[Put | Delete] = []
        # Every row of its parts' timelines: those stored (pages, and single entries of older releases) and
        # those this replica wrote that may not have landed yet. The head goes with the record.
        timeline_keys = row_keys(profile.parts.values())
        for origin in origins:
            async for record in store.scan_all(TIMELINE, prefix=timeline_prefix(origin)):
                timeline_keys.add(record.key)
        ops.extend(Delete(TIMELINE, key) for key in sorted(timeline_keys))
        timeline_events = len(profile.events(limit=1_000_000)[0])
        now = engine.clock()
        # Absorbed persons' tombstones and the person itself become bare markers: no personal data,
        # just enough to drop events that were already in flight.
        hot.profiles.pop(person, None)
        for origin in origins:
            hot.tombstones.pop(origin, None)
            hot.deleted[origin] = now
            ops.append(hot.versioned_put(origin, {"deleted_at": now, "request_id": request_id}))
            ops.append(Delete(SCORES, origin))
        result = {
            "request_id": request_id,
            "person_id": person,
            "identifiers": len(identifiers),
            "timeline_events": timeline_events,
            "suppressed": suppress,
        }
        notice = privacy_pb2.PrivacyDeleted(
            request_id=request_id,
            person_id=person,
            # Only a suppression needs them (the collector matches new events against them), and PRIVACY
            # keeps its messages without an age limit: a plain deletion leaves no hash of the person there.
            identifier_hashes=hashes if suppress else [],
            identifier_hash_key_id=hash_key.id if suppress else "",
            suppress=suppress,
            at=from_seconds(now),
            merged_person_ids=origins[1:],
        )
        ops.append(
            Put(DELETIONS, request_id, {"result": result, "notice": notice.SerializeToString().hex(), "pending": True})
        )
        await engine.commit({}, ops=ops)
        try:
            await self.complete(request_id)
        except Unavailable:
            log.warning(
                "person deleted, not yet published; retrying", extra={"person": person, "request_id": request_id}
            )
            self.retry_later()
            raise
        log.info("person deleted", extra={"person": person, "request_id": request_id, "suppress": suppress})
        return result

    async def complete(self, request_id: str | None = None) -> None:
        """Complete every deletion committed and not yet complete: its notice published on privacy.deleted, the
        person's `removed` change on profiles.changed (both again after a failure: JetStream drops repeats by
        id), then the outboxes scrubbed and the files erased. Unavailable when JetStream did not store them.
        `request_id`: a deletion just committed, completed whether or not the index read lists it yet."""
        engine = self._engine
        async with self._completing:
            # Only the unfinished ones: the collection keeps every request's result for idempotency.
            pending = await engine.store.find(DELETIONS, "pending", True, limit=1000)
            if request_id is not None and all(record.key != request_id for record in pending):
                # Read by key: a deletion that answered success without publishing must never happen.
                just = await engine.store.get(DELETIONS, request_id)
                if just is not None and just.doc.get("pending"):
                    pending = [*pending, just]
            if not pending:
                return
            published = []
            for record in pending:
                # The notice at once: the collector suppresses from it, identity drops late events by it.
                data = bytes.fromhex(record.doc["notice"])
                results = await engine.publisher.publish_batch(
                    [OutMessage(subject=PRIVACY_DELETED, payload=data, msg_id=f"privacy:{record.key}")]
                )
                if not results[0].ok:
                    raise Unavailable(
                        f"privacy.deleted not stored by JetStream ({results[0].error}); retry the request"
                    )
                published.append((record, privacy_pb2.PrivacyDeleted.FromString(data), results[0].seq))
            async with self._quiet():  # every change applied before the deletions is on profiles.changed
                for record, notice, seq in published:
                    gone = {notice.person_id: ProfileChange(person_id=notice.person_id, removed=True)}
                    # The same message (and id) each time: its time is the notice's.
                    try:
                        await engine.publish(engine.messages(gone, cause="delete", now=to_seconds(notice.at)))
                    except Unavailable as exc:
                        raise Unavailable(f"the deletion's removed change: {exc.message}; retry the request") from None
                    await engine.store.put(
                        DELETIONS,
                        record.key,
                        # The persons it covers stay with the result (a repeat may name a merged one), and the
                        # notice (ids and keyed hashes, no value): PRIVACY restored older than this store lacks
                        # it, and it is published again from here at start (notices.republish_missing).
                        {
                            "result": record.doc["result"],
                            "published": True,
                            "merged": list(notice.merged_person_ids),
                            "notice": record.doc["notice"],
                            "seq": seq,  # where PRIVACY stored it: a stream older than that lost it
                        },
                    )
                await self.scrub_outboxes()
            await self._erase()

    @contextlib.asynccontextmanager
    async def _quiet(self):
        """Every partitioned stream held at a quiescent point (all applied is durable and published), waited
        for at most QUIET_WAIT s: past it Unavailable, and the pipelines go on."""
        async with contextlib.AsyncExitStack() as quiet:
            try:
                async with asyncio.timeout(QUIET_WAIT):
                    for stream in self._engine.streams:
                        await quiet.enter_async_context(stream.quiescent())
            except TimeoutError:
                raise Unavailable(
                    "the person's earlier changes are not yet stored by JetStream; retry the request"
                ) from None
            yield

    async def erase_files(self) -> None:
        """The store's erase after records of deleted persons were written (also `notices.py`)."""
        await self._erase()

    async def _erase(self) -> None:
        """The store's erase (no bytes of the deleted persons left in its files), tried again for a second
        while readers keep it from finishing (SQLite's write-ahead log); the store's next writes finish it."""
        for _ in range(ERASE_TRIES):
            if await self._engine.store.erase():
                return
            await asyncio.sleep(0.1)
        log.warning("store erase left to the next writes: readers held the write-ahead log")

    def retry_later(self) -> None:
        """Complete the pending deletions in the background, every RETRY_EVERY s until it succeeds."""
        if self._retrying:
            return
        self._retrying = True

        async def retry() -> None:
            try:
                while True:
                    await asyncio.sleep(RETRY_EVERY)
                    try:
                        await self.complete()
                    except Unavailable:
                        continue
                    log.info("pending deletions published")
                    return
            finally:
                self._retrying = False

        self._engine.spawn(retry(), "profile deletions")

    async def scrub_outboxes(self) -> None:
        """Delete the partitioned engines' outbox records once they are published: they may hold the
        change messages of a person just deleted."""
        engine = self._engine
        async with contextlib.AsyncExitStack() as quiet:
            for stream in engine.streams:
                await quiet.enter_async_context(stream.quiescent())
            # Quiescent: every batch applied is durable and published, so no record left is unpublished.
            ops = []
            for outbox in sorted({outbox for stream in engine.streams for outbox in stream.outboxes}):
                ops.extend([Delete(outbox, record.key) async for record in engine.store.scan_all(outbox)])
            if ops:
                await engine.commit({}, ops=ops)
