"""A mapped value the mapping leaves unjoined - a list (the person's segments) or an object (a structured
trait) - reaches HubSpot as HubSpot reads it: a list ``;``-joined, as a multiple-checkbox property holds its
options, an object as JSON text; never Python's text (``"['vip', 'beta']"``). What the connector wrote so
does not come back from the inbound reader as a HubSpot user's edit, and a user's edit of it still does."""

from __future__ import annotations

import time

import orjson

from cdp.profile.v1 import profile_pb2
from cdp_crm.budgets import SharedBudget
from cdp_crm.inbound import HubSpotPoller
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import subjects
from cdp_kit.timestamps import from_seconds

TOKEN = "pat-local-hubspot"


def _document(world) -> dict:
    document = world.document()
    contacts = document["connections"][0]["mappings"][0]
    contacts["fields"]["cdp_segments"] = "segments"  # no join: the list as it is
    contacts["fields"]["company"] = "traits.employer"  # an object trait
    contacts["triggers"] = ["profiles.changed", "segments.entered", "segments.exited"]
    return document


async def _employer(world, person: str, employer: dict) -> None:
    """A profile change setting an object trait (the world's helper sends text traits only)."""
    change = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(time.time()))
    change.traits["employer"].struct_value.update(employer)
    batch = profile_pb2.ProfileChangedBatch(changes=[change])
    await world._publish(subjects.profiles_changed(world.partition(person)), batch.SerializeToString())


def _properties(hubspot: HubSpotEmulator) -> dict:
    return (hubspot.find("contacts", "cdp_id", "person-1") or {}).get("properties", {})


async def test_a_list_is_written_semicolon_joined_an_object_as_json_and_neither_comes_back_as_news(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        await world.start(_document(world))
        (connection,) = world.connections
        poller = HubSpotPoller(
            world.store, connection, world.session, TOKEN, SharedBudget(world.store, connection),
            collector.client(world.session), objects=("contacts",),
        )  # fmt: skip
        await world.profiles({"person-1": {"traits.email": "ada@example.com"}})
        await world.segment("person-1", "vip")
        await world.segment("person-1", "beta")
        await _employer(world, "person-1", {"name": "Analytical Engines", "size": 3})
        await world.eventually(
            lambda: (
                len(str(_properties(hubspot).get("cdp_segments") or "").split(";")) == 2
                and _properties(hubspot).get("company")
            )
        )
        written = _properties(hubspot)
        assert sorted(written["cdp_segments"].split(";")) == ["beta", "vip"]
        assert orjson.loads(written["company"]) == {"name": "Analytical Engines", "size": 3}
        # the connector's own writes, read back in HubSpot's form, are not news
        assert await poller.poll() == 0
        assert collector.names() == []
        # a user's edit of the object the connector wrote is news: the trait comes back as HubSpot holds it
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", written["hs_object_id"], {"company": "Babbage & Co"})
        assert await poller.poll() == 2  # the change event and the identify
        assert collector.names() == ["CRM Contact Updated"]
        (identify,) = collector.events(kind="identify")
        assert identify["traits"]["employer"] == "Babbage & Co"
        await world.stop()


def test_the_echo_check_reads_a_list_or_an_object_back_in_the_forms_the_adapter_writes():
    from cdp_crm.adapters.hubspot import _text
    from cdp_crm.inbound.news import _same

    written = ["vip", 2, 0.5, True]
    assert _text(written) == "vip;2;0.5;true"
    assert _same("vip;2;0.5;true", written) and _same("true;0.5;vip;2", written)  # options in any order
    assert not _same("vip;2;0.5", written) and not _same("vip;2;0.5;true;beta", written)
    assert _same(["vip", "2", "0.5", "true"], written)  # a CRM that gives the list back as a list
    assert _text([]) == "" and _same("", []) and not _same(None, [])
    nested = [{"a": 1}, "b"]
    assert _text(nested) == '[{"a":1},"b"]' and _same(_text(nested), nested)
    employer = {"name": "Analytical Engines", "size": 3}
    assert _same(_text(employer), employer) and not _same("Analytical Engines", employer)
    assert _same('{"size":3,"name":"Analytical Engines"}', employer)
