"""Merges and unmerges: a person merged into another hands their journeys and arbiter state to the survivor,
and an unmerge gives back what came from them.

Orchestration reads both as profile publishes them once it applied `identity.merged.<p>` /
`identity.unmerged.<p>`. A merge: the survivor's profile change lists the persons it absorbed (`merged`),
and each of those gets a change saying it is gone (`removed`, cause "merge"). An unmerge: the restored
person's change names the survivor it was split from (`split_from`, cause "unmerge"), with everything
their profile holds again. The changes arrive on different partitions, in either order, so each move is a
hand-over between two engines, each changing only its own persons:

Merge
1. The survivor's engine, on a change with `merged`, sends a `handover` command to each absorbed person's
   partition (from its outbox, message id from the survivor, the absorbed person and the stream time).
2. The absorbed person's engine (`handover`) takes everything that can still react (running instances,
   ended ones still watching their goal), their arbiter state (caps used, held and awaiting actions,
   events the suppressions watch), last entries and identifiers, cancels their timers there, empties the
   person (keeping `merged_into`: where they went), and sends it all to the survivor's partition as an
   `adopt` command. Their `removed` change, whenever it comes, no longer ends anything (cause "merge"):
   the instances wait for the hand-over.
3. The survivor's engine (`adopt`) takes each instance over under the survivor's id, with its timers
   scheduled again on the survivor's partition, and merges the arbiter state: sends in both histories
   count toward the survivor's caps, held actions stay held (their approval records now name the
   survivor, so approving one reaches this engine), the latest time of each watched event wins. It
   records what came from whom (`Person.merged_from[<absorbed>]`: the instance ids, the sends, the held
   actions, the identifiers, and the survivor's own last entries and watched-event times that the merge
   overwrote), as profile keeps each merged person's part.

Unmerge
1. The restored person's engine, on a change with `split_from`, clears its `merged_into` and sends a
   `restore` command to the survivor's partition.
2. The survivor's engine (`give_back`) takes out what `merged_from` says came from the restored person:
   their instances (still running, or ended: the records name them again), the sends that counted
   toward caps and the held actions of those instances, their identifiers (where the survivor still has
   them), and puts back its own last entries and watched-event times where nothing changed them since.
   It cancels the moved instances' timers there and sends the rest to the restored person's partition
   as an `adopt` (marked `unmerge`, so it records no merge).
3. The restored person's engine (`adopt`) takes them over as in a merge: the journeys and caps go on per
   person. Sends made while the two were one person stay counted for the survivor (they went to the
   merged profile's addresses, which were the survivor's); decisions made then stay in the survivor's
   history.

Re-entry: a moved instance runs on unless the receiving person already runs as many instances of that
journey as it allows at once (`max_concurrent`): then the moved one ends with reason "merged" (its
pending actions withdrawn) and the receiver's own goes on, so one person never gets one journey's
messages twice. The "never" and cooldown rules are about entering; both entries happened, for what were
two people then.

Decisions stay under the person they were decided for: the absorbed person's history is read as part of
the survivor's through `merged_from` (`decision_persons`, used by ListDecisions), and the absorbed id
resolves to the survivor through `merged_into`.

Every step is idempotent: a redelivered `handover` finds the person empty and sends an empty `adopt`; an
`adopt` of an instance the receiver holds already changes nothing; a redelivered `restore` finds nothing
recorded for the restored person and sends nothing. An unmerge applied before its merge's `adopt`
reached the survivor (the two within one hand-over's time) leaves the moved instances with the survivor,
and so does an unmerge naming a survivor that was itself merged into a third person since (what came
from the restored person is then recorded one level down, on the partition of the person it was merged
into first).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cdp_kit.bus import partition_for
from cdp_kit.storage import Store
from cdp_orchestration import actions, streams, timers
from cdp_orchestration.domain import arbiter
from cdp_orchestration.domain.arbiter import Held, PersonState, merge_states
from cdp_orchestration.domain.instance import ExitRequest, Status
from cdp_orchestration.domain.records import instance_from_record, instance_record, person_from_record, person_record
from cdp_orchestration.state import APPROVALS, INSTANCES, PERSONS, Batch, Partition, Person

if TYPE_CHECKING:
    from cdp_orchestration.apply import Applier

MERGED = "merged"  # the end reason of a moved instance the survivor's concurrency cap has no room for


def request_handovers(partitions: int, batch: Batch, survivor: str, absorbed: list[str], now: float) -> None:
    """Merge step 1: ask each absorbed person's engine for what they hold."""
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
    """Merge step 2, on the absorbed person's partition."""
    timers.cancel_all(batch, person)
    body: dict[str, Any] = {
        "person_id": survivor,
        "from": person.person_id,
        "instances": [instance_record(i) for i in person.live.values()],
        "arbiter": person_record(person.state) if person.state is not None else None,
        "entered": dict(person.entered),
        "ids": dict(person.ids),
    }
    if person.pending is not None:
        # An event of theirs the profile has not listed yet: it applies it to the survivor (its merge is
        # applied), so the survivor's fields lag behind it until the survivor's change lists it.
        body["pending"] = list(person.pending)
        person.caught_up()
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
    person.merged_into = survivor
    person.dirty = True


