"""HubSpot: a field a CRM user changed counts as changed when it was changed, not at the record's later
stamp. Within one polling window a rep changes a contact's phone (t1), the CDP changes the phone (t2 >
t1), and the rep edits the company (t3 > t2: the record's stamp). Before, the identify carrying the rep's
phone was stamped t3, and the profile - keeping per trait the newest value by event time - took the rep's
older phone over the CDP's newer one. Now the reader asks HubSpot for the history of the fields it reads
back (a batch read with ``propertiesWithHistory``, at most 50 contacts a request, only for contacts whose
change carries traits) and stamps each trait with the time its value was set: the phone at t1, so the
CDP's later change stands.

The profile is the stand-in of test_crm_field_conflicts.py (per trait, the newest event by its time). Real
HTTP against the local HubSpot, the engine on a real nats-server, the poller posting to a collector
stand-in."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cdp_crm_emulators.hubspot import HubSpotEmulator

from .test_crm_field_conflicts import _profile, _started


def _requests(hubspot, path: str) -> int:
    return sum(1 for r in hubspot.requests if r.path.startswith(path))


async def test_a_crm_fields_own_time_decides_against_the_cdps_change_not_the_records_later_stamp(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot:
        world, poller = await _started(world_factory, hubspot, collector)
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        cdp: list[tuple[str, Any, dt.datetime]] = [
            ("email", "ada@example.com", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
            ("phone", "+44 20 0000", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
        ]
        hubspot.clock.advance(5)
        phoned = hubspot.user_update("contacts", contact["id"], {"phone": "+44 20 1111"})  # t1
        t1 = dt.datetime.fromisoformat(phoned["properties"]["lastmodifieddate"].replace("Z", "+00:00"))
        cdp.append(("phone", "+44 20 2222", t1 + dt.timedelta(seconds=2)))  # t2: the CDP's change, later
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"company": "Analytical Engines"})  # t3: the stamp
        histories = _requests(hubspot, "/crm/v3/objects/contacts/batch/read")
        assert await poller.poll() == 2

        (identify,) = collector.events(kind="identify")
        assert identify["traits"] == {"phone": "+44 20 1111"}
        assert dt.datetime.fromisoformat(identify["timestamp"].replace("Z", "+00:00")) == t1
        (track,) = collector.events("CRM Contact Updated")
        assert track["timestamp"] > identify["timestamp"]  # the track keeps the record's stamp
        assert _profile(collector, cdp)["phone"] == "+44 20 2222"  # the CDP's later change stands
        assert _requests(hubspot, "/crm/v3/objects/contacts/batch/read") == histories + 1

        # The connector's own writes read back carry no traits: no history is asked for them.
        await world.profiles({"person-1": {"traits.phone": "+44 20 2222"}})

        async def written() -> bool:
            return hubspot.find("contacts", "cdp_id", "person-1")["properties"]["phone"] == "+44 20 2222"

        await world.eventually(written)
        histories = _requests(hubspot, "/crm/v3/objects/contacts/batch/read")
        await poller.poll()
        assert _requests(hubspot, "/crm/v3/objects/contacts/batch/read") == histories
        await world.stop()


async def test_traits_changed_at_different_times_each_carry_their_own_time(world_factory, collector):
    async with HubSpotEmulator() as hubspot:
        world, poller = await _started(world_factory, hubspot, collector)
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"phone": "+44 20 1111"})
        hubspot.clock.advance(5)
        hubspot.user_update("contacts", contact["id"], {"firstname": "Augusta"})
        assert await poller.poll() == 3  # the track, and an identify per time
        identifies = sorted(collector.events(kind="identify"), key=lambda e: e["timestamp"])
        assert [e["traits"] for e in identifies] == [{"phone": "+44 20 1111"}, {"first_name": "Augusta"}]
        assert len({e["messageId"] for e in identifies}) == 2
        assert all(e["context"]["traits"] == {"email": "ada@example.com"} for e in identifies)
        # Read again (the same page: a restart before the cursor moved), the same events: the same ids.
        ids = {e["messageId"] for e in collector.events()} | {e["messageId"] for e in identifies}
        assert len(ids) == 3
        await world.stop()
