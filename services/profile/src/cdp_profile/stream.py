"""Profile's partitioned streams on the kit's `PartitionedEngine`: what profile gives it (`Logic`).

Three inputs are partitioned by person, on two engines over the same hot profiles and the same
`WriteChain` (`ProfileEngine.chain`: a merge or an API write may touch a person of any partition, so
every write of the service lands in the order it was made). Events and scores are one engine (the kit's
`also`): a partition's one pipeline takes what has arrived on both in each round and commits, publishes
and acknowledges them together, so a score arriving with events costs no batch of its own (each round's
fetch, commit, publish and acknowledgement were most of what a small batch cost). Each keeps its own
durable, checkpoint and outbox, below; there is no order between the two streams (there was none between
two engines: scoring publishes a person's scores after the events they come from anyway). Merges, rare,
have an engine of their own.

- `events.resolved.<p>` (`EventsLogic`): durable `profile-p<p>`, checkpoint `events.resolved.<p>` in
  `profile_checkpoints` (the names profile used before the engine: an upgrade resumes where it was);
- `scores.updated.<p>` (`ScoresLogic`): durable `profile-scores-p<p>`, checkpoints and outbox of their own
  (`profile-scores_checkpoints`, `profile-scores_engine_outbox`: the kit names an input's after its spec's
  service, and the two inputs' positions must not share keys), the names it had as an engine of its own,
  so an upgrade resumes where it was and publishes what its outbox held. Before the engine this input had
  no checkpoint; applying a score again changes nothing (the newest per name wins), so starting without
  one is safe.
- `identity.merged.<p>` / `identity.unmerged.<p>` (`MergesLogic`): durable `profile-merges-p<p>` (filter
  `identity.*.<p>`: both kinds of one partition in the order identity published them), checkpoints and
  outbox of their own (`profile-merges_checkpoints`, `profile-merges_engine_outbox`). Identity publishes
  a merge and its unmerge on the partition of the merge's survivor, so the replica owning that person
  combines and splits the profiles, once, and a merge moves with its partition: one that arrives while
  the partition is between owners waits in the stream for the next owner (before, each replica read
  every merge on a durable of its own and applied it only if it owned the survivor then, so a merge
  arriving mid-move was skipped by all of them).

  A notice whose survivor this replica knows to live in another partition (the winner was merged
  into a person of another partition since) is forwarded, as is, to that partition's subject, marked
  `Cdp-Forwarded-From` (applied where it lands, never forwarded twice), with the batch's commit, so it
  is handed on exactly once.

  Upgrade: these durables start at the beginning of the stream, which holds partitioned notices only
  from an identity that publishes them (none replay what an older identity published; starting at the
  stream's end instead would lose the merges published between identity's upgrade and profile's).
  The unpartitioned notices an older identity left are drained by the replicas' existing
  `profile-identity-<ordinal>` durables (`__main__`), none of which is created anew: a new durable
  would replay up to 30 days of merges, re-merging persons unmerged since.

The kit does the rest (ordered consumer, checkpoint skip, commit with the outbox, publish, acknowledge,
pipelining, isolation of a poison message, recovery). `apply` may run while a previous batch is still
being written; `recover` drops the whole cache unless a recovery since the batch was applied did.
"""

from __future__ import annotations

from cdp_kit.bus import Bus, Delivery, OutMessage, subjects
from cdp_kit.engine import Effects, EngineSpec, PartitionedEngine
from cdp_profile import SERVICE
from cdp_profile.apply import (
    FORWARDED_FROM,
    IdentityNotice,
    ScoreUpdate,
    apply_events,
    apply_identity_notices,
    apply_scores,
    decode_events,
    decode_identity,
    decode_scores,
)
from cdp_profile.engine import ProfileEngine

SCORES_SERVICE = f"{SERVICE}-scores"  # durables `profile-scores-p<p>`, as before the engine
MERGES_SERVICE = f"{SERVICE}-merges"  # durables `profile-merges-p<p>`


class EventsLogic:
    """`events.resolved.<p>`: resolved events become profile changes (cause "event")."""

    def __init__(self, engine: ProfileEngine) -> None:
        self.engine = engine

    def decode(self, delivery: Delivery) -> list:
        defs = self.engine.defs
        return decode_events(delivery, needs_context=defs.needs_context, context_keep=defs.context_keep)

    async def apply(self, partition: int, items: list[list]) -> Effects:
        engine = self.engine
        epoch = await engine.steady(("events", partition))
        events = [event for item in items for event in item]
        await engine.hot.load({person for person, _, _ in events})
        engine.fresh(epoch)
        # From here on nothing awaits: the versions the writes expect follow the chain's order.
        now = engine.clock()
        step = apply_events(engine.hot, events, engine.defs, now=now)
        for outcome, count in step.outcomes.items():
            if count:
                engine._m_events.add(count, {"outcome": outcome})
        if step.newest_received:
            engine._m_freshness.record(max(0.0, (engine.clock() - step.newest_received) * 1000))
        writes = engine.writes(step.changes, ops=step.ops)  # first: it may add to the changes (`writes`)
        return Effects(writes, engine.messages(step.changes, cause="event", now=now))

    async def recover(self, partition: int) -> None:
        await self.engine.recover_stream(("events", partition))