async def adopt(applier: Applier, hot: Partition, batch: Batch, person: Person, body: dict, now: float) -> None:
    """Merge step 3 (and unmerge step 3), on the receiving person's partition."""
    receiver = person.person_id
    if not body.get("unmerge"):
        _remember(person, body)
    named = actions.named(person)
    for key, value in body["ids"].items():
        person.ids.setdefault(key, value)
    for journey_id, at in body["entered"].items():
        person.entered[journey_id] = max(at, person.entered.get(journey_id, at))
    if body.get("pending"):
        event_id, since = body["pending"]
        mine = person.pending
        # One id is kept (`Person.pending`): the receiver's own latest, else theirs; the earlier start wins.
        person.pending = (mine[0], min(mine[1], since)) if mine is not None else (event_id, since)
    if body["arbiter"] is not None:
        person.state = merge_states(person.state or PersonState(receiver), person_from_record(body["arbiter"]))
        for held in person.state.awaiting:
            await _approval_follows(applier, batch, held, receiver)
    person.dirty = True
    if not named and actions.named(person):
        actions.attribute_sends(batch, person)  # what was sent to them before can now be attributed
    for record in body["instances"]:
        moved = dataclasses.replace(instance_from_record(record), person_id=receiver)
        if moved.id in person.live:
            continue  # adopted already
        person.live[moved.id] = moved
        person.changed[moved.id] = moved
        if moved.status is Status.RUNNING:
            journey = await applier.version(moved.journey_id, moved.version)
            cap = journey.max_concurrent if journey is not None else 1
            running = person.live.running(moved.journey_id)
            if running > cap:
                await applier.step(hot, batch, person, moved, ExitRequest(MERGED), now)
                continue
        for timer in moved.timers:
            # A fresh message id: the timer id was the first schedule's (and an earlier move's), which
            # JetStream would drop as a duplicate.
            timers.schedule_instance_timer(
                batch,
                receiver,
                moved.id,
                timer.id,
                timer.at,
                clock_offset=applier.clock_offset,
                msg_id=f"moved:{receiver}:{timer.id}:{now!r}",
            )
    state = person.state
    if state is not None and any(held.profile for held in state.deferred) and person.view().behind is None:
        # Actions held for the profile where they were: the receiver's fields are the profile's after the
        # merge (its change came before the hand-over was asked for), so they are decided now rather than
        # at the end of `profile_wait`.
        await applier.rule(hot, batch, person, arbiter.release(state, person.view(), applier.rules, now), now)


def _remember(person: Person, body: dict) -> None:
    """What came from the absorbed person (`body["from"]`), kept on the survivor for an unmerge. A second
    `adopt` from the same person (a redelivered hand-over, empty) adds to the record, never replaces it."""
    absorbed = body["from"]
    arbiter = person_from_record(body["arbiter"]) if body["arbiter"] is not None else None
    mine = person.state or PersonState(person.person_id)
    record = person.merged_from.setdefault(
        absorbed,
        {"instances": [], "sent": [], "held": [], "ids": {}, "entered": {}, "last_seen": {}, "before": {}},
    )
    # The survivor's own values the merge may overwrite: they come back if nothing changed them since.
    before = record["before"].setdefault("entered", {}), record["before"].setdefault("last_seen", {})
    record["instances"] = list(dict.fromkeys([*record["instances"], *(i["id"] for i in body["instances"])]))
    if arbiter is not None:
        record["sent"] = list(dict.fromkeys([*record["sent"], *(s.action_id for s in arbiter.sent)]))
        held = (*arbiter.deferred, *arbiter.awaiting)
        record["held"] = list(dict.fromkeys([*record["held"], *(h.action.action_id for h in held)]))
        for name, at in arbiter.last_seen.items():
            before[1].setdefault(name, mine.last_seen.get(name))
            record["last_seen"][name] = max(at, record["last_seen"].get(name, at))
    record["ids"].update(body["ids"])  # they go back with the restored person
    for journey_id, at in body["entered"].items():
        before[0].setdefault(journey_id, person.entered.get(journey_id))
        record["entered"][journey_id] = max(at, record["entered"].get(journey_id, at))


