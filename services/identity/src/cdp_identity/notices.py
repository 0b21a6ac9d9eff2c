"""At start, before any event is resolved: every `privacy.deleted` notice in PRIVACY, applied again.

PRIVACY keeps its notices without an age limit, so the stream is the record of who was deleted. Identity
reads it whole, message by message by sequence (`cdp_kit.bus.notices`' way: no consumer, so its
`identity-privacy-<ordinal>` consumer keeps its place), and from each notice takes:

- **the hashes** of a suppressing notice: the person's events are dropped for as long as the notice is in
  PRIVACY (forgotten.py). The in-memory list is rebuilt on every start; identity stores no hash.
- **the persons**: a store restored from a copy taken before a deletion (architecture.md's recovery:
  stop, restore the file with its -wal, start) holds the person again, with their identifiers and links,
  and the consumer of deletions is past the notice. Every person a notice names that the store still holds
  is purged (`IdentityEngine.purge`, idempotent: the same purge as the consumer's, one sweep for all),
  nothing is published, and the WARNING log names how many persons and identifiers and the requests.
  The purged identifiers drop events received before their deletion, as after the consumer's purge.

Identity's NATS user may (`cdp_kit.natsroles`: STREAM.INFO and MSG.GET of a stream it consumes).
"""

from __future__ import annotations

import logging

from cdp.privacy.v1 import privacy_pb2
from cdp_identity.engine import PERSONS, IdentityEngine
from cdp_identity.matching_service import MatchingService
from cdp_identity.privacy import deletion_times
from cdp_kit.bus import subjects
from cdp_kit.bus.notices import read_deletions, requests_named
from cdp_kit.bus.setup import answered

log = logging.getLogger("cdp.identity")

#: Persons looked up in the store at once.
LOOKUP_CHUNK = 1000


async def events_retention(js) -> float:
    """How long EVENTS_RAW keeps an event, in seconds (0: no limit): how long a suppression must drop the
    events received before it. Asked again while a stalled nats-server does not answer (`answered`), as
    every other start-up request is."""
    info = await answered(js, f"stream {subjects.EVENTS_RAW}", lambda: js.stream_info(subjects.EVENTS_RAW))
    return info.config.max_age or 0.0


async def apply_notices(engine: IdentityEngine, matching: MatchingService, js) -> int:
    """Read PRIVACY whole: the suppressing notices' hashes into `engine.forgotten`, and every person a notice
    names that the store still holds purged. The number of persons purged."""
    named: dict[str, privacy_pb2.PrivacyDeleted] = {}
    deletions = await read_deletions(js)
    for notice in deletions:
        engine.forgotten.suppress(notice)
        for person in (notice.person_id, *notice.merged_person_ids):
            if person:
                named[person] = notice
    notices = len(deletions)
    candidates = sorted(named)
    held: list[str] = []
    for start in range(0, len(candidates), LOOKUP_CHUNK):
        chunk = candidates[start : start + LOOKUP_CHUNK]
        found = await engine.store.get_many(PERSONS, chunk)
        held.extend(p for p in chunk if p in found)
    log.info(
        "privacy.deleted read: %d notices, %d suppressed identifier hashes",
        notices,
        len(engine.forgotten),
        extra={"notices": notices, "hashes": len(engine.forgotten), "persons_held": len(held)},
    )
    if not held:
        return 0
    requests = {named[p].request_id: named[p] for p in held}
    purged = await engine.purge(held, also=matching.purge, deleted_at=deletion_times(list(requests.values())))
    await engine.store.erase()
    if matching.store is not engine.store:
        await matching.store.erase()
    text, shown = requests_named(requests)
    log.warning(
        "purged %d persons (%d identifiers) the store still held although privacy.deleted notices name them "
        "(requests %s): a store restored from before their deletion; nothing published",
        len(purged.persons),
        len(purged.identifiers),
        text,
        extra={
            "persons": len(purged.persons),
            "identifiers": len(purged.identifiers),
            "merges": len(purged.merges),
            "requests": len(requests),
            "request_ids": shown,
        },
    )
    return len(purged.persons)