class ScoresLogic:
    """`scores.updated.<p>`: model scores become profile fields (cause "score")."""

    def __init__(self, engine: ProfileEngine) -> None:
        self.engine = engine

    def decode(self, delivery: Delivery) -> list[ScoreUpdate]:
        return decode_scores(delivery)

    async def apply(self, partition: int, decoded: list[list[ScoreUpdate]]) -> Effects:
        engine = self.engine
        items = [update for updates in decoded for update in updates]
        epoch = await engine.steady(("scores", partition))
        await engine.hot.load({person for update in items for person in update.persons})
        engine.fresh(epoch)
        step = apply_scores(engine.hot, items, owns=engine.owns)
        messages = engine.messages(step.changes, cause="score", now=engine.clock())
        # A score changes nothing but scores: its own small record, not the whole profile again.
        return Effects([*step.ops, *engine.score_writes(step.changes)], messages)

    async def recover(self, partition: int) -> None:
        await self.engine.recover_stream(("scores", partition))


class MergesLogic:
    """`identity.merged.<p>` / `identity.unmerged.<p>`: profiles combine and split (causes "merge" and
    "unmerge"); a notice whose survivor lives in another partition is forwarded there."""

    def __init__(self, engine: ProfileEngine) -> None:
        self.engine = engine

    def decode(self, delivery: Delivery) -> IdentityNotice:
        return decode_identity(delivery)

    async def apply(self, partition: int, items: list[IdentityNotice]) -> Effects:
        engine = self.engine
        epoch = await engine.steady(("merges", partition))
        await engine.hot.load({person for notice in items for person in notice.persons})
        engine.fresh(epoch)
        # From here on nothing awaits (see EventsLogic).
        now = engine.clock()

        def here(notice: IdentityNotice, survivor: str) -> bool:
            return notice.forwarded or engine.partition_of(survivor) == partition

        step = apply_identity_notices(engine.hot, items, engine.defs, here=here, now=now)
        writes = engine.writes(step.changes, ops=step.ops)  # first: it may add to the changes (`writes`)
        messages = engine.messages_by_cause(step, default="merge", now=now)
        for notice, survivor in step.elsewhere:
            to = engine.partition_of(survivor)
            build = subjects.identity_merged if notice.kind == "merged" else subjects.identity_unmerged
            messages.append(
                OutMessage(
                    subject=build(to),
                    payload=notice.data,
                    msg_id=f"{notice.msg_id}>p{to}",
                    headers={FORWARDED_FROM: str(partition)},
                )
            )
        return Effects(writes, messages)

    async def recover(self, partition: int) -> None:
        await self.engine.recover_stream(("merges", partition))


def partitioned_engines(
    engine: ProfileEngine, bus: Bus, *, partitions: int, batch_size: int, ack_wait: float
) -> list[PartitionedEngine]:
    """The engines of profile's three partitioned inputs (events and scores on one, merges on the other),
    registered with `engine` (a deletion waits for them to be quiescent before it erases their outboxes)."""

    def spec(service: str, stream: str, prefix: str, description: str) -> EngineSpec:
        return EngineSpec(
            service=service,
            stream=stream,
            subject_prefix=prefix,
            partitions=partitions,
            batch_size=batch_size,
            ack_wait=ack_wait,
            description=description,
        )

    events = spec(
        SERVICE,
        subjects.EVENTS_RESOLVED,
        subjects.EVENTS_RESOLVED_PREFIX,
        "profile: apply events of a person partition",
    )
    scores = spec(
        SCORES_SERVICE,
        subjects.SCORES,
        subjects.SCORES_UPDATED_PREFIX,
        "profile: store the model scores of a person partition",
    )
    merges = spec(
        MERGES_SERVICE,
        subjects.IDENTITY,
        subjects.IDENTITY_MERGES_PREFIX,
        "profile: combine and split the profiles of a person partition as identity merges and unmerges",
    )
    store, chain = engine.store, engine.chain
    streams = [
        PartitionedEngine(
            EventsLogic(engine), events, bus=bus, store=store, chain=chain, also=[(ScoresLogic(engine), scores)]
        ),
        PartitionedEngine(MergesLogic(engine), merges, bus=bus, store=store, chain=chain),
    ]
    engine.streams.extend(streams)
    return streams
