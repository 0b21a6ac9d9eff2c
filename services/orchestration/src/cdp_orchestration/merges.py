"""Merges: a person merged into another hands their journeys and their arbiter state to the survivor.

Orchestration reads a merge as profile publishes it once it applied `identity.merged.<p>`: the survivor's
profile change lists the persons it absorbed (`merged`), and each of those gets a change saying it is gone
(`removed`, cause "merge"). The two arrive on different partitions, in either order, so the move is a
hand-over between the two engines, each changing only its own persons:

1. The survivor's engine, on a change with `merged`, sends a `handover` command to each absorbed person's
   partition (from its outbox, message id from the survivor, the absorbed person and the stream time).
2. The absorbed person's engine (`handover`) takes everything that can still react (running instances,
   ended ones still watching their goal), their arbiter state (caps used, held and awaiting actions,
   events the suppressions watch), last entries and identifiers, cancels their timers there, empties the
   person, and sends it all to the survivor's partition as an `adopt` command. Their `removed` change,
   whenever it comes, no longer ends anything (cause "merge"): the instances wait for the hand-over.
3. The survivor's engine (`adopt`) takes each instance over under the survivor's id, with its timers
   scheduled again on the survivor's partition, and merges the arbiter state: sends in both histories
   count toward the survivor's caps, held actions stay held (their approval records now name the
   survivor, so approving one reaches this engine), the latest time of each watched event wins.

Re-entry: a moved instance runs on unless the survivor already runs as many instances of that journey as
it allows at once (`max_concurrent`): then the moved one ends with reason "merged" (its pending actions
withdrawn) and the survivor's own goes on, so one person never gets one journey's messages twice. The
"never" and cooldown rules are about entering; both entries happened, for what were two people then.
Decisions stay under the absorbed person's id: they are the history of what was decided for them.

Every step is idempotent: a redelivered `handover` finds the person empty and sends an empty `adopt`; an
`adopt` of an instance the survivor holds already changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cdp_kit.bus import partition_for
from cdp_orchestration import streams, timers
from cdp_orchestration.domain.arbiter import Held, PersonState, merge_states
from cdp_orchestration.domain.instance import ExitRequest, Status
from cdp_orchestration.domain.records import instance_from_record, instance_record, person_from_record, person_record
from cdp_orchestration.state import APPROVALS, Batch, Partition, Person

if TYPE_CHECKING:
    from cdp_orchestration.apply import Applier

MERGED = "merged"  # the end reason of a moved instance the survivor's concurrency cap has no room for


def request_handovers(partitions: int, batch: Batch, survivor: str, absorbed: list[str], now: float) -> None:
    """Step 1: ask each absorbed person's engine for what they hold."""
    for person_id in absorbed:
        if person_id and person_id != survivor:
            batch.messages.append(
                streams.command(
                    partition_for(person_id, partitions),
                    "handover",
                    {"person_id": person_id, "survivor": survivor},
                    f"handover:{survivor}:{person_id}:{now!r}",
                )
            )


def handover(partitions: int, batch: Batch, person: Person, survivor: str, now: float) -> None:
    """Step 2, on the absorbed person's partition."""
    timers.cancel_all(batch, person)
    body: dict[str, Any] = {
        "person_id": survivor,
        "from": person.person_id,
        "instances": [instance_record(i) for i in person.live.values()],
        "arbiter": person_record(person.state) if person.state is not None else None,
        "entered": dict(person.entered),
        "ids": dict(person.ids),
    }
    batch.messages.append(
        streams.command(
            partition_for(survivor, partitions), "adopt", body, f"adopt:{person.person_id}:{survivor}:{now!r}"
        )
    )
    person.live.clear()
    person.state = PersonState(person.person_id)
    person.entered.clear()
    person.wake = None
    person.slots.clear()
    person.ids.clear()
    person.fields.clear()
    person.segments.clear()
    person.dirty = True


async def adopt(applier: Applier, hot: Partition, batch: Batch, person: Person, body: dict, now: float) -> None:
    """Step 3, on the survivor's partition."""
    survivor = person.person_id
    for key, value in body["ids"].items():
        person.ids.setdefault(key, value)
    for journey_id, at in body["entered"].items():
        person.entered[journey_id] = max(at, person.entered.get(journey_id, at))
    if body["arbiter"] is not None:
        person.state = merge_states(person.state or PersonState(survivor), person_from_record(body["arbiter"]))
        for held in person.state.awaiting:
            await _approval_follows(applier, batch, held, survivor)
    person.dirty = True
    for record in body["instances"]:
        moved = dataclasses.replace(instance_from_record(record), person_id=survivor)
        if moved.id in person.live:
            continue  # adopted already
        person.live[moved.id] = moved
        person.changed[moved.id] = moved
        if moved.status is Status.RUNNING:
            journey = await applier.version(moved.journey_id, moved.version)
            cap = journey.max_concurrent if journey is not None else 1
            running = sum(
                1 for i in person.live.values() if i.journey_id == moved.journey_id and i.status is Status.RUNNING
            )
            if running > cap:
                await applier.step(hot, batch, person, moved, ExitRequest(MERGED), now)
                continue
        for timer in moved.timers:
            # A fresh message id: the timer id was the first schedule's, which JetStream would drop.
            timers.schedule_instance_timer(
                batch,
                survivor,
                moved.id,
                timer.id,
                timer.at,
                clock_offset=applier.clock_offset,
                msg_id=f"moved:{survivor}:{timer.id}",
            )


async def _approval_follows(applier: Applier, batch: Batch, held: Held, survivor: str) -> None:
    """An approval record names the person whose engine applies the answer: the survivor from now on."""
    action_id = held.action.action_id
    doc = batch.writes.get((APPROVALS, action_id))
    if doc is None:
        stored = await applier.store.get(APPROVALS, action_id)
        doc = stored.doc if stored is not None else None
    if doc is not None and doc["person_id"] != survivor:
        batch.put(APPROVALS, action_id, {**doc, "person_id": survivor})
