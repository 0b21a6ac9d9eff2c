"""The edges of a connection's search pace (`SearchPace`, adapters/hubspot.py): a search that is not sent
gives its slot back, and where the pace does not reach - an erasure in another replica paces its own
searches - HubSpot's 429 ``SECONDLY`` is waited out and nothing is lost.

The pace's slots are asserted on a clock that stands still while they are asked for (`clock=`): on the
machine's clock a loaded event loop would move them."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from cdp_crm.adapters.hubspot import HubSpotAdapter, SearchPace
from cdp_crm.budgets import SharedBudget
from cdp_crm.inbound import HubSpotPoller
from cdp_crm.inbound.core import EPOCH
from cdp_crm.inbound.hubspot import HubSpotReader
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_testing.waiting import until

from .test_inbound_search_share import _hubspot_connection

TOKEN = "pat-local-hubspot"


class Taken(SearchPace):
    """A pace that notes each slot it hands out: the marker a test waits for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taken: list[float] = []

    async def take(self, *, inbound: bool) -> float:
        slot = await super().take(inbound=inbound)
        self.taken.append(slot)
        return slot


@pytest.mark.parametrize("inbound", [True, False], ids=["inbound", "lookup"])
async def test_a_search_cancelled_while_it_waits_for_its_slot_gives_the_slot_back(inbound):
    """Before: the cancelled search's slot stayed reserved, and the next search waited past it for nothing
    (an inbound one a whole share's spacing: 100.4 here, a lookup 100.2)."""
    pace = SearchPace(per_second=10.0, inbound_share=0.5, clock=lambda: 100.0)  # searches 0.1 s apart, inbound 0.2
    first = await pace.take(inbound=inbound)
    waiting = asyncio.create_task(pace.take(inbound=inbound))  # its slot: 100.2 inbound, 100.1 a lookup
    await asyncio.sleep(0)  # reserved, waiting for it
    waiting.cancel()  # a stopping poller, an erasure's deadline
    with pytest.raises(asyncio.CancelledError):
        await waiting
    after = await pace.take(inbound=inbound)
    assert (first, after) == pytest.approx((100.0, 100.2 if inbound else 100.1))


async def test_an_inbound_search_cancelled_while_it_waits_for_the_budget_gives_its_slot_back(store, session):
    """The reader takes its search's slot, then a unit of the account's budget; stopped while the budget
    holds it back (a Retry-After), it never searched. Before: the slot stayed spent, and the reader's next
    search, started at once, waited half a second (the inbound share's spacing) for nothing."""
    connection = _hubspot_connection("http://127.0.0.1:9")  # never asked: the budget holds the search back
    budget = SharedBudget(store, connection)
    await budget.throttled(time.time(), retry_after=60, daily=False)
    pace = Taken(clock=lambda: 100.0)
    reader = HubSpotReader(connection, session, TOKEN, budget, searches=pace)
    search = asyncio.create_task(reader._search("contacts", EPOCH, None))
    await until(lambda: pace.taken, "the search's slot")
    assert pace.taken == [100.0]
    search.cancel()  # the poller stopped
    with pytest.raises(asyncio.CancelledError):
        await search
    assert await pace.take(inbound=True) == 100.0  # the slot nobody searched in, not 100.5


async def test_searches_over_the_tokens_limit_are_read_again_a_second_later_and_nothing_is_lost(
    store, session, collector
):
    """The pace is per process: an erasure running in another replica than the connection's reader paces
    its lookups on its own, and together they can exceed the token's limit. HubSpot answers 429
    ``SECONDLY``: the reader sends that search again a second later (the limit's window) - in the same
    polling turn, up to five times, then from the cursor at the next - and every change is posted once; a
    lookup answered 429 is unanswered (the erasure asks again), never "no such record".

    Here the token's limit is one search a second, so the reader's own share (two a second, its pages half a
    second apart) meets it too."""
    async with HubSpotEmulator(search_per_second=1) as hubspot:
        for i in range(450):
            hubspot.user_create("contacts", {"email": f"p{i}@example.com", "firstname": f"P{i}"})
            hubspot.clock.advance(1)  # a stamp each: three pages of 200
        ticket = hubspot.user_create("tickets", {"subject": "Refund", "cdp_id": "t-1"})
        connection = _hubspot_connection(hubspot.base_url)
        budget = SharedBudget(store, connection)
        poller = HubSpotPoller(
            store, connection, session, TOKEN, budget, collector.client(session), objects=("contacts",)
        )
        # The other replica: the same token, a pace of its own, looking up tickets (its searches told apart).
        elsewhere = HubSpotAdapter(session, token=TOKEN, base_url=hubspot.base_url)
        tickets = dataclasses.replace(connection.mappings[0], object="tickets")
        answers: list[dict | None] = []

        async def erasure() -> None:
            for _ in range(40):  # as the erasure comes again while the CRM does not answer
                found, _ = await elsewhere.find(tickets, "cdp_id", ["t-1"], ["subject"])
                answers.append(found)
                if found:
                    return

        reader = asyncio.create_task(poller.run(0.5))
        try:
            await asyncio.gather(erasure(), erasure())
            await until(lambda: len(collector.events("CRM Contact Created")) == 450, "every contact", timeout=60)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert len({e["messageId"] for e in collector.events()}) == len(collector.events()) == 450
        searched = [(r.at, r.status) for r in hubspot.requests if r.path == "/crm/v3/objects/contacts/search"]
        throttled = [i for i, (_, status) in enumerate(searched) if status == 429]
        assert throttled, searched  # HubSpot refused some of the reader's searches: over the token's limit
        for i in throttled:
            if i + 1 < len(searched):
                assert searched[i + 1][0] - searched[i][0] >= 1.0 - 0.05, searched  # a second later, not at once
        assert {status for _, status in searched} == {200, 429}
        # Lookups: the record, or unanswered (None) for each one HubSpot refused - never "nothing there".
        refused = [r for r in hubspot.requests if r.path == "/crm/v3/objects/tickets/search" and r.status == 429]
        assert all(a is None or set(a) == {ticket["id"]} for a in answers), answers
        assert sum(1 for a in answers if a is None) == len(refused)
        assert sum(1 for a in answers if a) == 2  # each erasure's lookup answered in the end
