"""Field by field, not record by record: a person's email changed in the CDP and their phone in the CRM
within one polling window both survive, on both sides; only a field changed on both sides is a conflict,
and the later change of that field wins.

The inbound side keeps, per record, a digest of each field it read back (the memo, news.py `_memo`): the
last value both sides agreed on, with what the connector wrote there. A contact's `identify` carries only
the fields a CRM user changed since - not every field whose value is not the connector's. Before, a field
the CRM held from an earlier CRM edit (read, posted, its echo not yet written back) rode along with the
next edit of another field, stamped with the record's new modification time, and the profile - keeping per
trait the newest value by event time - took that stale value over the CDP's newer change.

The profile is a stand-in keeping, per trait, the value of the newest event by its timestamp (as the
profile service does), fed by the identifies the connector posts and by the CDP's own change. Real HTTP
against the local HubSpot, the engine on a real nats-server, the poller posting to a collector stand-in."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cdp_crm.domain.coalesce import record_key
from cdp_crm.inbound import HubSpotPoller
from cdp_crm.inbound.news import instant
from cdp_crm.state import CURSORS, RECORDS, SYNCED
from cdp_crm_emulators.hubspot import HubSpotEmulator

HS_KEY = record_key("hs/contacts", (("cdp_id", "person-1"),))


def _document(world) -> dict[str, Any]:
    document = world.document()
    document["connections"][0]["mappings"][0]["fields"]["phone"] = "traits.phone"
    return document


def _poller(world, collector) -> HubSpotPoller:
    poller = world.hubspot_poller(collector)
    poller.read_first_fresh = 0.0
    return poller


def _profile(collector, cdp: list[tuple[str, Any, dt.datetime]]) -> dict[str, Any]:
    """Per trait, the value of the newest event by its time: the CRM's identifies and the CDP's changes."""
    changes = [(trait, value, at) for trait, value, at in cdp]
    for event in collector.events(kind="identify"):
        changes += [(trait, value, instant(event["timestamp"])) for trait, value in event["traits"].items()]
    newest: dict[str, tuple[Any, dt.datetime]] = {}
    for trait, value, at in changes:
        if trait not in newest or at >= newest[trait][1]:
            newest[trait] = (value, at)
    return {trait: value for trait, (value, _) in newest.items()}


async def _synced(world, field: str, value: Any) -> bool:
    record = await world.store.get(RECORDS, HS_KEY)
    return record is not None and record.doc.get("state") == SYNCED and record.doc["fields"].get(field) == value


async def _write_profile(world, profile: dict[str, Any]) -> None:
    await world.profiles({"person-1": {f"traits.{trait}": value for trait, value in profile.items()}})


async def _started(world_factory, hubspot, collector):
    world = await world_factory(hubspot)
    await world.start(_document(world))
    poller = _poller(world, collector)
    world.logic.inbound = {"hs": poller}  # as the process wires it
    await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.phone": "+44 20 0000"}})
    await world.eventually(lambda: _synced(world, "phone", "+44 20 0000"))
    assert await poller.poll() == 0  # the connector's own contact
    return world, poller


async def test_a_field_changed_in_the_cdp_and_another_in_the_crm_in_one_window_both_survive_on_both_sides(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot:
        world, poller = await _started(world_factory, hubspot, collector)
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        cdp: list[tuple[str, Any, dt.datetime]] = [
            ("email", "ada@example.com", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
            ("phone", "+44 20 0000", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
        ]
        # Within one polling window: the person changes her email in the CDP (t1; its write to HubSpot not
        # made yet), and a rep changes her phone in HubSpot (t2 > t1).
        cdp.append(("email", "ada@cdp.example", dt.datetime.now(dt.UTC)))
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"phone": "+44 20 1111"})
        assert await poller.poll() == 2

        # The phone edit carries the phone: the email HubSpot holds is the connector's own (the link to the
        # person rides in context.traits, which identity reads and the profile does not take as a trait).
        (identify,) = collector.events(kind="identify")
        assert identify["traits"] == {"phone": "+44 20 1111"}
        assert identify["context"]["traits"] == {"email": "ada@example.com"}
        profile = _profile(collector, cdp)
        assert profile == {"email": "ada@cdp.example", "phone": "+44 20 1111"}

        # Both changes reach HubSpot, and the connector's record.
        await _write_profile(world, profile)
        await world.eventually(lambda: _synced(world, "email", "ada@cdp.example"))
        await world.eventually(lambda: _synced(world, "phone", "+44 20 1111"))
        stored = hubspot.find("contacts", "cdp_id", "person-1")["properties"]
        assert (stored["email"], stored["phone"]) == ("ada@cdp.example", "+44 20 1111")
        await poller.poll()  # the connector's own writes read back: no news
        assert _profile(collector, cdp) == profile
        await world.stop()


async def test_a_crm_value_read_already_does_not_ride_along_with_the_next_crm_edit(world_factory, collector):
    async with HubSpotEmulator() as hubspot:
        world, poller = await _started(world_factory, hubspot, collector)
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        cdp: list[tuple[str, Any, dt.datetime]] = [
            ("email", "ada@example.com", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
            ("phone", "+44 20 0000", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
        ]
        # A rep corrects her phone in HubSpot (t0): read, posted, the profile takes it. Its echo to HubSpot
        # is not written yet when, within the same window, ...
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"phone": "+44 20 1111"})
        assert await poller.poll() == 2
        t0 = instant(collector.events(kind="identify")[-1]["timestamp"])
        # ... the person changes it in the CDP (t1 > t0: a form) and a rep her email in HubSpot (t2 > t1).
        cdp.append(("phone", "+44 20 2222", t0 + dt.timedelta(seconds=2)))
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"email": "ada@crm.example"})
        assert await poller.poll() == 2

        # The email edit carries the email alone: the phone HubSpot holds is the one read at t0, unchanged
        # in HubSpot since (the memo's digest of it), so the CDP's later change of it stands.
        last = collector.events(kind="identify")[-1]
        assert last["traits"] == {"email": "ada@crm.example"}
        profile = _profile(collector, cdp)
        assert profile == {"email": "ada@crm.example", "phone": "+44 20 2222"}
        await _write_profile(world, profile)
        await world.eventually(lambda: _synced(world, "phone", "+44 20 2222"))
        await world.eventually(lambda: _synced(world, "email", "ada@crm.example"))
        stored = hubspot.find("contacts", "cdp_id", "person-1")["properties"]
        assert (stored["email"], stored["phone"]) == ("ada@crm.example", "+44 20 2222")
        await world.stop()


async def test_the_same_field_changed_on_both_sides_the_later_change_wins(world_factory, collector):
    async with HubSpotEmulator() as hubspot:
        world, poller = await _started(world_factory, hubspot, collector)
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        now = dt.datetime.now(dt.UTC)
        cdp: list[tuple[str, Any, dt.datetime]] = [("phone", "+44 20 0000", now - dt.timedelta(hours=1))]
        # The CDP changes the phone at t1; a rep changes it in HubSpot at t2 > t1 (the record's stamp).
        cdp.append(("phone", "+44 20 2222", now))
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"phone": "+44 20 3333"})
        await poller.poll()
        assert _profile(collector, cdp)["phone"] == "+44 20 3333"  # the CRM's, later
        # Had the CDP's change been the later one (t1 > t2), the CDP's would stand.
        cdp.append(("phone", "+44 20 4444", dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)))
        assert _profile(collector, cdp)["phone"] == "+44 20 4444"
        await _write_profile(world, _profile(collector, cdp))
        await world.eventually(lambda: _synced(world, "phone", "+44 20 4444"))
        assert hubspot.find("contacts", "cdp_id", "person-1")["properties"]["phone"] == "+44 20 4444"
        await world.stop()


async def test_a_memo_written_before_the_digests_were_kept_sends_the_next_edit_whole(world_factory, collector):
    """The upgrade: a record last read by a connector that kept no per-field digests has no base for its
    fields; its next edit is sent as before - every field that is not the connector's - and from then on
    field by field."""
    async with HubSpotEmulator() as hubspot:
        world, poller = await _started(world_factory, hubspot, collector)
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"phone": "+44 20 1111"})
        assert await poller.poll() == 2
        memo_key = f"hs:contacts:{contact['id']}"
        memo = await world.store.get(CURSORS, memo_key)
        assert set(memo.doc["fields"]) == {"email", "firstname", "phone"}  # digests, no values
        assert "+44 20 1111" not in str(memo.doc)
        await world.store.put(CURSORS, memo_key, {k: v for k, v in memo.doc.items() if k != "fields"})

        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"firstname": "Ada"})
        # The track, and the identify - one per time the traits took their values (test_crm_field_times.py):
        # the phone's, read before, with no digest to compare it with, rides along at its own time.
        assert await poller.poll() == 3
        last = collector.events(kind="identify")[-2:]
        assert sorted(tuple(e["traits"]) for e in last) == [("first_name",), ("phone",)]
        assert {k: v for e in last for k, v in e["traits"].items()} == {"phone": "+44 20 1111", "first_name": "Ada"}
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"firstname": "Augusta"})
        assert await poller.poll() == 2
        assert collector.events(kind="identify")[-1]["traits"] == {"first_name": "Augusta"}
        await world.stop()
