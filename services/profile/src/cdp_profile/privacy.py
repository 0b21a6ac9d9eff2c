"""A person's data on request: the export (everything held, following merges) and the deletion.

A deletion is one group commit: the timeline entries of the person and of every person merged into
it are deleted; the person and those absorbed persons become bare markers (`deleted_at`, no personal
data) that drop events already in flight; the request's result and its `privacy.deleted` notice
(hashed identifiers only) are stored under the request id, so a repeated request answers the same.
Once durable, the notice is published (again at start-up if that failed) and the store erases the
bytes the deleted records left in its files.

Checkpoints keep the change messages of their batch until those are published (see `records`), and
those may hold the person's values. A partition whose messages are already published gets a clean
checkpoint in the deletion's own commit; one that is between its commit and its publish (or whose
publish failed) is scrubbed right after it publishes (`CheckpointScrub`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import OutMessage
from cdp_kit.bus.subjects import PRIVACY_DELETED
from cdp_kit.errors import Unavailable
from cdp_kit.storage import Delete, Put
from cdp_kit.timestamps import from_seconds
from cdp_profile.domain import ProfileChange
from cdp_profile.records import CHECKPOINTS, DELETIONS, TIMELINE, encode_checkpoint, timeline_key, timeline_prefix

if TYPE_CHECKING:
    from cdp_profile.engine import ProfileEngine

log = logging.getLogger("cdp.profile.privacy")


def identifier_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class CheckpointScrub:
    """Which partitions' checkpoints still hold change messages a deletion wants gone."""

    def __init__(self) -> None:
        self.publishing: set[str] = set()  # partitions between their commit and their publish
        self.pending: set[str] = set()  # checkpoints to clear of change messages once those are published

    @contextlib.contextmanager
    def between_commit_and_publish(self, subject: str) -> Iterator[None]:
        self.publishing.add(subject)
        try:
            yield
        finally:
            self.publishing.discard(subject)

    def on_deletion(self, applied: Mapping[str, int], unpublished: Collection[str], *, now: float) -> list[Put]:
        """Clean checkpoints for the partitions whose messages are published; the others are marked."""
        clean = [
            Put(CHECKPOINTS, subject, encode_checkpoint(seq, now))
            for subject, seq in applied.items()
            if subject not in self.publishing and subject not in unpublished
        ]
        self.pending.update(self.publishing, unpublished)
        return clean

    def take(self, subject: str) -> bool:
        """Whether the partition's checkpoint is to be scrubbed now (its messages are published)."""
        if subject in self.pending:
            self.pending.discard(subject)
            return True
        return False


class Privacy:
    def __init__(self, engine: ProfileEngine) -> None:
        self._engine = engine
        self.scrub = CheckpointScrub()

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
            return done.doc["result"]
        profile = await engine.profile(person_id)
        person = profile.person_id
        engine.owned_profile_or_fail(person)
        view = profile.view(now=engine.clock())
        origins = [person, *view.merged_from]
        hashes = sorted(identifier_hash(k) for k in profile.identifiers())
        ops: list[Put | Delete] = []
        timeline_keys = set()
        for origin in origins:
            async for record in store.scan_all(TIMELINE, prefix=timeline_prefix(origin)):
                timeline_keys.add(record.key)
        timeline_keys.update(timeline_key(e) for e in profile.events(limit=1_000_000)[0])
        ops.extend(Delete(TIMELINE, key) for key in sorted(timeline_keys))
        now = engine.clock()
        # Absorbed persons' tombstones and the person itself become bare markers: no personal data,
        # just enough to drop events that were already in flight.
        hot.profiles.pop(person, None)
        for origin in origins:
            hot.tombstones.pop(origin, None)
            hot.deleted[origin] = now
            ops.append(hot.versioned_put(origin, {"deleted_at": now, "request_id": request_id}))
        result = {
            "request_id": request_id,
            "person_id": person,
            "identifiers": len(hashes),
            "timeline_events": len(timeline_keys),
            "suppressed": suppress,
        }
        notice = privacy_pb2.PrivacyDeleted(
            request_id=request_id,
            person_id=person,
            identifier_hashes=hashes,
            suppress=suppress,
            at=from_seconds(now),
            merged_person_ids=origins[1:],
        )
        ops.append(
            Put(DELETIONS, request_id, {"result": result, "notice": notice.SerializeToString().hex(), "pending": True})
        )
        ops.extend(self.scrub.on_deletion(engine.applied, engine.unpublished, now=now))
        gone = ProfileChange(person_id=person, removed=True)
        messages = engine.messages({person: gone}, cause="delete", now=now)
        await engine.commit({}, ops=ops)
        await self.publish_deletions()
        await engine.publish(None, messages)
        await store.erase()  # the deletion is durable: no bytes of the person left in the files
        log.info("person deleted", extra={"person": person, "request_id": request_id, "suppress": suppress})
        return result

    async def publish_deletions(self) -> None:
        """Publish privacy.deleted notices written but not yet published, then drop the hashes."""
        engine = self._engine
        # Only the unpublished ones: the collection keeps every request's result for idempotency.
        for record in await engine.store.find(DELETIONS, "pending", True, limit=1000):
            notice = record.doc["notice"]
            results = await engine.publisher.publish_batch(
                [OutMessage(subject=PRIVACY_DELETED, payload=bytes.fromhex(notice), msg_id=f"privacy:{record.key}")]
            )
            if results[0].ok:
                await engine.store.put(DELETIONS, record.key, {"result": record.doc["result"], "published": True})
            else:
                raise Unavailable(f"privacy.deleted not stored by JetStream ({results[0].error}); retry the request")

    async def scrub_checkpoint(self, subject: str) -> None:
        """A deletion came while this partition's change messages were kept for publishing: now that they
        are published, the checkpoint forgets them (they may hold the deleted person's values)."""
        if self.scrub.take(subject):
            engine = self._engine
            doc = encode_checkpoint(engine.applied.get(subject, 0), engine.clock())
            await engine.commit({}, ops=[Put(CHECKPOINTS, subject, doc)])
            await engine.store.erase()
