"""`privacy.deleted` (stream PRIVACY) → purge the person from the identity graph, the match pool and the
review queue.

Every replica follows the subject with its own durable consumer (`identity-privacy-<ordinal>`): the
store is shared, but each replica's in-memory graph may hold the person, so each one purges its cache
and sweeps the store itself. The purges are idempotent and version-checked, so replicas racing on the
same records converge: the loser's write fails, its cache is reloaded, and the redelivered request
finds nothing left. A message is acknowledged only after the purge is durable.

From then on the person's events are dropped (forgotten.py): the notice's hashes when it suppresses, and
the purged identifiers for events received before the deletion. `notices.py` does both again at start.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from cdp.privacy.v1 import privacy_pb2
from cdp_identity.engine import IdentityEngine
from cdp_identity.matching_service import MatchingService
from cdp_kit.bus import Delivery
from cdp_kit.timestamps import to_seconds

log = logging.getLogger("cdp.identity")


def identifier_hash(key: str) -> str:
    """How privacy.deleted named an identifier before keyed hashes: lowercase hex SHA-256 of its normalised
    key (`cdp_kit.identifier_hash`)."""
    return hashlib.sha256(key.encode()).hexdigest()


#: Seconds between two sweeps of the received-before entries older than EVENTS_RAW's age limit.
EXPIRE_EVERY = 3600.0


def deletion_times(requests: Sequence[privacy_pb2.PrivacyDeleted]) -> dict[str, int]:
    """Each person the notices name (and those merged into it) -> the latest notice's time, epoch ms (now
    for a notice without one)."""
    now = int(time.time() * 1000)
    times: dict[str, int] = {}
    for request in requests:
        at = int(to_seconds(request.at) * 1000) if request.HasField("at") else now
        for person in (request.person_id, *request.merged_person_ids):
            if person:
                times[person] = max(times.get(person, at), at)
    return times


class PrivacyHandler:
    def __init__(self, engine: IdentityEngine, matching: MatchingService, *, events_max_age: float = 0.0) -> None:
        self.engine = engine
        self.matching = matching
        # EVENTS_RAW's age limit (seconds; 0: none): a received-before entry older than it drops nothing.
        self.events_max_age = events_max_age
        self._expired = time.monotonic()

    async def expire(self) -> None:
        if self.events_max_age <= 0 or time.monotonic() - self._expired < EXPIRE_EVERY:
            return
        self._expired = time.monotonic()
        await self.engine.expire_forgotten(self.events_max_age)

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `privacy.deleted`: one purge for the whole batch (one store sweep)."""
        requests: list[privacy_pb2.PrivacyDeleted] = []
        for delivery in batch:
            try:
                request = privacy_pb2.PrivacyDeleted.FromString(delivery.data)
            except DecodeError as exc:
                delivery.reject("invalid_privacy_request", f"not a cdp.privacy.v1.PrivacyDeleted: {exc}")
                continue
            if not request.person_id:
                delivery.reject("invalid_privacy_request", f"request {request.request_id!r}: person_id is empty")
                continue
            requests.append(request)
        if not requests:
            return
        person_ids = [p for request in requests for p in (request.person_id, *request.merged_person_ids)]
        # Before the purge: its events may be resolving now, and from the purge on they are dropped.
        for request in requests:
            self.engine.forgotten.suppress(request)
        purged = await self.engine.purge(person_ids, also=self.matching.purge, deleted_at=deletion_times(requests))
        await self.expire()
        # The purge is durable: now leave no bytes of it in the store's files either.
        await self.engine.store.erase()
        if self.matching.store is not self.engine.store:
            await self.matching.store.erase()
        # The hashes are the identifiers the profile saw. Only those the purged persons own are removed
        # (one the graph gives to someone else is that person's); the count tells how many that was. Keyed
        # hashes (a notice with identifier_hash_key_id) are the collector's to match, with a key identity
        # does not hold: only a notice made before keyed hashes (plain SHA-256) is counted.
        listed = {h.lower() for request in requests for h in request.identifier_hashes}
        plain = {h.lower() for r in requests if not r.identifier_hash_key_id for h in r.identifier_hashes}
        listed_purged = sum(identifier_hash(key) in plain for key in purged.identifiers)
        log.info(
            "privacy deletion applied",
            extra={
                "request_ids": [request.request_id for request in requests],
                "persons": len(purged.persons),
                "identifiers": len(purged.identifiers),
                "listed_identifiers": len(listed),
                "listed_identifiers_purged": listed_purged,
                "merges": len(purged.merges),
                "records_rewritten": len(purged.rewritten_persons) + len(purged.rewritten_identifiers),
            },
        )
