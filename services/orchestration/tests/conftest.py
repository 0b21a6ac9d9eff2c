"""A world for the service tests: a real nats-server, the upstream streams, orchestration's engine over a
store, and helpers that publish what identity, profile and segmentation would publish."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from google.protobuf import struct_pb2
from nats.js.errors import NotFoundError

from cdp.events.v1 import events_pb2
from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import (
    Bus,
    OutMessage,
    dead_letter_stream,
    events_resolved_stream,
    partition_for,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_kit.bus.streams import SOURCE_HEADER, source_of
from cdp_kit.engine import EngineSpec, PartitionedEngine
from cdp_kit.storage import Store, open_store
from cdp_kit.timestamps import from_seconds
from cdp_orchestration import streams
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.engine import SERVICE, OrchestrationLogic
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import DECISIONS, INSTANCES, PERSONS, prepare_store
from cdp_testing.waiting import eventually

PARTITIONS = 2
SOURCE = "src-test"  # the collector source the test's events come from
# What ORCHESTRATION sources, by stream: the subject prefixes (`<prefix>.<p>`) it takes from each.
SOURCED = {
    subjects.EVENTS_RESOLVED: (subjects.EVENTS_RESOLVED_PREFIX,),
    subjects.SEGMENTS: (subjects.SEGMENTS_ENTERED_PREFIX, subjects.SEGMENTS_EXITED_PREFIX),
    subjects.PROFILES: (subjects.PROFILES_CHANGED_PREFIX,),
    subjects.ORCHESTRATION_TIMERS: (subjects.ORCHESTRATION_FIRED_PREFIX,),
}


class World:
    def __init__(
        self,
        bus: Bus,
        store: Store,
        rules: Rules,
        clock_offset: float,
        hot_persons: int,
        meter: Any = None,
        profile_fetch: Any = None,
    ) -> None:
        self.meter = meter  # an OpenTelemetry meter the engine records into (None: the global one)
        self.profile_fetch = profile_fetch  # the profile service's BatchGetProfiles (`reads.profile_fetch`), or None
        self.bus = bus
        self.store = store
        self.rules = rules
        self.clock_offset = clock_offset
        self.hot_persons = hot_persons
        self.journeys = Journeys(store)
        self.engine: PartitionedEngine | None = None
        self.sequence = 0
        self.changed_at: dict[str, float] = {}  # person -> the time of the last profile change published

    eventually = staticmethod(eventually)

    def now(self) -> float:
        return time.time() + self.clock_offset

    async def inputs(self) -> list[Any]:
        """Every message in the engine's input stream (ORCHESTRATION), in order, with its stored `time`."""
        info = await self.bus.js.stream_info(subjects.ORCHESTRATION)
        if info.state.messages == 0:
            return []
        return [
            await self.bus.js.get_msg(subjects.ORCHESTRATION, seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]

    async def stored(self, count: int) -> float:
        """Wait until the input stream holds `count` messages (what the test published, sourced by the
        server); the server time at which the last of them was stored. The engine's clock is that time plus
        `clock_offset`, so a test that sets the offset from it (before `start`) knows what time the engine
        reads for each of them, however late the machine ran before."""

        async def there() -> float | None:
            messages = await self.inputs()
            assert len(messages) <= count, f"{len(messages)} inputs, more than the {count} expected"
            return messages[-1].time.timestamp() if len(messages) == count else None

        return await eventually(there)

    async def settled(self) -> bool:
        """Whether the engine has applied everything that reached it by now, and published what it asked:
        no timer due by now still waits to fire, every message the sourced streams hold for orchestration
        is in its input stream, and every partition has applied its input to the last message and is idle
        (its settler has acknowledged and published). A test that asserts something did NOT happen waits
        for this first, rather than for a fixed time."""
        js = self.bus.js
        now = time.time()
        timers = await js.stream_info(
            subjects.ORCHESTRATION_TIMERS, subjects_filter=f"{subjects.ORCHESTRATION_TIMERS_PREFIX}.>"
        )
        for subject in timers.state.subjects or {}:
            schedule = (await js.get_last_msg(subjects.ORCHESTRATION_TIMERS, subject)).headers or {}
            at = schedule.get("Nats-Schedule", "")
            if at.startswith("@at ") and datetime.fromisoformat(at[4:]).timestamp() <= now:
                return False  # due, not fired yet
        sourced: dict[str, int] = {}
        for message in await self.inputs():
            stream, _subject = source_of(message.headers)
            if stream:  # the header reads `<stream> <seq> ...`
                seq = int(message.headers[SOURCE_HEADER].split(" ")[1])
                sourced[stream] = max(sourced.get(stream, 0), seq)
        for stream, prefixes in SOURCED.items():
            for prefix in prefixes:
                for partition in range(PARTITIONS):
                    try:
                        last = await js.get_last_msg(stream, f"{prefix}.{partition}")
                    except NotFoundError:
                        continue  # nothing on that subject
                    if sourced.get(stream, 0) < last.seq:
                        return False
        assert self.engine is not None
        for partition, pipeline in self.engine.pipelines.items():
            try:
                last = await js.get_last_msg(subjects.ORCHESTRATION, f"{subjects.ORCHESTRATION_IN_PREFIX}.{partition}")
            except NotFoundError:
                continue  # no input for that partition
            if pipeline.checkpoint < last.seq or not pipeline.idle.is_set():
                return False
        return True

    async def start(self) -> PartitionedEngine:
        await prepare_store(self.store)  # the indexes, as the service declares them at start (`__main__`)
        await self.journeys.load()
        logic = OrchestrationLogic(
            self.store,
            self.journeys,
            self.rules,
            partitions=PARTITIONS,
            clock_offset=self.clock_offset,
            hot_persons=self.hot_persons,
            meter=self.meter,
            profile=self.profile_fetch,
        )
        spec = EngineSpec(
            service=SERVICE,
            stream=subjects.ORCHESTRATION,
            subject_prefix=subjects.ORCHESTRATION_IN_PREFIX,
            partitions=PARTITIONS,
            in_flight=1,
            fetch_timeout=0.2,
            ack_wait=5.0,
        )
        self.engine = PartitionedEngine(logic, spec, bus=self.bus, store=self.store, chain=logic.chain)
        await self.engine.start()
        await self.engine.wait_ready()
        return self.engine

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.close()
            self.engine = None

    def abort(self) -> None:
        assert self.engine is not None
        self.engine.abort()
        self.engine = None

    async def publish_journey(self, document: dict[str, Any]) -> None:
        record = lifecycle.publish(lifecycle.create(parse_journey(document)))
        await self.journeys.save(record)

    def partition(self, person: str) -> int:
        return partition_for(person, PARTITIONS)

    async def _publish(self, subject: str, payload: bytes) -> None:
        self.sequence += 1
        [result] = await self.bus.publisher.publish_batch(
            [OutMessage(subject, payload, f"test-{self.sequence}-{time.time()}")]
        )
        assert result.ok, result.error

    async def profile(
        self,
        person: str,
        *,
        consent: dict[str, bool] | None = None,
        removed: bool = False,
        wait: bool = True,
        **traits: Any,
    ) -> None:
        change = profile_pb2.ProfileChanged(
            person_id=person,
            cause="delete" if removed else "api",
            at=from_seconds(self._change_time(person)),
            removed=removed,
        )
        for name, value in traits.items():
            change.traits[name].CopyFrom(struct_pb2.Value(string_value=str(value)))
        change.consent.update(consent or {})
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await self._publish(subjects.profiles_changed(self.partition(person)), batch.SerializeToString())
        if self.engine is not None and not removed and wait:
            # Sources interleave: let the change land before what the test sends next.
            async def applied() -> bool:
                stored = await self.store.get(PERSONS, person)
                return stored is not None and all(
                    stored.doc["fields"].get(f"traits.{k}") == str(v) for k, v in traits.items()
                )

            await eventually(applied)

    async def event(
        self,
        person: str,
        name: str,
        event_id: str,
        *,
        user_id: str = "",
        anonymous_id: str = "",
        profiled: bool = True,
        source: str = SOURCE,
        **properties: Any,
    ) -> None:
        await self.events(
            person,
            [(name, event_id, properties)],
            user_id=user_id,
            anonymous_id=anonymous_id,
            profiled=profiled,
            source=source,
        )

    async def events(
        self,
        person: str,
        events: list[tuple[str, str, dict[str, Any]]],
        *,
        user_id: str = "",
        anonymous_id: str = "",
        profiled: bool = True,
        source: str = SOURCE,
    ) -> None:
        """Several events of one person in one `events.resolved` message, as identity publishes a batch, and
        (`profiled`) the profile's change listing them, as the profile publishes once it applied them.
        `source`: the collector source they came through."""
        resolved = [
            events_pb2.ResolvedEvent(
                event=self._event(name, event_id, properties, user_id, anonymous_id, source), person_id=person
            )
            for name, event_id, properties in events
        ]
        batch = events_pb2.ResolvedEventBatch(events=resolved)
        await self._publish(subjects.events_resolved(self.partition(person)), batch.SerializeToString())
        if profiled:
            await self.profile_applied(person, [event_id for _name, event_id, _properties in events], source=source)

    async def profile_applied(
        self,
        person: str,
        event_ids: list[str],
        *,
        consent: dict[str, bool] | None = None,
        source: str = SOURCE,
        **traits: Any,
    ) -> None:
        """The profile's change for events it applied (cause "event"), with the consent and traits they set.
        `event_ids`: the events' message ids; the change lists them as profile does, `<source id>:<message id>`."""
        change = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(self._change_time(person)))
        change.event_ids.extend(f"{source}:{event_id}" for event_id in event_ids)
        change.consent.update(consent or {})
        for name, value in traits.items():
            change.traits[name].CopyFrom(struct_pb2.Value(string_value=str(value)))
        batch = profile_pb2.ProfileChangedBatch(changes=[change])
        await self._publish(subjects.profiles_changed(self.partition(person)), batch.SerializeToString())

    def _change_time(self, person: str) -> float:
        at = self.changed_at[person] = self.now()
        return at

    def _event(
        self,
        name: str,
        event_id: str,
        properties: dict[str, Any],
        user_id: str,
        anonymous_id: str,
        source: str = SOURCE,
    ) -> events_pb2.Event:
        event = events_pb2.Event(
            message_id=event_id,
            source_id=source,
            type=events_pb2.EVENT_TYPE_TRACK,
            event=name,
            timestamp=from_seconds(self.now()),
            user_id=user_id,
            anonymous_id=anonymous_id,
        )
        event.properties.update(properties)
        return event

    async def segment(self, person: str, segment: str, *, entered: bool = True, wait: bool = True) -> None:
        self.sequence += 1
        # As segmentation names it: decided on the person's last profile change (its time), else by a timer.
        changed_at = self.changed_at.get(person)
        change = segmentation_pb2.SegmentEvent(
            id=f"seg-{self.sequence}",
            person_id=person,
            segment_id=segment,
            entered=entered,
            reason="event" if changed_at is not None else "time",
        )
        change.at.CopyFrom(from_seconds(changed_at if changed_at is not None else self.now()))
        batch = segmentation_pb2.SegmentEventBatch(events=[change])
        partition = self.partition(person)
        subject = subjects.segments_entered(partition) if entered else subjects.segments_exited(partition)
        await self._publish(subject, batch.SerializeToString())
        if self.engine is not None and wait:

            async def applied() -> bool:
                stored = await self.store.get(PERSONS, person)
                return stored is not None and (segment in stored.doc["segments"]) == entered

            await eventually(applied)

    async def actions(self) -> list[pb.ActionMessage]:
        """Every action message stored in ACTIONS, in order."""
        info = await self.bus.js.stream_info(subjects.ACTIONS)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            try:
                msg = await self.bus.js.get_msg(subjects.ACTIONS, seq)
            except Exception:
                continue
            out.append(pb.ActionMessage.FromString(msg.data))
        return out

    async def decisions(self, person: str) -> list[dict[str, Any]]:
        """The person's decisions, oldest first."""
        page = await self.store.scan(DECISIONS, prefix=f"{person}:", limit=1000)
        return [r.doc for r in reversed(page.records)]

    async def instances(self, person: str) -> list[dict[str, Any]]:
        return [r.doc async for r in self.store.scan_all(INSTANCES) if r.doc["person_id"] == person]