def request_restore(partitions: int, batch: Batch, person: Person, survivor: str, now: float) -> None:
    """Unmerge step 1, on the restored person's partition."""
    if person.merged_into:
        person.merged_into = ""
        person.dirty = True
    if survivor == person.person_id:
        return
    batch.messages.append(
        streams.command(
            partition_for(survivor, partitions),
            "restore",
            {"person_id": survivor, "restored": person.person_id},
            f"restore:{survivor}:{person.person_id}:{now!r}",
        )
    )


async def give_back(applier: Applier, partitions: int, batch: Batch, person: Person, restored: str, now: float) -> None:
    """Unmerge step 2, on the survivor's partition."""
    record = person.merged_from.pop(restored, None)
    if record is None:
        return  # nothing came from them, or it went back already
    person.dirty = True
    instance_ids = set(record["instances"])
    moving = [instance for instance in person.live.values() if instance.id in instance_ids]
    for instance in moving:
        for timer in instance.timers:
            batch.messages.append(streams.cancel(batch.partition, timer.id))
        del person.live[instance.id]
        person.changed.pop(instance.id, None)  # the receiver writes it, under the restored person
    records = [instance_record(instance) for instance in moving]
    # Ended ones no longer held here: their records go back to naming the restored person.
    gone = sorted(instance_ids - {instance.id for instance in moving})
    if gone:
        stored = await applier.store.get_many(INSTANCES, gone)
        records += [r.doc for r in stored.values() if r.doc.get("person_id") == person.person_id]
    state = person.state or PersonState(person.person_id)
    sent_ids, held_ids = set(record["sent"]), set(record["held"])

    def theirs(held: Held) -> bool:
        return held.action.action_id in held_ids or held.action.instance_id in instance_ids

    last_seen = _put_back(dict(state.last_seen), record["last_seen"], record["before"].get("last_seen", {}))
    back = PersonState(
        restored,
        sent=tuple(s for s in state.sent if s.action_id in sent_ids),
        deferred=tuple(h for h in state.deferred if theirs(h)),
        awaiting=tuple(h for h in state.awaiting if theirs(h)),
        last_seen=dict(record["last_seen"]),
    )
    person.state = dataclasses.replace(
        state,
        sent=tuple(s for s in state.sent if s.action_id not in sent_ids),
        deferred=tuple(h for h in state.deferred if not theirs(h)),
        awaiting=tuple(h for h in state.awaiting if not theirs(h)),
        last_seen=last_seen,
    )
    person.entered = _put_back(person.entered, record["entered"], record["before"].get("entered", {}))
    for key, value in record["ids"].items():
        if person.ids.get(key) == value:
            del person.ids[key]
    body: dict[str, Any] = {
        "person_id": restored,
        "from": person.person_id,
        "unmerge": True,
        "instances": records,
        "arbiter": person_record(back),
        "entered": dict(record["entered"]),
        "ids": dict(record["ids"]),
    }
    batch.messages.append(
        streams.command(
            partition_for(restored, partitions),
            "adopt",
            body,
            f"return:{person.person_id}:{restored}:{now!r}",
        )
    )


async def decision_persons(store: Store, person_id: str) -> list[str]:
    """Whose decisions make up a person's history: the person an id resolves to (following `merged_into`
    from one merged away) and everyone merged into them, at any depth (`merged_from`), that one first."""
    root, seen = person_id, {person_id}
    record = await store.get(PERSONS, root)
    while record is not None and record.doc.get("merged_into") and record.doc["merged_into"] not in seen:
        root = record.doc["merged_into"]
        seen.add(root)
        record = await store.get(PERSONS, root)
    persons, level = [root], [record]
    while level:
        absorbed = [p for r in level if r is not None for p in r.doc.get("merged_from") or {} if p not in persons]
        absorbed = list(dict.fromkeys(absorbed))
        persons += absorbed
        found = await store.get_many(PERSONS, absorbed) if absorbed else {}
        level = [found.get(p) for p in absorbed]
    return persons


def _put_back(values: dict[str, float], theirs: dict[str, float], before: dict[str, float | None]) -> dict[str, float]:
    """The survivor's own times where the merge's value (the absorbed person's) is still the one held."""
    for name, at in theirs.items():
        if values.get(name) == at and name in before:
            if before[name] is None:
                del values[name]
            else:
                values[name] = before[name]  # type: ignore[assignment]
    return values


async def _approval_follows(applier: Applier, batch: Batch, held: Held, survivor: str) -> None:
    """An approval record names the person whose engine applies the answer: the survivor from now on."""
    action_id = held.action.action_id
    doc = batch.writes.get((APPROVALS, action_id))
    if doc is None:
        stored = await applier.store.get(APPROVALS, action_id)
        doc = stored.doc if stored is not None else None
    if doc is not None and doc["person_id"] != survivor:
        batch.put(APPROVALS, action_id, {**doc, "person_id": survivor})
