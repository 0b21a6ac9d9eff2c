"""From validated events to durable JetStream messages, shared by the gRPC and HTTP front doors.

A request's events go to `events.raw.<p>`, p = partition of each event's user_id (else anonymous_id): one
message per partition the request touches (`cdp_kit.bus.rawevents`). A partition that gets one event of
the request gets it alone, with `Nats-Msg-Id = <source>:<message_id>`, as before batches existed; one that
gets several gets them in one `EventBatch` message, its `Nats-Msg-Id` a digest of their ids. So a request
retried as it was sent stores every event once (JetStream drops the copies), and a retry grouped otherwise
is applied once downstream (identity and profile are idempotent on each event's id). An event whose id
came earlier in the same request is not stored again: it is answered as a duplicate, as JetStream answered
when each event was its own message.

The caller hears "accepted" only for events JetStream acknowledged; if any valid event of a request could
not be stored, the whole request fails with Unavailable and the client retries it - already stored events
then come back as duplicates, nothing is stored twice.

Each event is stamped with its source's trust (`Event.source_trust`, sources.py `trust_of`) for identity,
and context.userHash is taken out of it first: a hash is checked, never stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cdp.events.v1 import events_pb2
from cdp_collector.domain import partition_key
from cdp_collector.sources import CLIENT, SERVER, Source, trust_of
from cdp_kit.bus import OutMessage, Partitioner, Publisher, PubResult, rawevents, subjects
from cdp_kit.errors import Unavailable
from cdp_kit.telemetry import Telemetry

# Partitions of the persons seen lately, kept (`Partitioner`): the same persons send event after event, and
# FNV-1a in Python was about a twentieth of the collector's CPU. Bounded: past this many keys it starts again.
PARTITION_CACHE_KEYS = 100_000

#: How long after JetStream last refused to store an event (its answer an error: a full disk, a stream at
#: its limits; or no stream for the subject at all) the collector reports not ready (`/readyz`). A replica that is not ready gets no traffic,
#: so it cannot learn from a store that the server writes again: it reports ready again this long after
#: the last refusal, and the next refused request starts the window again.
REFUSALS_KEEP_UNREADY = 10.0

#: The most event bytes in one `events.raw` message of several events. A request's body is at most 500 KB
#: (Segment's limit), so a partition's share of one fits in one or two messages; the server's own
#: max_payload (1 MB by default) bounds it too, less BATCH_HEADROOM_BYTES for the headers.
MAX_BATCH_MESSAGE_BYTES = 256 * 1024
#: Ids of the events this replica saw stored in the stream's duplicate window, at most this many (~30 MB):
#: a retry its client grouped otherwise (analytics.js puts a failed batch's events back in its queue with
#: newer ones) then carries other messages than the first try, which JetStream would store again; its
#: events this replica stored are answered "duplicate" and not published. A retry that reaches another
#: replica is stored again, and applied once downstream.
RECENT_IDS = 100_000
BATCH_HEADROOM_BYTES = 8 * 1024


@dataclass(slots=True)
class Stored:
    seq: int
    duplicate: bool


# An event whose id came earlier in the same request: answered as that event is, a duplicate.
REPEATED = Stored(0, True)


class Ingestor:
    def __init__(
        self, publisher: Publisher, partitions: int, telemetry: Telemetry, *, duplicate_window: float = 600.0
    ) -> None:
        self.publisher = publisher
        self.partitions = partitions
        self.duplicate_window = duplicate_window
        # Event id -> (its position, when this replica saw it stored), oldest first, at most RECENT_IDS.
        self._recent: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._partition = Partitioner(partitions, limit=PARTITION_CACHE_KEYS)
        self._subjects = tuple(subjects.events_raw(p) for p in range(partitions))
        self._refused_at: float | None = None  # monotonic time of the last refusal not followed by a store
        self._events = telemetry.meter.create_counter(
            "cdp.collector.events", unit="{event}", description="events received, by transport, source and outcome"
        )

    def count(self, n: int, *, transport: str, source: str, outcome: str) -> None:
        if n:
            self._events.add(n, {"transport": transport, "source": source, "outcome": outcome})

    def refusing(self) -> bool:
        """True while JetStream's last answer to a store was a refusal, less than REFUSALS_KEEP_UNREADY ago."""
        return self._refused_at is not None and time.monotonic() - self._refused_at < REFUSALS_KEEP_UNREADY

    def to_message(self, event: events_pb2.Event) -> OutMessage:
        return OutMessage(
            self._subjects[self._partition(partition_key(event))],
            event.SerializeToString(),
            f"{event.source_id}:{event.message_id}",
        )

    def messages(self, events: Sequence[events_pb2.Event], source: Source | None = None) -> list[OutMessage]:
        """What `store` publishes for `events` (each stamped with `source`'s trust; None: left as the
        event has it), as if no id had been seen stored before."""
        return self._plan(events, source, None)[0]

    def _plan(
        self, events: Sequence[events_pb2.Event], source: Source | None, now: float | None
    ) -> tuple[list[OutMessage], list[int], list[str], dict[int, Stored]]:
        """The messages; for each event the index of the message that holds it (-1: none) and its id; and
        the events answered without a message of their own: an id seen stored lately (`_recent`, when
        `now` is given) or earlier in this request (its answer is the earlier event's, filled in by
        `store`). One pass, `trust_of`, `partition_key` and `to_message` inlined (per event)."""
        partition = self._partition
        recent = self._recent if now is not None else None
        oldest = (now or 0.0) - self.duplicate_window
        # An event without context.extra has no userHash to take out, and its trust is its source's kind's
        # (`trust_of` for a server source, or a client one without identity_secret): set without the call.
        plain = None if source is None else _plain_trust(source)
        groups: dict[int, tuple[list[bytes], list[str], list[int]]] = {}
        ids: list[str] = []
        seen: set[str] = set()
        answered: dict[int, Stored] = {}
        for index, event in enumerate(events):
            if plain is not None and not event.context.HasField("extra"):
                event.source_trust = plain
            elif source is not None:
                trust_of(source, event)
            event_id = f"{event.source_id}:{event.message_id}"
            ids.append(event_id)
            if event_id in seen:
                answered[index] = REPEATED
                continue
            seen.add(event_id)
            if recent:
                known = recent.get(event_id)
                if known is not None and known[1] > oldest:
                    answered[index] = Stored(known[0], True)
                    continue
            p = partition(event.user_id or event.anonymous_id)
            group = groups.get(p)
            if group is None:
                group = groups[p] = ([], [], [])
            group[0].append(event.SerializeToString())
            group[1].append(event_id)
            group[2].append(index)
        messages: list[OutMessage] = []
        where = [-1] * len(events)
        limit = self._batch_bytes()
        for p, (bodies, group_ids, indexes) in groups.items():
            subject = self._subjects[p]
            for lo, hi in _chunks(bodies, limit):
                if hi - lo == 1:
                    messages.append(OutMessage(subject, bodies[lo], group_ids[lo]))
                else:
                    messages.append(
                        OutMessage(
                            subject,
                            rawevents.join(bodies[lo:hi]),
                            rawevents.batch_id(group_ids[lo:hi]),
                            {rawevents.EVENTS_HEADER: str(hi - lo)},
                        )
                    )
                at = len(messages) - 1
                for index in indexes[lo:hi]:
                    where[index] = at
        return messages, where, ids, answered

    def _batch_bytes(self) -> int:
        """The most event bytes one message carries: well inside the server's max_payload, with room for
        the headers and the entries' tags."""
        max_payload = getattr(getattr(self.publisher, "nc", None), "max_payload", None) or MAX_BATCH_MESSAGE_BYTES
        return max(1, min(MAX_BATCH_MESSAGE_BYTES, max_payload - BATCH_HEADROOM_BYTES))

    async def store(self, events: Sequence[events_pb2.Event], source: Source | None = None) -> list[Stored]:
        """Store every event durably or raise Unavailable; returns stream positions in order (events of one
        message share its position). `source`: the write key's, whose trust each event is stamped with
        (None: left as the event has it)."""
        if not events:
            return []
        now = time.monotonic()
        messages, where, ids, answered = self._plan(events, source, now)
        results: list[PubResult] = await self.publisher.publish_batch(messages) if messages else []
        failed = [r for r in results if not r.ok]
        if any(r.refused for r in failed):
            self._refused_at = time.monotonic()
        elif len(failed) < len(results):
            self._refused_at = None  # stored again
        if failed:
            held = sum(1 for at in where if at >= 0 and not results[at].ok)
            raise Unavailable(
                f"{held} of {len(events)} events were not confirmed stored ({failed[0].error}); they may "
                "have been stored: retry the request with the same messageId values (an event sent without one "
                "cannot be told from a new one)",
                retry_after=2.0,
            )
        out: list[Stored] = []
        recent = self._recent
        first: dict[str, Stored] = {}
        for index, at in enumerate(where):
            if at >= 0:
                result = results[at]
                stored = Stored(result.seq, result.duplicate)
                recent[ids[index]] = (result.seq, now)
                first[ids[index]] = stored
            else:
                stored = answered[index]
                if stored is REPEATED:
                    earlier = first.get(ids[index])
                    stored = Stored(earlier.seq if earlier is not None else 0, True)
                else:
                    first.setdefault(ids[index], stored)
            out.append(stored)
        while len(recent) > RECENT_IDS:
            recent.popitem(last=False)
        return out


def _chunks(bodies: list[bytes], limit: int) -> list[tuple[int, int]]:
    """`bodies` cut into runs whose bytes stay within `limit` (a body larger than it alone: the server
    judges a single event's size, as it always did)."""
    runs: list[tuple[int, int]] = []
    lo = size = 0
    for index, body in enumerate(bodies):
        cost = len(body) + 6  # the entry's tag and length
        if index > lo and size + cost > limit:
            runs.append((lo, index))
            lo, size = index, 0
        size += cost
    runs.append((lo, len(bodies)))
    return runs


def _plain_trust(source: Source) -> int | None:
    """The trust `trust_of` gives every event of `source` that carries no context.userHash; None when it
    depends on the event (a client source that verifies its users' hashes)."""
    if source.kind != "client":
        return SERVER
    return CLIENT if source.identity_secret is None else None
