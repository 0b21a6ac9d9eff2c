"""With a profile service to read persons from (as `make up` runs it), the connector keeps of each person
only the fields its mappings read: a profile change of nothing mapped - most of them: an event moving
computed traits, a score no CRM shows - is dropped as it is decoded, with nothing read or written, while a
change of a mapped field still reaches the CRM, and a field mapped later is read from the profile service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cdp_crm.state import PERSONS
from cdp_crm_emulators.hubspot import HubSpotEmulator


class ProfileService:
    """BatchGetProfiles as the connector reads it: person id -> flat fields."""

    def __init__(self) -> None:
        self.profiles: dict[str, dict[str, Any]] = {}
        self.asked: list[str] = []

    async def fetch(self, person_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        self.asked.extend(person_ids)
        return {p: dict(self.profiles[p]) for p in person_ids if p in self.profiles}


def one_per_partition(world) -> list[str]:
    found: dict[int, str] = {}
    for i in range(100):
        found.setdefault(world.partition(f"marker-{i}"), f"marker-{i}")
    return [found[p] for p in sorted(found)]


async def test_a_change_of_nothing_mapped_is_dropped_and_a_mapped_one_still_syncs(world_factory):
    profiles = ProfileService()
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start(refresh=profiles.fetch)
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-1"))
        # Nothing any mapping reads: no view, no call.
        await world.profiles({"person-1": {"traits.plan": "pro"}, "person-2": {"traits.plan": "free"}})
        await world.profiles({"person-1": {"scores.churn_risk": 0.8712}})
        markers = one_per_partition(world)
        await world.profiles({m: {"traits.first_name": m} for m in markers})  # after the rest, in every partition
        await world.eventually(lambda: all(emulator.find("contacts", "cdp_id", m) for m in markers))

        contact = emulator.find("contacts", "cdp_id", "person-1")
        assert contact["properties"]["cdp_churn_risk"] == "0.87"
        assert contact["properties"]["email"] == "ada@example.com"
        assert emulator.find("contacts", "cdp_id", "person-2") is None
        assert await world.store.get(PERSONS, "person-2") is None
        view = (await world.store.get(PERSONS, "person-1")).doc
        assert view["fields"] == {
            "traits.email": "ada@example.com", "traits.first_name": "Ada", "scores.churn_risk": 0.8712
        }  # fmt: skip
        assert profiles.asked == []  # every view was kept under these mappings: nothing read again


async def test_a_field_mapped_later_is_read_from_the_profile_service_before_the_view_is_used(world_factory):
    profiles = ProfileService()
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        document = world.document()
        first = document["connections"][0]["mappings"][0]
        first["fields"] = {"email": "traits.email"}
        await world.start(document, refresh=profiles.fetch)
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-1"))
        await world.stop()

        first["fields"]["firstname"] = "traits.first_name"  # the administrator maps one more field
        profiles.profiles["person-1"] = {"traits.email": "ada@example.com", "traits.first_name": "Ada"}
        await world.start(document, refresh=profiles.fetch)
        await world.profiles({"person-1": {"traits.email": "ada@example.org"}})

        def both_written():
            contact = emulator.find("contacts", "cdp_id", "person-1")
            return contact is not None and contact["properties"].get("email") == "ada@example.org"

        await world.eventually(both_written)
        contact = emulator.find("contacts", "cdp_id", "person-1")
        assert contact["properties"].get("firstname") == "Ada"  # the view did not hold it: read from profile
        assert profiles.asked == ["person-1"]
