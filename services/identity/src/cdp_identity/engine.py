"""The identity engine: the graph kept hot in memory, durable behind the storage port, fed by the bus.

It is the domain logic of a `cdp_kit.engine.PartitionedEngine` over `events.raw.<p>` (see that package
for the pipeline, its invariants and what a crash at each step costs). One batch:

1. `decode`: parse and normalise each event's identifiers; a message that could make the batch's write
   or publish fail is rejected alone to the dead-letter stream (intake.py);
2. `apply`, under the engine lock: load the identifiers and persons the batch touches that are not
   cached, resolve every event in stream order, and return the changed records (version-checked
   puts) and the messages: merge and quarantine notifications (`identity.*`) and the resolved events
   (`events.resolved.<p(person)>`, codec.py). The kit writes them with its checkpoint and outbox in
   one bulk write, publishes, acknowledges - and applies the next batch meanwhile;
3. `recover`, after a failed write: the graph is dropped and reloaded from the store as needed.

The graph spans partitions, so every write identity makes - every partition's batches and the API's
merges, unmerges, quarantines and purges - goes through one `WriteChain` (`self.chain`, given to the
partitioned engine): writes land in the order the changes were made, each expecting the version the
earlier ones leave, and none lands after an earlier one failed. A write that loses an
optimistic-concurrency race (another replica changed the same person) fails; the cache is dropped and
the batch is redelivered onto the store's state.

One outbox, `identity_outbox`, in the kit's record format (`cdp_kit.engine.outbox`): the partitions'
records (`<partition>:<position>`) are written, published and deleted by their pipelines; the API's
notifications (merges, unmerges, quarantines of RPCs) are one record per write, `api:<sequence>`, in
the same bulk write as the change, published by `publish_outbox` once that write has landed (by the
caller, oldest first; leftovers of a crash at the next start) and deleted through the chain. They
cannot ride a pipeline's commit: an RPC's change belongs to no partition and has no stream position
to checkpoint, and the kit's engine takes changes only from its stream.

A privacy purge (`purge`) takes the same lock and the same chain: its deletions and rewrites are one more
write behind the batches already applied, and it removes what names the persons from the outbox
records, holding back API publishing until that write has landed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from google.protobuf.message import Message

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp_identity.codec import (
    encode_resolved,
    identifier_message,
    identifier_shared,
    merge_record,
    resolved_messages,
    strings,
    timestamp,
)
from cdp_identity.domain.graph import (
    SHARED_NOTIFY_MAX,
    IdentityGraph,
    Merge,
    MergeRefused,
    Purged,
    Resolution,
    Unmerge,
    mentions,
    stable_id,
)
from cdp_identity.domain.normalize import Identifier, Normalizer, Rejected, split_key
from cdp_identity.domain.rules import MergeRules
from cdp_identity.extract import Extractor
from cdp_identity.forgotten import SUPPRESSED, Forgotten
from cdp_identity.intake import Unusable, check_event, check_size, parse_event
from cdp_kit.bus import Delivery, OutMessage, Partitioner, rawevents, subjects
from cdp_kit.bus.consumer import REPLAY_PREFIX
from cdp_kit.bus.rawevents import EVENTS_HEADER
from cdp_kit.engine import Effects, Many, Reject, WriteChain, outbox
from cdp_kit.errors import CdpError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_kit.storage import Delete, Put, Record, Store, WriteOp
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry

log = logging.getLogger("cdp.identity")

SERVER = events_pb2.SOURCE_TRUST_SERVER
CLIENT_UNVERIFIED = events_pb2.SOURCE_TRUST_CLIENT_UNVERIFIED

IDENTIFIERS = "identity_identifiers"
PERSONS = "identity_persons"
MERGES = "identity_merges"
OUTBOX = "identity_outbox"
# Digests of purged identifiers with their deletion's time (forgotten.py), one record per purge.
FORGOTTEN = "identity_forgotten"
CHECKPOINTS = subjects.checkpoints_collection("identity")
# The API's records in OUTBOX, beside the partitioned engine's (`<partition>:<position>`).
API_OUTBOX_PREFIX = "api:"
# The notification payloads the outbox holds, by subject (a privacy purge reads them).
OUTBOX_MESSAGES: dict[str, type[Message]] = {
    subjects.IDENTITY_MERGED: identity_pb2.IdentityMerged,
    subjects.IDENTITY_UNMERGED: identity_pb2.IdentityUnmerged,
    subjects.IDENTITY_QUARANTINED: identity_pb2.IdentifierQuarantined,
}


def _outbox_kind(subject: str) -> type[Message]:
    """The message type of an outbox entry: `identity.merged.<p>` (or `identity.merged`, as published
    before merges were partitioned) holds an IdentityMerged; anything unknown a resolved-event batch."""
    head, _, tail = subject.rpartition(".")
    return OUTBOX_MESSAGES.get(head if tail.isdigit() else subject, events_pb2.ResolvedEventBatch)


# Seconds between two log lines about one source's drops for one reason (`_count_drops`).
DROP_LOG_INTERVAL = 60.0
# Drop reasons that say a browser or mobile source sends what it may not link: WARNING, not INFO.
CLIENT_DROPS = frozenset({"unverified_claim", "client_source"})

SWEEP_PAGE = 5_000
# JetStream's default maximum message size, for a publisher that does not tell its connection's.
DEFAULT_MAX_PAYLOAD = 1024 * 1024


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def without_values(exc: CdpError) -> CdpError:
    """The same store error with every quoted string in its message blanked. The store names the key
    it refused or lost a race on, and identity's keys are identifier values (`email:…`, and the outbox
    keys of quarantines): errors end up in logs and dead letters, identifier values must not."""
    scrubbed = exc.__class__.__new__(exc.__class__)
    scrubbed.__dict__.update(exc.__dict__)
    scrubbed.message = _QUOTED.sub("'…'", exc.message)
    scrubbed.args = (scrubbed.message,)
    if hasattr(exc, "description"):
        scrubbed.description = _QUOTED.sub("'…'", exc.description)  # type: ignore[attr-defined]
    for name in ("key", "value"):
        if hasattr(exc, name):
            setattr(scrubbed, name, "…")
    return scrubbed


@dataclass(slots=True)
class _Item:
    delivery: Delivery | None
    event_id: str
    at: int
    identifiers: list[Identifier]
    rejected: list[Rejected]
    previous: str | None  # an alias's previous_id, placed once the graph is loaded
    raw: bytes = b""
    replay: bool = False  # applied before a crash: resolve read-only, publish again
    received: int = 0  # when the collector received it (epoch ms; 0: unknown, `at` stands in)
    # Event.source_trust: a client event whose user id was not verified claims nothing another holds.
    unverified: bool = False
    # The configured source the event came from (Event.source_id; "" for a gRPC request): drops are told
    # per source, so an app build that stopped verifying its users is seen as that source's.
    source: str = ""
    # A gRPC request's identifier keys -> where the request gave them ("identifiers[1]"), for its answers.
    fields: dict[str, str] | None = None


@dataclass(slots=True)
class _Prefetched:
    epoch: int
    asked: list[str]  # the identifier keys read; those not in `identifiers` the store does not have
    identifiers: dict[str, Record]
    persons: dict[str, Record]


class IdentityEngine:
    """Identity's domain logic (`cdp_kit.engine.Logic` for `events.raw`) and its API operations."""

    def __init__(
        self,
        rules: MergeRules,
        store: Store,
        publisher,
        *,
        partitions: int,
        telemetry: Telemetry,
        shared_notify_max: int = SHARED_NOTIFY_MAX,
    ) -> None:
        self.rules = rules
        self.shared_notify_max = shared_notify_max
        self.chain = WriteChain(store)
        self.store = store
        self.publisher = publisher
        self.partitions = partitions
        self.graph = IdentityGraph(rules, shared_notify_max=shared_notify_max)
        self.normalizer = Normalizer(rules)
        self.extractor = Extractor(rules)
        # Identifier types a browser or mobile source's event never links, and those it links only when
        # verified if another person holds them (each type's from_client).
        self._client_never = frozenset(t.name for t in rules.types if t.from_client == "never")
        self._client_verified = frozenset(t.name for t in rules.types if t.from_client == "verified")
        self.lock = asyncio.Lock()
        self._partition_of = Partitioner(partitions)
        self.versions: dict[tuple[str, str], int] = {}
        # Per partition subject: the stream position whose effects are durable, for `handle` (the
        # partitioned engine keeps its own).
        self.applied: dict[str, int] = {}
        # The API's outbox records not yet published, in write order: (key, its write; None once durable).
        self._api_outbox: list[tuple[str, asyncio.Future | None]] = []
        self._api_sequence = 0
        # Held while publishing them, and by a privacy purge from its outbox scan until its write lands.
        self._publishing = asyncio.Lock()
        # Whether this replica holds identity's writer lease (writer.py); a standby's API refuses.
        self.writer = True
        # (collection, key) -> the number of the queued write that deletes it, until that write settles.
        self._deleting: dict[tuple[str, str], int] = {}
        # (source, reason) -> [when last logged (monotonic), identifiers since, by type] (`_count_drops`).
        self._drops_told: dict[tuple[str, str], list] = {}
        # Deleted persons' identifiers (hashes only): events carrying them are dropped (forgotten.py).
        self.forgotten = Forgotten()
        meter = telemetry.meter
        # Counters are scraped as cdp_identity_<name>_total (the names dashboards used before the
        # convention), the histogram as cdp_identity_batch_apply_duration_milliseconds_*.
        self._events = meter.create_counter(
            "cdp.identity.events", unit="{event}", description="events resolved, by outcome"
        )
        self._merges = meter.create_counter(
            "cdp.identity.merges", unit="{merge}", description="persons merged, by rule"
        )
        self._drops = meter.create_counter(
            "cdp.identity.drops", unit="{identifier}", description="identifiers left out, by reason"
        )
        self._quarantines = meter.create_counter(
            "cdp.identity.quarantined", unit="{identifier}", description="identifiers quarantined"
        )
        self._shared = meter.create_counter(
            "cdp.identity.shared.told",
            unit="{event}",
            description="Identifier Shared events published to persons another person joined on an identifier",
        )
        self._purged = meter.create_counter(
            "cdp.identity.purged", unit="{record}", description="records removed by privacy deletions, by kind"
        )
        self._deleted_dropped = meter.create_counter(
            "cdp.identity.deleted.dropped",
            unit="{event}",
            description="events dropped because they carry an identifier of a deleted person, by rule",
        )
        self._apply_ms = meter.create_histogram(
            "cdp.identity.batch.apply.duration",
            unit="ms",
            description="time to resolve one batch in memory",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )

    @property
    def store(self) -> Store:
        return self._store

    @store.setter
    def store(self, store: Store) -> None:
        # Every write goes through the chain: it writes to whichever store the engine has now.
        self._store = store
        self.chain.store = store

    async def start(self) -> None:
        await self.store.ensure_index(IDENTIFIERS, "quarantined")
        async for record in self.store.scan_all(CHECKPOINTS):
            self.applied[record.key] = record.doc.get("stream_seq", 0)
        # Notifications written before a crash but never published.
        await self._adopt_outbox()
        await self.publish_outbox()

    # --- the stream path (cdp_kit.engine.Logic) ---------------------------------------------------

    def decode(self, delivery: Delivery) -> _Item | Many:
        """One `events.raw` message, checked on its own (intake.py): one that could make the batch's
        write or publish fail is rejected alone, naming the field. A message of several events
        (`cdp_kit.bus.rawevents`) gives each as an item, and an event of it that is unusable is rejected
        alone (`Delivery.reject_part`): the others are applied."""
        max_payload = getattr(getattr(self.publisher, "nc", None), "max_payload", None) or DEFAULT_MAX_PAYLOAD
        if EVENTS_HEADER in delivery.headers:
            return self._decode_several(delivery, max_payload)
        try:
            event = parse_event(delivery.data)
            # The collector's id for it (`<source>:<message_id>`); not a replay's own (`cdpctl dlq --replay`
            # sends a dead letter back as `replay:<stream>:<consumer>:<seq>`), which names no event an
            # operator could follow to its profile.
            msg_id = delivery.msg_id
            if not msg_id or msg_id.startswith(REPLAY_PREFIX):
                msg_id = f"{event.source_id}:{event.message_id}"
            item = self._item(delivery, event, msg_id, delivery.data)
            check_size(item.raw, [i.key for i in item.identifiers], max_payload)
        except Unusable as unusable:
            raise Reject(unusable.reason, unusable.field, unusable.problem) from None
        return item

    def _decode_several(self, delivery: Delivery, max_payload: int) -> Many:
        try:
            parts = rawevents.split(delivery.data)
        except rawevents.NotABatch as bad:
            raise Reject("invalid_event", "event", f"not a cdp.events.v1.EventBatch ({bad})") from None
        items = Many()
        for index, raw in enumerate(parts):
            try:
                event = parse_event(raw)
                # Each event's own id (the message's is the batch's): what the collector would have used.
                item = self._item(delivery, event, f"{event.source_id}:{event.message_id}", raw)
                check_size(raw, [i.key for i in item.identifiers], max_payload)
            except Unusable as unusable:
                delivery.reject_part(index, raw, unusable.reason, str(unusable))
                continue
            items.append(item)
        return items

    async def apply(self, partition: int, items: list[_Item]) -> Effects:
        """Resolve a batch (none of it applied before) and say what to write and publish."""
        keys = self._keys(items)
        prefetched = await self._prefetch(keys)
        ops, notifications, grouped, _, _ = await self._resolve(items, prefetched=prefetched, keys=keys)
        messages = [
            OutMessage(subject=subject, payload=payload, msg_id=msg_id) for subject, msg_id, payload in notifications
        ]
        return Effects(writes=ops, messages=messages + resolved_messages(grouped))

    async def recover(self, partition: int) -> None:
        """A write failed: the graph may hold changes the store does not; start again from the store."""
        self._failed = True
        async with self.lock:
            await self._recover_if_failed()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """One batch outside the partitioned engine (tools, tests): resolve, persist with the checkpoint,
        publish. Events at or below the checkpoint are resolved read-only and published again."""
        items: list[_Item] = []
        for delivery in batch:
            try:
                item = self.decode(delivery)
            except Reject as bad:
                delivery.reject(bad.reason, str(bad))
                continue
            if isinstance(item, Many):
                items.extend(item)
            else:
                items.append(item)
        if not items:
            return
        subject = batch[0].subject
        applied = self.applied.get(subject, 0)
        last_seq = batch[-1].stream_seq
        if applied and batch[0].stream_seq <= applied:
            for item in items:
                item.replay = item.delivery.stream_seq <= applied  # type: ignore[union-attr]
        outputs, _ = await self._apply(items, position=(subject, max(last_seq, applied)))
        await self.publish_outbox()
        results = await self.publisher.publish_batch(outputs)
        failed = [r.error for r in results if not r.ok]
        if failed:
            # The state is durable; redelivery re-resolves read-only and publishes again (deduplicated).
            raise Unavailable(f"{len(failed)} resolved events not stored by JetStream: {failed[0]}")

    def _item(self, delivery: Delivery | None, event: events_pb2.Event, event_id: str, raw: bytes = b"") -> _Item:
        pairs = self.extractor.extract(event)
        at, received = check_event(event, pairs)
        previous = None
        if pairs and pairs[-1][0] == "previous":
            previous = pairs.pop()[1]
        identifiers, rejected = self.normalizer.normalize(pairs)
        trust = event.source_trust
        if trust != SERVER and self._client_never and any(i.type in self._client_never for i in identifiers):
            # A browser's key is public: a CRM id from it is anyone's claim to the CRM's person.
            rejected = [
                *rejected,
                *(Rejected(i.type, i.value, "client_source") for i in identifiers if i.type in self._client_never),
            ]
            identifiers = [i for i in identifiers if i.type not in self._client_never]
        return _Item(
            delivery=delivery,
            event_id=event_id,
            at=at,
            identifiers=identifiers,
            rejected=rejected,
            previous=previous,
            raw=raw,
            received=received,
            unverified=trust == CLIENT_UNVERIFIED,
            source=event.source_id,
        )

    async def _apply(
        self, items: list[_Item], position: tuple[str, int] | None = None, *, api: bool = False
    ) -> tuple[list[OutMessage], list[Resolution | None]]:
        """Resolve, write (with the notifications into identity's outbox), and return the resolved
        messages: the API's path, and `handle`'s."""
        _, _, grouped, resolutions, write = await self._resolve(items, write=True, position=position, api=api)
        await write  # type: ignore[misc]
        return resolved_messages(grouped), resolutions

    def _keys(self, items: list[_Item]) -> set[str]:
        """The identifier keys resolving `items` reads (an alias's possible previous ids included)."""
        keys = {i.key for item in items for i in item.identifiers}
        for item in items:
            if item.previous is not None:
                keys.update(self._previous_candidates(item.previous))
        return keys

    async def _prefetch(self, keys: set[str]) -> _Prefetched | None:
        """Read the identifiers the cache lacks, and the persons owning them, *before* the lock: every
        partition's batch is resolved under the one lock, and a store round trip inside it would hold
        all of them up. `_install` takes these records under the lock only where they are still what
        `_load` would read: the key still missing from the cache (the cache's own copy is newer), not
        being deleted, and no purge or dropped cache since (`_epoch`) - a key missing from the cache
        has no write in flight otherwise, so the store's record is its latest. A store error here is
        left to `_load`, which reads again under the lock."""
        missing = self.graph.missing_identifiers(keys)
        if not missing:
            return None
        epoch = self._epoch
        try:
            identifiers = await self.store.get_many(IDENTIFIERS, sorted(missing))
            owners = self.graph.missing_persons({record.doc["person"] for record in identifiers.values()})
            persons = await self.store.get_many(PERSONS, sorted(owners)) if owners else {}
        except CdpError:
            return None
        return _Prefetched(epoch, missing, identifiers, persons)

    def _install(self, prefetched: _Prefetched | None) -> set[str]:
        """Under the lock: the prefetched records that are still what the store holds (see `_prefetch`).
        Returns the identifier keys the store does not have, for `_load` not to ask again."""
        if prefetched is None or prefetched.epoch != self._epoch:
            return set()
        for collection, records, cached, load in (
            (IDENTIFIERS, prefetched.identifiers, self.graph.identifiers, self.graph.load_identifier),
            (PERSONS, prefetched.persons, self.graph.persons, self.graph.load_person),
        ):
            for key, record in records.items():
                if key not in cached and (collection, key) not in self._deleting:
                    load(key, record.doc)
                    self.versions[(collection, key)] = record.version
        return {key for key in prefetched.asked if key not in prefetched.identifiers}

    async def _resolve(
        self,
        items: list[_Item],
        *,
        write: bool = False,
        position: tuple[str, int] | None = None,
        api: bool = False,
        prefetched: _Prefetched | None = None,
        keys: set[str] | None = None,
    ) -> tuple[
        list[WriteOp],
        list[tuple[str, str, bytes]],
        dict[int, list[tuple[str, bytes]]],
        list[Resolution | None],
        asyncio.Future | None,
    ]:
        """Resolve `items` in order under the lock. Returns the writes (versions advanced as if they
        landed), the notifications, the resolved events by person partition, each resolution - or,
        with `write`, no writes but the write itself, queued on the chain under the lock with the
        notifications in identity's outbox and the checkpoint `position`. `keys`: `_keys(items)`, when
        the caller has them already."""
        started = time.perf_counter()
        async with self.lock:
            if api:
                self._require_writer()
            await self._recover_if_failed()
            if api:
                for item in items:
                    # A caller is held to the rules events are (forgotten.py), before anything changes.
                    self.refuse_forgotten(
                        {i.key: (item.fields or {}).get(i.key, "identifiers") for i in item.identifiers}, item.at
                    )
            absent = self._install(prefetched)
            await self._load(self._keys(items) if keys is None else keys, absent=absent)
            grouped: dict[int, list[tuple[str, bytes]]] = {}
            resolutions: list[Resolution | None] = []
            outbox: list[tuple[str, str, bytes]] = []
            outcomes: dict[str, int] = {}
            drop_reasons: dict[tuple[str, str], dict[str, int]] = {}  # (source, reason) -> identifier type -> n
            deleted: dict[str, int] = {}
            forgotten = self.forgotten
            ops: list[WriteOp] = []
            try:
                for item in items:
                    if forgotten and item.delivery is not None:
                        # A deleted person's event (forgotten.py): acknowledged with the batch, nothing else.
                        keys = [i.key for i in item.identifiers]
                        if item.previous is not None:
                            keys += self._previous_candidates(item.previous)
                        # By when it happened (never later than its arrival): a CRM change made before the
                        # deletion and read after it, or an offline device's queue, was the person's too.
                        rule = forgotten.dropped(keys, item.at)
                        if rule is not None:
                            deleted[rule] = deleted.get(rule, 0) + 1
                            resolutions.append(None)
                            continue
                    if item.previous is not None:
                        self._place_previous(item)
                    replay = item.replay
                    identifiers, claims = item.identifiers, None
                    if item.unverified and self._client_verified:
                        identifiers, claims = self.graph.unverified_claims(identifiers, self._client_verified)
                    resolution = self.graph.resolve(
                        identifiers, event_id=item.event_id, at=item.at, read_only=replay, dropped=claims
                    )
                    resolutions.append(resolution)
                    person = resolution.person if resolution else stable_id("p_", item.event_id)
                    outcome = "replayed" if replay else ("resolved" if resolution else "unlinked")
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    if resolution is not None and not replay:
                        if resolution.merges or resolution.quarantined:
                            outbox.extend(self._notifications(resolution, item.at))
                        if resolution.told:
                            outbox.extend(self._shared_notifications(item, resolution))
                    dropped = [(r.type, r.value, r.reason) for r in item.rejected] if item.rejected else []
                    if resolution is not None and resolution.drops:
                        dropped += [(*split_key(d.key), d.reason) for d in resolution.drops]
                    elif resolution is None and claims:
                        dropped += [(*split_key(d.key), d.reason) for d in claims]
                    for kind, _value, reason in dropped:
                        types = drop_reasons.setdefault((item.source or "api", reason.split(":")[0]), {})
                        types[kind] = types.get(kind, 0) + 1
                    if item.delivery is not None:
                        keys = [i.key for i in item.identifiers]
                        if replay or resolution is None or resolution.drops:
                            # Only those the graph gives the person: one it left out (a user id or an email
                            # another person holds) would be listed on a profile it does not resolve to.
                            # Without drops every identifier was attached or linked to the person.
                            keys = self.graph.owned_by(keys, person)
                        grouped.setdefault(self._partition_of(person), []).append(
                            (
                                item.event_id,
                                encode_resolved(
                                    item.raw,
                                    person,
                                    dropped,
                                    keys,
                                    resolution.shared if resolution else None,
                                ),
                            )
                        )
                queued = None
                if write:
                    queued = self._schedule_write(outbox, position)
                else:
                    ops = self._collect_ops(None, None, ())
            except BaseException:
                self._failed = True
                raise
        # Counted per batch, not per event: an OTel `add` costs as much as resolving an event.
        for outcome, count in outcomes.items():
            self._events.add(count, {"outcome": outcome})
        if drop_reasons:
            self._count_drops(drop_reasons)
        for rule, count in deleted.items():
            self._deleted_dropped.add(count, {"rule": rule})
        self._apply_ms.record((time.perf_counter() - started) * 1000)
        return ops, outbox, grouped, resolutions, queued

    def _count_drops(self, drops: Mapping[tuple[str, str], Mapping[str, int]]) -> None:
        """Count a batch's dropped identifiers by source and reason, and say so in the log at most once a
        minute per source and reason (with the count since the last line): an app build that stopped sending
        `context.userHash` shows as its source's `unverified_claim` drops, not only on anonymous persons. The
        source is a configured id; the line names identifier types and counts, never a value."""
        now = time.monotonic()
        for (source, reason), types in drops.items():
            count = sum(types.values())
            self._drops.add(count, {"reason": reason, "source": source})
            told = self._drops_told.setdefault((source, reason), [float("-inf"), 0, {}])
            told[1] += count
            for kind, n in types.items():
                told[2][kind] = told[2].get(kind, 0) + n
            if now - told[0] < DROP_LOG_INTERVAL:
                continue
            log.log(
                logging.WARNING if reason in CLIENT_DROPS else logging.INFO,
                "identifiers left out of events of source %s (%s): %d since the last report",
                source,
                reason,
                told[1],
                extra={"source": source, "reason": reason, "identifiers": told[1], "identifier_types": dict(told[2])},
            )
            told[:] = [now, 0, {}]

    # --- the synchronous paths (gRPC) -------------------------------------------------------------

    async def resolve(self, pairs: list[tuple[str, str]], *, request_id: str, at: int) -> tuple[Resolution, list]:
        identifiers, rejected = self.normalizer.normalize(pairs)
        bad = [r for r in rejected if r.reason in ("unknown_type", "invalid")]
        if bad:
            index = next(i for i, (kind, _v) in enumerate(pairs) if kind == bad[0].type)
            raise InvalidArgument(
                f"identifiers[{index}]",
                f"{bad[0].type!r} value is {bad[0].reason.replace('_', ' ')}"
                + (
                    f"; configured types: {', '.join(t.name for t in self.rules.types)}"
                    if bad[0].reason == "unknown_type"
                    else ""
                ),
            )
        if not identifiers:
            raise InvalidArgument("identifiers", "no usable identifier (all were blocked values or none were given)")
        item = _Item(None, request_id, at, identifiers, rejected, None)
        if self.forgotten:
            item.fields = self.request_fields(pairs, "identifiers")
        _, (resolution,) = await self._apply([item], api=True)
        await self.publish_outbox()
        if resolution is None:  # every usable identifier is quarantined and unknown: cannot happen
            raise FailedPrecondition("the identifiers resolve to no person", reason="unresolvable")
        return resolution, rejected

    def refuse_forgotten(self, keys: Mapping[str, str], at: int) -> None:
        """FailedPrecondition when identifiers a gRPC caller gives (normalised key -> the request field that
        gave it, e.g. "identifiers[1]"), dated `at`, would be dropped on an event (forgotten.py): a Resolve
        or MatchRecords must not make a deleted person again. It names the rule and the fields with their
        identifier types, never a value."""
        forgotten = self.forgotten
        if not forgotten or not keys:
            return
        rule = forgotten.dropped(keys, at)
        if rule is None:
            return
        named = [
            f"{field} ({split_key(key)[0]})" for key, field in keys.items() if forgotten.dropped([key], at) is not None
        ]
        why = (
            "a privacy deletion that suppresses them"
            if rule == SUPPRESSED
            else "a privacy deletion made after the time the request gives (`at`): events dated before a "
            "deletion are dropped"
        )
        raise FailedPrecondition(
            f"{', '.join(named)}: belonged to a person deleted by {why}; identity does not make that person again",
            reason=f"deleted_person_{rule}",
        )

    def request_fields(self, pairs: Sequence[tuple[str, str]], field: str) -> dict[str, str]:
        """A request's identifiers (type, value) as normalised keys -> "<field>[<index>]", where it gave them."""
        out: dict[str, str] = {}
        for index, pair in enumerate(pairs):
            for ident in self.normalizer.normalize([pair])[0]:
                out.setdefault(ident.key, f"{field}[{index}]")
        return out

    async def lookup_identifier(self, kind: str, value: str) -> str:
        identifiers, rejected = self.normalizer.normalize([(kind, value)])
        if not identifiers:
            if rejected and rejected[0].reason == "unknown_type":
                known = ", ".join(t.name for t in self.normalizer.rules.types)
                raise InvalidArgument("identifier.type", f"{kind!r} is not a known identifier type; known: {known}")
            reason = rejected[0].reason.replace("_", " ") if rejected else "empty"
            raise InvalidArgument("identifier", f"{kind!r} value is {reason}")
        key = identifiers[0].key
        async with self.lock:
            self._require_writer()
            await self._recover_if_failed()
            await self._load([key])
            person = self.graph.person_of(key)
        if person is None:
            raise NotFound(f"no person has this {kind} identifier")
        return person

    async def canonical(self, person_id: str) -> str:
        async with self.lock:
            self._require_writer()
            await self._recover_if_failed()
            await self._load_persons([person_id])
            person = self.graph.canonical(person_id)
        if person is None:
            raise NotFound(f"no person {person_id!r}")
        return person

    async def describe(self, person_id: str) -> dict:
        root = await self.canonical(person_id)
        async with self.lock:
            self._require_writer()
            await self._load(self.graph.identifiers_of(root))
            return self.graph.describe(person_id)

    async def merge(self, winner: str, loser: str, *, cause: dict, force: bool = False) -> Merge | None:
        async with self.lock:
            self._require_writer()
            await self._recover_if_failed()
            await self._load_persons([winner, loser])
            for field, person in (("person_id", winner), ("other_person_id", loser)):
                if self.graph.canonical(person) is None:
                    raise NotFound(f"{field}: no person {person!r}")
            at = int(time.time() * 1000)
            try:
                merge = self.graph.merge(winner, loser, at=at, cause=cause, force=force)
            except MergeRefused as exc:
                raise FailedPrecondition(str(exc), reason=exc.rule.split(":")[0]) from None
            try:
                outbox = [] if merge is None else self._merge_notification(merge)
                write = self._schedule_write(outbox)
            except BaseException:
                self._failed = True
                raise
        await write
        await self.publish_outbox()
        if merge is not None:
            self._merges.add(1, {"rule": cause.get("rule", "api")})
        return merge

    async def unmerge(self, merge_id: str, *, reason: str, by: str = "") -> Unmerge:
        """Undo a merge (`IdentityGraph.unmerge`); the graph keeps it on both sides' trail (`undone`: the
        merge with its cause, when undone, by whom - the caller's token name - and why), and an audit line
        gives the ids (never the reason's text, nor an identifier)."""
        async with self.lock:
            self._require_writer()
            await self._recover_if_failed()
            if merge_id not in self.graph.merge_index:
                record = None if (MERGES, merge_id) in self._deleting else await self.store.get(MERGES, merge_id)
                if record is None:
                    raise NotFound(f"no merge {merge_id!r}")
                self.graph.load_merge(merge_id, record.doc["winner"])
                self.versions[(MERGES, merge_id)] = record.version
            winner = self.graph.merge_index[merge_id]
            await self._load_persons([winner])
            root = self.graph.persons[self.graph.root_of(winner)]
            entry = next((m for m in root.lineage if m["id"] == merge_id), None)
            if entry is None:
                raise FailedPrecondition(f"merge {merge_id!r} was already undone", reason="already_unmerged")
            await self._load_persons([entry["loser"]])
            at = int(time.time() * 1000)
            try:
                split = self.graph.unmerge(merge_id, at=at, reason=reason, by=by)
                message = identity_pb2.IdentityUnmerged(
                    merge_id=split.merge_id,
                    winner=split.winner,
                    loser=split.loser,
                    at=timestamp(at),
                    loser_identifiers=[identifier_message(k) for k in split.loser_identifiers],
                    reason=reason,
                )
                # On the survivor's partition, as the merge was: profile's owner of it applies both, in order.
                subject = subjects.identity_unmerged(self._partition_of(split.winner))
                outbox = [(subject, f"unmerge:{merge_id}:{at}", message.SerializeToString())]
                write = self._schedule_write(outbox)
            except BaseException:
                self._failed = True
                raise
        await write
        log.info(
            "merge %s undone: %s split from %s",
            merge_id,
            split.loser,
            split.winner,
            extra={
                "merge_id": merge_id,
                "winner": split.winner,
                "loser": split.loser,
                "merged_at": entry["at"],
                "rule": (entry.get("cause") or {}).get("rule", ""),
                "identifiers": len(split.loser_identifiers),
                "caller": by,
                "audit": True,
            },
        )
        await self.publish_outbox()
        return split

    async def set_quarantine(self, kind: str, value: str, quarantined: bool) -> bool:
        identifiers, _rejected = self.normalizer.normalize([(kind, value)])
        if not identifiers:
            raise InvalidArgument("identifier", f"{kind!r} value is not a usable identifier")
        key = identifiers[0].key
        async with self.lock:
            self._require_writer()
            await self._recover_if_failed()
            await self._load([key])
            if key not in self.graph.identifiers:
                raise NotFound(f"no such {split_key(key)[0]} identifier")
            at = int(time.time() * 1000)
            changed = self.graph.quarantine(key, at) if quarantined else self.graph.release(key)
            outbox = []
            if changed and quarantined:
                outbox = self._quarantine_notification(key, at)
            try:
                write = self._schedule_write(outbox)
            except BaseException:
                self._failed = True
                raise
        await write
        await self.publish_outbox()
        return changed

    async def list_quarantined(self) -> list[tuple[str, str, int]]:
        records = await self.store.find(IDENTIFIERS, "quarantined", True, limit=10_000)
        return [(r.key, r.doc["person"], r.doc["quarantined_at"]) for r in records]

    # --- privacy ----------------------------------------------------------------------------------

    async def purge(
        self,
        person_ids: Sequence[str],
        *,
        also: Callable[[Purged], Awaitable[list[WriteOp]]] | None = None,
        deleted_at: Mapping[str, int] | None = None,
    ) -> Purged:
        """Forget persons for good (privacy.deleted): each with everyone merged into it, the identifiers
        they own, and every mention of them in the records that stay (`IdentityGraph.purge`), in memory
        and in the store, plus the outbox notifications naming them. `also` adds the store operations of
        other owners (the match pool, the review queue) to the same write. Unknown persons: a no-op.
        `deleted_at`: requested person -> the time of its deletion (epoch ms); events dated until then
        that carry an identifier purged with that person are dropped from now on (`self.forgotten`).

        Three steps, so events keep flowing during the slow one: under the lock, what goes; without it,
        a sweep of the stored graph for records naming any of it (another replica's cache may have
        written them); under the lock again, load those, purge and queue one write behind the batches
        already applied. Returns after that write is durable."""
        requested = list(dict.fromkeys(p for p in person_ids if p))
        async with self.lock:
            await self._recover_if_failed()
            persons, keys = await self._load_for_purge(requested)
        if not persons:
            return Purged()
        holders = await self._stored_mentions(persons | keys | set(requested))
        # From the outbox scan until the rewrite lands, no API notification is published: one read
        # before the rewrite and published after it would name the persons.
        async with self._publishing:
            async with self.lock:
                # The outbox is read below: every notification written so far must be in it.
                await self.chain.settle()
                await self._recover_if_failed()
                await self._load_persons(holders[PERSONS])
                await self._load(holders[IDENTIFIERS])
                await self._load_for_purge(requested)
                try:
                    self._epoch += 1  # records read before this purge may name what it removes
                    times: dict[str, int] = {}
                    for person, at in (deleted_at or {}).items():
                        for key in self.graph.purge_scope([person])[1]:
                            times[key] = max(times.get(key, at), at)
                    purged = self.graph.purge(requested)
                    # In the same turn of the lock as the purge: no batch resolves in between.
                    forgotten = self.forgotten.forget({k: at for k, at in times.items() if k in purged.identifiers})
                    names = set(purged.persons) | purged.identifiers | set(requested)
                    ops: list[WriteOp] = [Delete(MERGES, m) for m in holders[MERGES] if m not in purged.merges]
                    if forgotten is not None:  # with the purge: a restart before the backlog still drops
                        digest = hashlib.sha256("".join(h for h, _ in forgotten["entries"]).encode()).hexdigest()
                        ops.append(Put(FORGOTTEN, digest[:32], forgotten))
                    ops += await self._outbox_naming(names)
                    if also is not None:
                        ops += await also(purged)
                    write = self._schedule_write([], extra=ops)
                except BaseException:
                    self._failed = True
                    raise
            await write
        for kind, count in (
            ("person", len(purged.persons)),
            ("identifier", len(purged.identifiers)),
            ("merge", len(purged.merges)),
            ("rewritten", len(purged.rewritten_persons) + len(purged.rewritten_identifiers)),
        ):
            if count:
                self._purged.add(count, {"kind": kind})
        return purged

    async def load_forgotten(self, max_age: float) -> int:
        """At start: the digests earlier purges stored (forgotten.py), those of deletions older than
        `max_age` seconds (EVENTS_RAW's age limit; 0: none) or made with a key no longer current deleted.
        The number of records loaded."""
        cutoff = int((time.time() - max_age) * 1000) if max_age > 0 else None
        loaded, old = 0, []
        async for record in self.store.scan_all(FORGOTTEN):
            if (cutoff is not None and record.doc.get("until", 0) < cutoff) or not self.forgotten.load(record.doc):
                old.append(record.key)
            else:
                loaded += 1
        await self._delete_forgotten(old)
        return loaded

    async def expire_forgotten(self, max_age: float) -> None:
        """Forget the digests of deletions older than `max_age` seconds, in memory and in the store."""
        cutoff = int((time.time() - max_age) * 1000)
        self.forgotten.expire(cutoff)
        await self._delete_forgotten(
            [r.key async for r in self.store.scan_all(FORGOTTEN) if r.doc.get("until", 0) < cutoff]
        )

    async def _delete_forgotten(self, keys: list[str]) -> None:
        if not keys:
            return
        async with self.lock:
            await self._recover_if_failed()
            write = self._schedule_write([], extra=[Delete(FORGOTTEN, key) for key in keys])
        await write

    async def _load_for_purge(self, person_ids: list[str]) -> tuple[set[str], set[str]]:
        """Load what a purge of `person_ids` needs; the persons and identifier keys it would remove."""
        while needed := self.graph.purge_dependencies(person_ids):
            if not await self._load_persons(needed):
                break  # unknown (never seen, or purged before) persons
        _persons, keys = self.graph.purge_scope(person_ids)
        # Their identifiers' records: the versions to delete them at, and whether one was taken over since.
        await self._load(keys)
        return self.graph.purge_scope(person_ids)

    async def _stored_mentions(self, names: set[str]) -> dict[str, list[str]]:
        """Keys of the stored persons, identifiers and merge records that name any of `names`."""
        found: dict[str, list[str]] = {PERSONS: [], IDENTIFIERS: [], MERGES: []}
        for collection, keys in found.items():
            async for record in self.store.scan_all(collection, page_size=SWEEP_PAGE):
                if record.key in names or mentions(record.doc, names):
                    keys.append(record.key)
        return found

    async def _outbox_naming(self, names: set[str]) -> list[WriteOp]:
        """The outbox records (the partitions' batches: notifications and resolved events; the API's
        notifications) rewritten without the unpublished messages that name any of `names`, or
        deleted when none is left."""
        ops: list[WriteOp] = []
        async for record in self.store.scan_all(OUTBOX):
            kept = []
            for message in record.doc["messages"]:
                kind = _outbox_kind(message["subject"])
                if names.isdisjoint(strings(kind.FromString(base64.b64decode(message["payload"])))):
                    kept.append(message)
            if not kept:
                ops.append(Delete(OUTBOX, record.key))
            elif len(kept) < len(record.doc["messages"]):
                ops.append(Put(OUTBOX, record.key, {**record.doc, "messages": kept}))
        return ops

    # --- loading and persisting -------------------------------------------------------------------

    def _previous_candidates(self, previous: str) -> list[str]:
        found = []
        for kind in ("user_id", "anonymous_id"):
            if self.rules.type(kind) is not None:
                identifiers, _ = self.normalizer.normalize([(kind, previous)])
                found.extend(i.key for i in identifiers)
        return found

    def _place_previous(self, item: _Item) -> None:
        """Alias: `previous_id` is the user id the person had if we know one, else an anonymous id."""
        if item.previous is None:
            return
        candidates = self._previous_candidates(item.previous)
        known = [k for k in candidates if k in self.graph.identifiers]
        chosen_key = known[0] if known else (candidates[-1] if candidates else None)
        item.previous = None
        if chosen_key is None:
            return
        kind, value = split_key(chosen_key)
        identifiers, rejected = self.normalizer.normalize(
            [(i.type, i.value) for i in item.identifiers] + [(kind, value)]
        )
        item.identifiers = identifiers
        item.rejected.extend(rejected)

    async def _load(self, keys: Iterable[str], *, absent: AbstractSet[str] = frozenset()) -> None:
        """Load the identifiers of `keys` the cache lacks (but those known `absent` from the store) and
        the persons they lead to."""
        keys = set(keys)
        missing = self._not_deleting(IDENTIFIERS, self.graph.missing_identifiers(keys)) - absent
        if missing:
            try:
                records = await self.store.get_many(IDENTIFIERS, sorted(missing))
            except CdpError as exc:
                raise without_values(exc) from None
            for key, record in records.items():
                self.graph.load_identifier(key, record.doc)
                self.versions[(IDENTIFIERS, key)] = record.version
        # Roots, persons they were separated from, persons the identifiers met: until nothing is missing
        # (or only persons the store does not have: a reference a privacy purge left behind elsewhere).
        while needed := self.graph.unresolved_persons(keys):
            if not await self._load_persons(needed):
                # An identifier whose person is gone belongs to nobody: forget it (its stored version
                # is kept, so seeing it again attaches it to a new person over the stale record).
                for key in keys:
                    if key in self.graph.identifiers and self.graph.person_of(key) is None:
                        self.graph.forget_identifier(key)
                break

    async def _load_persons(self, person_ids: Iterable[str]) -> int:
        """Load these persons and the way to their roots; how many records were loaded."""
        wanted = self._not_deleting(PERSONS, self.graph.missing_persons(person_ids))
        loaded = 0
        while wanted:
            records = await self.store.get_many(PERSONS, sorted(wanted))
            follow: set[str] = set()
            for person_id, record in records.items():
                self.graph.load_person(person_id, record.doc)
                self.versions[(PERSONS, person_id)] = record.version
                if record.doc.get("merged_into"):
                    follow.add(record.doc["merged_into"])
            loaded += len(records)
            wanted = self._not_deleting(PERSONS, self.graph.missing_persons(follow))
        return loaded

    def _not_deleting(self, collection: str, keys: Iterable[str]) -> set[str]:
        """`keys` without those a queued write deletes: the store still has them until it lands, and
        loading one back would resurrect what a privacy purge removed (or leave an identifier pointing
        at a person that is gone by the next read)."""
        return {k for k in keys if (collection, k) not in self._deleting}

    def _collect_ops(
        self, record: Put | None, position: tuple[str, int] | None, extra: Sequence[WriteOp]
    ) -> list[WriteOp]:
        """What changed since the last call (under the lock), as writes expecting the versions the
        earlier writes will have left, with the notifications' outbox `record`. Records a privacy
        purge removed are deleted in the same write (persons last), with `extra` before them."""
        identifiers, persons, merges = self.graph.take_dirty()
        removed_identifiers, removed_persons, removed_merges = self.graph.take_removed()
        ops: list[WriteOp] = []
        for collection, docs in ((IDENTIFIERS, identifiers), (PERSONS, persons)):
            for key, doc in docs.items():
                expected = self.versions.get((collection, key), 0)
                ops.append(Put(collection, key, doc, expected_version=expected))
                self.versions[(collection, key)] = expected + 1
        for merge_id, winner in merges.items():
            ops.append(Put(MERGES, merge_id, {"winner": winner}))
        for key in removed_identifiers:
            ops.append(Delete(IDENTIFIERS, key, expected_version=self.versions.pop((IDENTIFIERS, key), None)))
        for merge_id in removed_merges:
            self.versions.pop((MERGES, merge_id), None)
            ops.append(Delete(MERGES, merge_id))
        ops.extend(extra)
        for person_id in removed_persons:
            ops.append(Delete(PERSONS, person_id, expected_version=self.versions.pop((PERSONS, person_id), None)))
        now = time.time()
        if record is not None:
            ops.append(record)
        if position is not None and position[1] > self.applied.get(position[0], 0):
            ops.append(Put(CHECKPOINTS, position[0], {"stream_seq": position[1], "at": now}))
        return ops

    def _schedule_write(
        self,
        outbox: list[tuple[str, str, bytes]],
        position: tuple[str, int] | None = None,
        extra: Sequence[WriteOp] = (),
    ) -> asyncio.Future:
        """Snapshot what changed (under the lock) and queue its write on the chain, behind every write
        identity made before (the partitioned engine's batches included). If one fails, every write
        queued after it fails too, and the cache is dropped before the next use: the store is the
        truth, and the unacknowledged batches are redelivered onto it."""
        record = self._api_record(outbox) if outbox else None
        ops = self._collect_ops(record, position, extra)
        self._writes += 1
        for op in ops:
            if isinstance(op, Delete):
                self._deleting[(op.collection, op.key)] = self._writes
        write = self.chain.submit(ops)
        settled = asyncio.ensure_future(self._write_settled(write, ops, position, self._writes))
        if record is not None:
            self._api_outbox.append((record.key, settled))
        return settled

    async def _write_settled(
        self,
        write: asyncio.Future,
        ops: list[WriteOp],
        position: tuple[str, int] | None,
        number: int,
    ) -> None:
        try:
            try:
                await write
            except CdpError as exc:
                raise without_values(exc) from None
        except BaseException:
            self._failed = True
            raise
        finally:
            # Landed or failed, the store holds the truth about these keys again.
            for op in ops:
                if isinstance(op, Delete) and self._deleting.get((op.collection, op.key)) == number:
                    del self._deleting[(op.collection, op.key)]
                    # A record prefetched before the delete landed may be the deleted one.
                    self._epoch += 1
        if position is not None:
            self.applied[position[0]] = max(self.applied.get(position[0], 0), position[1])

    _failed = False
    _writes = 0  # writes queued so far: numbers them
    _epoch = 0  # the cache's generation: a purge or a dropped cache starts a new one (`_prefetch`)

    async def _recover_if_failed(self) -> None:
        """After a failed write: wait for the queued writes to settle, then start from the store again."""
        if not self._failed:
            return
        await self._drop_cache()
        log.warning("identity cache dropped after a failed write; reloading from the store")

    async def _drop_cache(self) -> None:
        """Under the lock: let every queued write settle, then forget the graph (the store is the truth)."""
        await self.chain.settle()
        self.chain.reset()  # a failed chain ends here; new writes start a fresh one
        self.graph = IdentityGraph(self.rules, shared_notify_max=self.shared_notify_max)
        self.versions.clear()
        self._failed = False
        self._epoch += 1

    # --- one writer (writer.py) -------------------------------------------------------------------

    def _require_writer(self) -> None:
        """Under the lock, before an API operation reads or changes the graph."""
        if not self.writer:
            raise Unavailable(
                "this identity replica is a standby: another replica holds the writer lease and answers; retry",
                reason="standby",
            )

    async def become_writer(self) -> None:
        """This replica got the writer lease: whatever it cached may predate the last writer's changes,
        and a writer that crashed may have left API notifications unpublished."""
        async with self.lock:
            await self._drop_cache()
            self.writer = True
        await self._adopt_outbox()
        try:
            await self.publish_outbox()
        except CdpError as exc:  # still in the outbox: the next API write's publish retries them
            log.warning("identity notifications left by the previous writer not yet published: %s", exc.message)

    async def stop_writing(self) -> None:
        """The writer lease is going: refuse API operations from now on, and let the queued writes land.

        Refused at once, before the lock: an operation waiting for it refuses when it gets it
        (`_require_writer`), and a cut of this call (the lease lost: the release cancelled) while an
        operation under way holds the lock leaves the replica refusing, not answering as the writer
        without the lease."""
        self.writer = False
        async with self.lock:  # the operation under way (past `_require_writer`) ends first
            pass
        await self.chain.settle()

    # --- notifications ----------------------------------------------------------------------------

    def _notifications(self, resolution: Resolution, at: int) -> list[tuple[str, str, bytes]]:
        out = []
        for merge in resolution.merges:
            out.extend(self._merge_notification(merge))
            self._merges.add(1, {"rule": merge.cause.get("rule", "event")})
        for key in resolution.quarantined:
            out.extend(self._quarantine_notification(key, at))
        return out

    def _shared_notifications(self, item: _Item, resolution: Resolution) -> list[tuple[str, str, bytes]]:
        """An "Identifier Shared" event (codec.identifier_shared) for each person the event's new person
        joined on an identifier (`Resolution.told`), on that person's `events.resolved` partition. They ride
        the outbox with the graph change they come from: a resolution replayed read-only after a crash
        would not find them again. The message id is a digest of the event and the person, the same on
        every re-publication (JetStream drops the copy; profile is idempotent on the event id)."""
        out = []
        for person, shared in resolution.told.items():
            message_id = stable_id("sh_", item.event_id, person)
            payload = identifier_shared(
                person, shared, message_id=message_id, at=item.at, received=item.received or item.at
            )
            out.append((subjects.events_resolved(self._partition_of(person)), f"shared:{message_id}", payload))
        self._shared.add(len(out))
        log.debug("persons told of a shared identifier", extra={"told": len(out)})
        return out

    def _merge_notification(self, merge: Merge) -> list[tuple[str, str, bytes]]:
        record = merge_record(merge)
        message = identity_pb2.IdentityMerged(
            merge_id=merge.id, winner=merge.winner, loser=merge.loser, at=record.at, cause=record.cause
        )
        # On the survivor's partition: whoever owns that partition in profile combines the profiles.
        subject = subjects.identity_merged(self._partition_of(merge.winner))
        return [(subject, f"merge:{merge.id}", message.SerializeToString())]

    def _quarantine_notification(self, key: str, at: int) -> list[tuple[str, str, bytes]]:
        self._quarantines.add(1, {"type": split_key(key)[0]})
        person = self.graph.person_of(key) or ""
        message = identity_pb2.IdentifierQuarantined(
            identifier=identifier_message(key), person_id=person, at=timestamp(at)
        )
        log.warning("identifier quarantined", extra={"identifier_type": split_key(key)[0], "person": person})
        # The key is also the JetStream message id: a digest, not the identifier value.
        return [(subjects.IDENTITY_QUARANTINED, f"quarantine:{stable_id('q_', key)}:{at}", message.SerializeToString())]

    def _api_record(self, notifications: list[tuple[str, str, bytes]]) -> Put:
        """The notifications of one API write as one record in the partitioned engine's outbox format
        (`cdp_kit.engine.outbox`), keyed `api:<sequence>` so records sort in write order and the
        partitions' pipelines, which publish `<partition>:` records, leave them to this engine."""
        self._api_sequence = max(self._api_sequence + 1, time.time_ns())
        messages = [
            OutMessage(subject=subject, payload=payload, msg_id=msg_id) for subject, msg_id, payload in notifications
        ]
        doc = outbox.put_record(OUTBOX, 0, 0, messages).doc
        return Put(OUTBOX, f"{API_OUTBOX_PREFIX}{self._api_sequence:0{outbox.POSITION_DIGITS}d}", doc)

    async def _adopt_outbox(self) -> None:
        """At start and on becoming the writer: queue the API records a previous process left
        unpublished; publish (and delete)
        notifications an older version stored one per record (`subject`, `payload`), oldest first."""
        legacy = []
        async with self._publishing:
            queued = {key for key, _write in self._api_outbox}
            async for record in self.store.scan_all(OUTBOX):
                if record.key.startswith(API_OUTBOX_PREFIX):
                    if record.key not in queued:
                        self._api_outbox.append((record.key, None))
                elif "messages" not in record.doc:
                    legacy.append(record)
            self._api_outbox.sort(key=lambda entry: entry[0])
        if not legacy:
            return
        legacy.sort(key=lambda r: (r.doc.get("at", 0), r.doc.get("n", 0)))
        messages = [
            OutMessage(subject=r.doc["subject"], payload=base64.b64decode(r.doc["payload"]), msg_id=r.key)
            for r in legacy
        ]
        results = await self.publisher.publish_batch(messages)
        if not all(result.ok for result in results):
            raise Unavailable("identity notifications from before the upgrade not yet published; will retry")
        await self.chain.submit([Delete(OUTBOX, r.key) for r in legacy])

    async def publish_outbox(self) -> None:
        """Publish the API's notifications whose writes have landed, oldest first, each record once
        JetStream has stored all its messages (stable ids: a repeat is a duplicate), then delete the
        records through the chain. A record a privacy purge removed meanwhile is skipped; one it
        rewrote is published as rewritten (it is read back from the store)."""
        async with self._publishing:
            published: list[str] = []
            try:
                while self._api_outbox:
                    key, write = self._api_outbox[0]
                    if write is not None:
                        if not write.done():
                            break  # not durable yet: its own caller publishes it once it is
                        if write.cancelled() or write.exception() is not None:
                            self._api_outbox.pop(0)  # never durable (and the cache is dropped)
                            continue
                    try:
                        record = await self.store.get(OUTBOX, key)
                    except CdpError as exc:
                        raise without_values(exc) from None
                    if record is not None:
                        results = await self.publisher.publish_batch(outbox.messages_of(record))
                        if not all(result.ok for result in results):
                            raise Unavailable("identity notifications not yet published; will retry")
                        published.append(key)
                    self._api_outbox.pop(0)
            finally:
                if published:
                    # Published either way: a delete that fails leaves them to be published again at
                    # start, as JetStream duplicates.
                    (deleted,) = await asyncio.gather(
                        self.chain.submit([Delete(OUTBOX, key) for key in published]), return_exceptions=True
                    )
                    if isinstance(deleted, BaseException):
                        self._failed = True  # the chain failed: start again from the store
