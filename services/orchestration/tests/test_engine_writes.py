"""What one batch writes: the person record only when the person changed.

Every profile change reaches orchestration (`profiles.changed`), and most change fields the person's view
holds; some change nothing orchestration keeps (a change listing only event ids or groups, or values the
view already has). Such a change must not rewrite the person record: that write is most of orchestration's
cost per profile change. In process, over a memory store: `OrchestrationLogic.apply` as the engine runs it.
"""

from __future__ import annotations

import time

from google.protobuf import struct_pb2

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import subjects
from cdp_kit.storage import Put, open_store
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.domain.arbiter import PersonState, Sent
from cdp_orchestration.domain.records import person_record
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.engine import OrchestrationLogic
from cdp_orchestration.inputs import decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import PERSONS, Partition, load_persons


def change(person: str, *, computed: dict | None = None, traits: dict | None = None, event_ids=()) -> bytes:
    one = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(time.time()))
    for name, value in (computed or {}).items():
        one.computed[name].CopyFrom(struct_pb2.Value(number_value=value))
    for name, value in (traits or {}).items():
        if isinstance(value, bool):
            one.traits[name].CopyFrom(struct_pb2.Value(bool_value=value))
        elif isinstance(value, float):
            one.traits[name].CopyFrom(struct_pb2.Value(number_value=value))
        else:
            one.traits[name].CopyFrom(struct_pb2.Value(string_value=value))
    one.event_ids.extend(event_ids)
    return profile_pb2.ProfileChangedBatch(changes=[one]).SerializeToString()


async def person_writes(logic: OrchestrationLogic, store, data: bytes) -> list[dict]:
    effects = await logic.apply(0, [decode(subjects.PROFILES, "", data, time.time())])
    await store.bulk_write(effects.writes)
    return [op.doc for op in effects.writes if isinstance(op, Put) and op.collection == PERSONS]


async def test_a_profile_change_that_changes_nothing_in_the_view_writes_nothing():
    async with open_store("memory://") as store:
        logic = OrchestrationLogic(store, Journeys(store), Rules(), partitions=1)
        first = await person_writes(logic, store, change("ada", computed={"orders": 2.0}, traits={"plan": "pro"}))
        assert [doc["fields"] for doc in first] == [{"computed.orders": 2.0, "traits.plan": "pro"}]

        # Only event ids (what profile sends for an event that moved no field), then the same values again.
        assert await person_writes(logic, store, change("ada", event_ids=["src:m-2"])) == []
        assert await person_writes(logic, store, change("ada", computed={"orders": 2.0}, traits={"plan": "pro"})) == []

        # Read back from the store (the hot cache dropped), the record is the one written first.
        logic.hot.clear()
        assert await person_writes(logic, store, change("ada", traits={"plan": "pro"})) == []
        assert (await store.get(PERSONS, "ada")).doc["fields"] == {"computed.orders": 2.0, "traits.plan": "pro"}


async def test_a_profile_change_that_changes_a_value_or_its_kind_writes_the_person():
    async with open_store("memory://") as store:
        logic = OrchestrationLogic(store, Journeys(store), Rules(), partitions=1)
        await person_writes(logic, store, change("ada", traits={"vip": 1.0, "plan": "pro"}))

        [doc] = await person_writes(logic, store, change("ada", traits={"plan": "team"}))
        assert doc["fields"] == {"traits.vip": 1.0, "traits.plan": "team"}
        # True == 1.0 in Python, but a boolean is not a number to the segment language: a change of kind.
        [doc] = await person_writes(logic, store, change("ada", traits={"vip": True}))
        assert doc["fields"]["traits.vip"] is True


async def test_a_person_record_leaves_out_the_parts_the_person_lacks_and_either_form_reads_back():
    async with open_store("memory://") as store:
        logic = OrchestrationLogic(store, Journeys(store), Rules(), partitions=1)
        # A person no journey has reached: their view, and none of the empty parts (no arbiter state either).
        [doc] = await person_writes(logic, store, change("ada", traits={"plan": "pro"}))
        assert set(doc) == {"fields", "segments", "changed_at"}

        # A record as earlier releases wrote it, every part present, empty or not, still reads.
        sent = PersonState("bob", sent=(Sent(1.0, "email", "a1"),), last_seen={"Order Completed": 2.0})
        old = {"fields": {"traits.plan": "pro"}, "segments": ["vip"], "arbiter": person_record(sent), "live": [],
               "entered": {"j1": 1.0}, "wake": None, "slots": {}, "ids": {"user_id": "u-bob"}}  # fmt: skip
        await store.put(PERSONS, "bob", old)
        hot = Partition()
        await load_persons(store, hot, {"ada", "bob"})
        ada, bob = hot.persons["ada"], hot.persons["bob"]
        assert (ada.fields, ada.segments, ada.state, ada.live, ada.entered, ada.wake, ada.slots, ada.ids) == (
            {"traits.plan": "pro"}, set(), PersonState("ada"), {}, {}, None, {}, {}
        )  # fmt: skip
        assert (bob.fields, bob.segments, bob.state, bob.entered, bob.ids) == (
            {"traits.plan": "pro"}, {"vip"}, sent, {"j1": 1.0}, {"user_id": "u-bob"}
        )  # fmt: skip
        # Written again, the record keeps what the person has.
        again = bob.record()
        assert (again["arbiter"], again["entered"], again["ids"]) == (
            person_record(sent),
            {"j1": 1.0},
            {"user_id": "u-bob"},
        )
        assert "live" not in again and "wake" not in again and "slots" not in again
