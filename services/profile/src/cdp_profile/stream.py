"""Profile's partitioned streams on the kit's `PartitionedEngine`: what profile gives it (`Logic`).

Two inputs are partitioned by person, each its own engine over the same hot profiles and the same
`WriteChain` (`ProfileEngine.chain`: a merge or an API write may touch a person of any partition, so
every write of the service lands in the order it was made):

- `events.resolved.<p>` (`EventsLogic`): durable `profile-p<p>`, checkpoint `events.resolved.<p>` in
  `profile_checkpoints` (the names profile used before the engine: an upgrade resumes where it was);
- `scores.updated.<p>` (`ScoresLogic`): durable `profile-scores-p<p>`, checkpoints and outbox of their own
  (`profile-scores_checkpoints`, `profile-scores_engine_outbox`: the engine names them after its service,
  and the two inputs' positions must not share keys). Before the engine this input had no checkpoint;
  applying a score again changes nothing (the newest per name wins), so starting without one is safe.

The kit does the rest (ordered consumer, checkpoint skip, commit with the outbox, publish, acknowledge,
pipelining, isolation of a poison message, recovery). `apply` may run while a previous batch is still
being written; `recover` drops the whole cache unless a recovery since the batch was applied did.
"""

from __future__ import annotations

from cdp_kit.bus import Bus, Delivery, subjects
from cdp_kit.engine import Effects, EngineSpec, PartitionedEngine
from cdp_profile import SERVICE
from cdp_profile.apply import ScoreUpdate, apply_events, apply_scores, decode_events, decode_scores
from cdp_profile.engine import ProfileEngine

SCORES_SERVICE = f"{SERVICE}-scores"  # durables `profile-scores-p<p>`, as before the engine


class EventsLogic:
    """`events.resolved.<p>`: resolved events become profile changes (cause "event")."""

    def __init__(self, engine: ProfileEngine) -> None:
        self.engine = engine

    def decode(self, delivery: Delivery) -> list:
        return decode_events(delivery, needs_context=self.engine.defs.needs_context)

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
        messages = engine.messages(step.changes, cause="event", now=now)
        return Effects(engine.writes(step.changes, ops=step.ops), messages)

    async def recover(self, partition: int) -> None:
        await self.engine.recover_stream(("events", partition))


class ScoresLogic:
    """`scores.updated.<p>`: model scores become profile fields (cause "score")."""

    def __init__(self, engine: ProfileEngine) -> None:
        self.engine = engine

    def decode(self, delivery: Delivery) -> ScoreUpdate:
        return decode_scores(delivery)

    async def apply(self, partition: int, items: list[ScoreUpdate]) -> Effects:
        engine = self.engine
        epoch = await engine.steady(("scores", partition))
        await engine.hot.load({person for update in items for person in update.persons})
        engine.fresh(epoch)
        step = apply_scores(engine.hot, items, owns=engine.owns)
        messages = engine.messages(step.changes, cause="score", now=engine.clock())
        return Effects(engine.writes(step.changes, ops=step.ops), messages)

    async def recover(self, partition: int) -> None:
        await self.engine.recover_stream(("scores", partition))


def partitioned_engines(
    engine: ProfileEngine, bus: Bus, *, partitions: int, batch_size: int, ack_wait: float
) -> list[PartitionedEngine]:
    """The engines of profile's two partitioned inputs, registered with `engine` (a deletion waits for
    them to be quiescent before it erases their outboxes)."""

    def on(logic, service: str, stream: str, prefix: str, description: str) -> PartitionedEngine:
        spec = EngineSpec(
            service=service,
            stream=stream,
            subject_prefix=prefix,
            partitions=partitions,
            batch_size=batch_size,
            ack_wait=ack_wait,
            description=description,
        )
        return PartitionedEngine(logic, spec, bus=bus, store=engine.store, chain=engine.chain)

    streams = [
        on(
            EventsLogic(engine),
            SERVICE,
            subjects.EVENTS_RESOLVED,
            subjects.EVENTS_RESOLVED_PREFIX,
            "profile: apply events of a person partition",
        ),
        on(
            ScoresLogic(engine),
            SCORES_SERVICE,
            subjects.SCORES,
            subjects.SCORES_UPDATED_PREFIX,
            "profile: store the model scores of a person partition",
        ),
    ]
    engine.streams.extend(streams)
    return streams
