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
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.engine import OrchestrationLogic
from cdp_orchestration.inputs import decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import PERSONS


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
