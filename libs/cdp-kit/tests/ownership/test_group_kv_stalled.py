"""A service opening its ownership bucket while nats-server stalls longer than a JetStream request's 5 s
(CI's loaded workers, a node under pressure) opens it once the server answers again: the bucket's look-up
is asked again as the bus's setup requests are (`cdp_kit.bus.setup.answered`), where the start failed
with a bare TimeoutError."""

from __future__ import annotations

import asyncio

from cdp_kit.bus import Bus
from cdp_kit.ownership.group_kv import GroupKv

STALL_SECONDS = 7.0  # longer than nats-py's 5 s request timeout


async def test_the_bucket_opens_after_a_server_stall_longer_than_a_request_timeout(nats_server):
    async with Bus.connect(nats_server.url, name="kv-stalled", connect_timeout=10) as bus:
        made = await GroupKv.open(bus.js, "cdp_ownership_stalled", "profile")  # exists from here on
        with nats_server.paused():
            opening = asyncio.create_task(GroupKv.open(bus.js, "cdp_ownership_stalled", "profile"))
            await asyncio.sleep(STALL_SECONDS)
        opened = await asyncio.wait_for(opening, 60)
        assert opened._direct == made._direct
        await opened.put("profile.p0", b"member-a")
        assert (await made.get("profile.p0")).value == b"member-a"
