"""Entering checks the journey's `max_concurrent` by a count the person's live instances keep (`wakes.Live`),
not by a walk over each of them.

Every trigger of a journey counted the person's running instances of it one by one (`Applier.enter`, and a
merge adopting an instance): at a person in 300 journeys, 300 instances looked at per trigger, whatever the
wake index spared the rest of the input. Counted here: the instances read from the person's live map while
one event enters them once more. And exactness: the count against a walk, through random sets, removals and
clears of a live map, before and after a wake index follows it.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from cdp.events.v1 import events_pb2
from cdp_kit.bus import subjects
from cdp_kit.storage import open_store
from cdp_kit.timestamps import from_seconds
from cdp_orchestration import wakes
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.instance import Instance, Status
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.engine import OrchestrationLogic
from cdp_orchestration.inputs import decode
from cdp_orchestration.journeys import Journeys

T0 = 1_800_000_000.0


def journey(k: int) -> dict[str, Any]:
    return {
        "id": f"j{k}",
        "version": 1,
        "name": f"j{k}",
        "entry": {"event": f"Start{k}"},
        "reentry": "always",
        "max_concurrent": 3,
        "nodes": [{"id": "wait", "type": "wait", "event": f"Done{k}", "timeout": "30d"}],
    }


def event(person: str, name: str, message_id: str, at: float) -> bytes:
    message = events_pb2.Event(
        message_id=message_id, source_id="src", type=events_pb2.EVENT_TYPE_TRACK, event=name, timestamp=from_seconds(at)
    )
    batch = events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=message, person_id=person)])
    return batch.SerializeToString()


async def test_an_entry_reads_none_of_the_persons_other_instances(monkeypatch):
    async with open_store("memory://") as store:
        journeys = Journeys(store)
        for k in range(300):
            await journeys.save(lifecycle.publish(lifecycle.create(parse_journey(journey(k)))))
        logic = OrchestrationLogic(store, journeys, Rules(), partitions=1)

        async def apply(name: str, message_id: str, at: float) -> None:
            data = event("ann", name, message_id, at)
            effects = await logic.apply(0, [decode(subjects.EVENTS_RESOLVED, "", data, at)])
            await store.bulk_write(effects.writes)

        for k in range(300):
            await apply(f"Start{k}", f"s{k}", T0 + k)
        person = logic.hot[0].persons["ann"]
        assert len(person.live) == 300

        read = 0
        values = wakes.Live.values

        def counting(self):
            nonlocal read
            for instance in values(self):
                read += 1
                yield instance

        monkeypatch.setattr(wakes.Live, "values", counting)
        await apply("Start7", "again-1", T0 + 400)
        await apply("Start7", "again-2", T0 + 401)
        assert read == 0  # was 300 per entry
        assert person.live.running("j7") == 3
        await apply("Start7", "again-3", T0 + 402)  # the fourth at once: refused by max_concurrent
        assert person.live.running("j7") == 3
        assert sum(1 for i in dict.values(person.live) if i.journey_id == "j7") == 3
        assert read == 0


@pytest.mark.parametrize("seed", range(5))
def test_the_running_count_is_a_walks(seed):
    rng = random.Random(seed)
    live = wakes.Live()

    def made(n: int) -> Instance:
        status = rng.choice([Status.RUNNING, Status.RUNNING, Status.ENDED])
        return Instance(f"i{n}", f"j{rng.randrange(4)}", 1, "ann", status=status, node="wait", entered_at=1.0)

    for step in range(2000):
        if step == 700:
            live.follow()
        move = rng.random()
        key = f"i{rng.randrange(30)}"
        if move < 0.5:
            live[key] = made(rng.randrange(30)) if rng.random() < 0.7 else live.get(key) or made(1)
        elif move < 0.65 and key in live:
            del live[key]
        elif move < 0.8:
            live.pop(key, None)
        elif move < 0.85 and live:
            live.popitem()
        elif move < 0.87:
            live.clear()
        elif move < 0.95:
            live.update({key: made(rng.randrange(30))})
        else:
            live.setdefault(key, made(rng.randrange(30)))
        for j in ("j0", "j1", "j2", "j3"):
            walked = sum(1 for i in dict.values(live) if i.journey_id == j and i.status is Status.RUNNING)
            assert live.running(j) == walked, (step, j)
