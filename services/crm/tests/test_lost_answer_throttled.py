"""A write whose answer was lost (the CRM applied it) and whose retries are then throttled (429s, for as
long as the CRM keeps answering so): the CDP's values the CRM holds meanwhile are still the CDP's own - the
inbound poller reading the contact between two retries posts no "CRM Contact Updated" and no identify
sending them back to the profile. The CRM-administrator trial saw them echoed: the retries of a lost answer
ran inside the delivery, for up to `CDP_CRM_RETRY_FOR`, before anything recorded that the values had been
sent. Real HTTP: the local HubSpot behind the lost-answer test's proxy, which here also answers record
writes 429 (HubSpot's own answer) once it has dropped one."""

from __future__ import annotations

from aiohttp import web

from cdp_crm.domain.coalesce import record_key
from cdp_crm_emulators.hubspot import HubSpotEmulator

from .test_lost_answer_echo import LosingProxy, _synced

THROTTLED = {
    "status": "error",
    "message": "You have reached your ten_secondly_rolling limit.",
    "errorType": "RATE_LIMIT",
    "correlationId": "00000000-0000-0000-0000-000000000000",
    "policyName": "TEN_SECONDLY_ROLLING",
}


class ThrottlingProxy(LosingProxy):
    """The losing proxy; once it dropped a write's answer, the record writes after it are answered 429
    without reaching the CRM until `throttling` is cleared."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.throttling = False
        self.throttled = 0  # writes answered 429

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if self.is_write(request) and self.throttling:
            self.throttled += 1
            return web.json_response(THROTTLED, status=429)
        if self.is_write(request) and self.losing:
            self.throttling = True  # this write is applied and its answer dropped; those after it get 429s
            try:
                return await super().forward(request)
            finally:
                self.losing = False
        return await super().forward(request)


async def test_hubspot_a_lost_write_retried_under_429s_is_not_read_back_as_a_users_edit(world_factory, collector):
    async with HubSpotEmulator() as hubspot, ThrottlingProxy(hubspot.base_url) as proxy:
        world = await world_factory(hubspot)
        document = world.document()
        document["connections"][0]["url"] = proxy.url
        # Retries may go on for 25 s, as the process' 60 s default lets them.
        await world.start(document, retry_for=25.0, ack_wait=60.0)
        poller = world.hubspot_poller(collector)
        key = record_key("hs/contacts", (("cdp_id", "person-1"),))
        await world.profiles({"person-1": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: _synced(world, key, "firstname", "Ada"))
        contact = hubspot.find("contacts", "cdp_id", "person-1")
        assert await poller.poll() == 0

        # The CDP changes her first name: HubSpot applies it, the answer is lost, the retries get 429s.
        proxy.losing = True
        hubspot.clock.advance(5)
        await world.profiles({"person-1": {"traits.first_name": "Augusta"}})
        await world.eventually(lambda: proxy.lost == 1 and proxy.throttled >= 2)
        assert hubspot.find("contacts", "cdp_id", "person-1")["properties"]["firstname"] == "Augusta"

        # The poller reads the contact between two throttled retries: it holds the CDP's own value.
        assert await poller.poll() == 0
        assert collector.names() == [] and collector.events(kind="identify") == []

        proxy.throttling = False
        await world.eventually(lambda: _synced(world, key, "firstname", "Augusta"), timeout=40.0)
        hubspot.clock.advance(5)
        assert await poller.poll() == 0
        assert collector.names() == [] and collector.events(kind="identify") == []
        (only,) = hubspot.records("contacts")
        assert only["id"] == contact["id"] and only["properties"]["firstname"] == "Augusta"
        await world.stop()
