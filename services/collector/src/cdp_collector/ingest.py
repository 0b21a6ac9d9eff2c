"""From validated events to durable JetStream messages, shared by the gRPC and HTTP front doors.

Each event becomes one message on `events.raw.<p>`, p = partition of its user_id (else anonymous_id),
with `Nats-Msg-Id = <source>:<message_id>` so a retried request stores every event once. The caller
hears "accepted" only for events JetStream acknowledged; if any valid event of a request could not be
stored, the whole request fails with Unavailable and the client retries it — already stored events then
come back as duplicates, nothing is stored twice.

Each event is stamped with its source's trust (`Event.source_trust`, sources.py `trust_of`) for identity,
and context.userHash is taken out of it first: a hash is checked, never stored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from cdp.events.v1 import events_pb2
from cdp_collector.domain import partition_key
from cdp_collector.sources import CLIENT, SERVER, Source, trust_of
from cdp_kit.bus import OutMessage, Partitioner, Publisher, PubResult, subjects
from cdp_kit.errors import Unavailable
from cdp_kit.telemetry import Telemetry

# Partitions of the persons seen lately, kept (`Partitioner`): the same persons send event after event, and
# FNV-1a in Python was about a twentieth of the collector's CPU. Bounded: past this many keys it starts again.
PARTITION_CACHE_KEYS = 100_000

#: How long after JetStream last refused to store an event (its answer an error: a full disk, a stream at
#: its limits) the collector reports not ready (`/readyz`). A replica that is not ready gets no traffic,
#: so it cannot learn from a store that the server writes again: it reports ready again this long after
#: the last refusal, and the next refused request starts the window again.
REFUSALS_KEEP_UNREADY = 10.0


@dataclass(slots=True)
class Stored:
    seq: int
    duplicate: bool


class Ingestor:
    def __init__(self, publisher: Publisher, partitions: int, telemetry: Telemetry) -> None:
        self.publisher = publisher
        self.partitions = partitions
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
        """Each event stamped with `source`'s trust (None: left as the event has it), then its message: what
        `store` publishes. One pass, `trust_of`, `partition_key` and `to_message` inlined (per event)."""
        by_partition = self._subjects
        partition = self._partition
        # An event without context.extra has no userHash to take out, and its trust is its source's kind's
        # (`trust_of` for a server source, or a client one without identity_secret): set without the call.
        plain = None if source is None else _plain_trust(source)
        messages = []
        append = messages.append
        for event in events:
            if plain is not None and not event.context.HasField("extra"):
                event.source_trust = plain
            elif source is not None:
                trust_of(source, event)
            append(
                OutMessage(
                    by_partition[partition(event.user_id or event.anonymous_id)],
                    event.SerializeToString(),
                    f"{event.source_id}:{event.message_id}",
                )
            )
        return messages

    async def store(self, events: Sequence[events_pb2.Event], source: Source | None = None) -> list[Stored]:
        """Store every event durably or raise Unavailable; returns stream positions in order. `source`: the
        write key's, whose trust each event is stamped with (None: left as the event has it)."""
        if not events:
            return []
        results: list[PubResult] = await self.publisher.publish_batch(self.messages(events, source))
        failed = [r for r in results if not r.ok]
        if any(r.refused for r in failed):
            self._refused_at = time.monotonic()
        elif len(failed) < len(results):
            self._refused_at = None  # stored again
        if failed:
            raise Unavailable(
                f"{len(failed)} of {len(results)} events were not confirmed stored ({failed[0].error}); they may "
                "have been stored: retry the request with the same messageId values (an event sent without one "
                "cannot be told from a new one)",
                retry_after=2.0,
            )
        return [Stored(r.seq, r.duplicate) for r in results]


def _plain_trust(source: Source) -> int | None:
    """The trust `trust_of` gives every event of `source` that carries no context.userHash; None when it
    depends on the event (a client source that verifies its users' hashes)."""
    if source.kind != "client":
        return SERVER
    return CLIENT if source.identity_secret is None else None