def journey_document(journey_id: str, entry: dict, **more) -> dict:
    """A minimal published journey's document: `entry`, then a 30-day delay (`nodes` in `more` replaces it),
    every other field in `more` added or replacing the defaults."""
    return {
        "id": journey_id,
        "version": 1,
        "name": journey_id,
        "priority": 10,
        "category": "lifecycle",
        "timezone": "UTC",
        "entry": entry,
        "nodes": [{"id": "later", "type": "delay", "duration": "30d"}],
        **more,
    }


async def dispatched(bus: Bus, channel: str) -> bool:
    """Whether the channel's dispatcher consumer holds nothing unread or unacknowledged: every action on
    ACTIONS was worked through (sent, failed or dead-lettered, and acknowledged), and nothing is left to
    be delivered again. A test that asserts nothing more was sent waits for this, not for a fixed time."""
    info = await bus.js.consumer_info(subjects.ACTIONS, f"orchestration-dispatch-{channel}")
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.fixture
async def world_factory(nats_server, tmp_path):
    opened: list[tuple[World, Any]] = []

    async def make(
        rules: Rules | None = None,
        clock_offset: float = 0.0,
        hot_persons: int = 1000,
        meter: Any = None,
        profile_fetch: Any = None,
    ) -> World:
        bus_cm = Bus.connect(nats_server.url, name="orchestration-test")
        bus = await bus_cm.__aenter__()
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream(), dead_letter_stream())
        await streams.ensure_streams(bus.js)
        store = open_store(f"sqlite:///{tmp_path}/orchestration-{len(opened)}.db")
        world = World(bus, store, rules or Rules(), clock_offset, hot_persons, meter, profile_fetch)
        opened.append((world, bus_cm))
        return world

    yield make
    for world, bus_cm in opened:
        if world.engine is not None:
            world.abort()
        await world.store.close()
        await bus_cm.__aexit__(None, None, None)
