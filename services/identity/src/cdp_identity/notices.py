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

import asyncio
import logging
from collections.abc import Callable

from nats.js.errors import NotFoundError

from cdp.privacy.v1 import privacy_pb2
from cdp_identity.engine import PERSONS, IdentityEngine
from cdp_identity.matching_service import MatchingService
from cdp_identity.privacy import deletion_times
from cdp_kit.bus.subjects import PRIVACY, PRIVACY_DELETED

log = logging.getLogger("cdp.identity")

#: Messages of PRIVACY asked for at once (each a small get by sequence), as `cdp_kit.bus.notices`.
READ_WINDOW = 256
#: Persons looked up in the store at once.
LOOKUP_CHUNK = 1000
#: Request ids named in the log line (the rest counted).
LOGGED_REQUESTS = 50


async def read_deletions(js, each: Callable[[privacy_pb2.PrivacyDeleted], None]) -> int:
    """Call `each` with every `privacy.deleted` notice in PRIVACY, in stream order; how many there were."""
    try:
        state = (await js.stream_info(PRIVACY)).state
    except NotFoundError:
        return 0
    first, last = state.first_seq or 0, state.last_seq or 0

    async def get(seq: int) -> bytes | None:
        try:
            message = await js.get_msg(PRIVACY, seq=seq)
        except NotFoundError:  # purged by an operator
            return None
        return message.data if message.subject == PRIVACY_DELETED else None

    read = 0
    seq = max(first, 1)
    while first and seq <= last:
        window = range(seq, min(last, seq + READ_WINDOW - 1) + 1)
        for number, data in zip(window, await asyncio.gather(*(get(s) for s in window)), strict=True):
            if data is None:
                continue
            try:
                notice = privacy_pb2.PrivacyDeleted.FromString(data)
            except Exception:
                log.error("privacy.deleted message %d is not a PrivacyDeleted and was skipped", number)
                continue
            read += 1
            each(notice)
        seq = window.stop
    return read


async def apply_notices(engine: IdentityEngine, matching: MatchingService, js) -> int:
    """Read PRIVACY whole: the suppressing notices' hashes into `engine.forgotten`, and every person a notice
    names that the store still holds purged. The number of persons purged."""
    named: dict[str, privacy_pb2.PrivacyDeleted] = {}

    def each(notice: privacy_pb2.PrivacyDeleted) -> None:
        engine.forgotten.suppress(notice)
        for person in (notice.person_id, *notice.merged_person_ids):
            if person:
                named[person] = notice

    notices = await read_deletions(js, each)
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
    shown = sorted(requests)[:LOGGED_REQUESTS]
    more = f" and {len(requests) - len(shown)} more" if len(requests) > len(shown) else ""
    log.warning(
        "purged %d persons (%d identifiers) the store still held although privacy.deleted notices name them "
        "(requests %s%s): a store restored from before their deletion; nothing published",
        len(purged.persons),
        len(purged.identifiers),
        ", ".join(shown),
        more,
        extra={
            "persons": len(purged.persons),
            "identifiers": len(purged.identifiers),
            "merges": len(purged.merges),
            "requests": len(requests),
            "request_ids": shown,
        },
    )
    return len(purged.persons)
