"""`privacy.deleted` (stream PRIVACY) → purge the person from the identity graph, the match pool and the
review queue.

Every replica follows the subject with its own durable consumer (`identity-privacy-<ordinal>`): the
store is shared, but each replica's in-memory graph may hold the person, so each one purges its cache
and sweeps the store itself. The purges are idempotent and version-checked, so replicas racing on the
same records converge: the loser's write fails, its cache is reloaded, and the redelivered request
finds nothing left. A message is acknowledged only after the purge is durable.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from cdp.privacy.v1 import privacy_pb2
from cdp_identity.engine import IdentityEngine
from cdp_identity.matching_service import MatchingService
from cdp_kit.bus import Delivery

log = logging.getLogger("cdp.identity")


def identifier_hash(key: str) -> str:
    """How privacy.deleted named an identifier before keyed hashes: lowercase hex SHA-256 of its normalised
    key (`cdp_kit.identifier_hash`)."""
    return hashlib.sha256(key.encode()).hexdigest()


class PrivacyHandler:
    def __init__(self, engine: IdentityEngine, matching: MatchingService) -> None:
        self.engine = engine
        self.matching = matching

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
        purged = await self.engine.purge(person_ids, also=self.matching.purge)
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
