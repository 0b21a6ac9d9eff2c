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
    """A pace that notes each slot it hands out (the marker a test waits for) and each given back."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taken: list[float] = []
        self.given_back: list[float] = []

    def reserve(self, *, inbound: bool) -> float:
        slot = super().reserve(inbound=inbound)
        self.taken.append(slot)
        return slot

    def give_back(self, slot: float, *, inbound: bool) -> None:
        self.given_back.append(slot)
        super().give_back(slot, inbound=inbound)


@pytest.mark.parametrize("inbound", [True, False], ids=["inbound", "lookup"])
async def test_a_search_cancelled_while_it_waits_for_its_slot_gives_the_slot_back(inbound):
    """Before: the cancelled search's slot stayed reserved, and the next search waited past it for nothing
    (an inbound one a whole share's spacing: 100.42 here, a lookup 100.21)."""
    pace = SearchPace(per_second=10.0, inbound_share=0.5, clock=lambda: 100.0)  # 0.105 s apart (`late`), inbound 0.21
    first = await pace.take(inbound=inbound)
    waiting = asyncio.create_task(pace.take(inbound=inbound))  # its slot: 100.21 inbound, 100.105 a lookup
    await asyncio.sleep(0)  # reserved, waiting for it
    waiting.cancel()  # a stopping poller, an erasure's deadline
    with pytest.raises(asyncio.CancelledError):
        await waiting
    after = await pace.take(inbound=inbound)
    assert (first, after) == pytest.approx((100.0, 100.21 if inbound else 100.105))


async def test_searches_whose_wait_for_their_slots_woke_late_take_new_ones_spaced_from_each_other():
    """Two lookups wait for their slots (100.105, 100.21) and the event loop stalls until 100.4: both wake
    late, past `late`. Before: each left in its slot, the two together at 100.4 - with the searches on time
    after them, more than the limit arrived within one second. Now each gives its slot back and takes a new
    one: 100.4 and a spacing after it."""
    now = [100.0]
    pace = SearchPace(per_second=10.0, inbound_share=0.5, clock=lambda: now[0])  # 0.105 s apart, `late` 0.05 s
    first = await pace.take(inbound=False)  # sent on time
    waiting = [asyncio.create_task(pace.take(inbound=False)) for _ in range(2)]
    await asyncio.sleep(0)  # reserved, asleep for 0.105 and 0.21 s
    now[0] = 100.4  # the stall: on the pace's clock, they wake 0.295 and 0.19 s after their slots
    second, third = await asyncio.gather(*waiting)
    assert (first, second, third) == pytest.approx((100.0, 100.4, 100.505))


async def test_a_search_that_waited_after_taking_its_slot_leaves_in_a_new_one_spaced_from_those_sent():
    """The inbound reader takes its slot, then waits for the account's budget: 0.3 s later it is about to
    send, and a lookup left at that moment. `leave` gives the stale slot back and takes the next free one,
    a spacing after the lookup (before: the search was sent at once, 0.3 s after its slot and beside the
    lookup). One a little late, within `late`, leaves in its slot."""
    now = [100.0]
    pace = SearchPace(per_second=10.0, inbound_share=0.5, clock=lambda: now[0])
    slot = await pace.take(inbound=True)
    now[0] = 100.3  # the budget's wait
    assert await pace.take(inbound=False) == pytest.approx(100.3)  # a lookup, sent at once
    assert await pace.leave(slot, inbound=True) == pytest.approx(100.405)
    on_time = await pace.take(inbound=True)  # the reader's next search: its share's spacing on
    assert on_time == pytest.approx(100.615)
    now[0] = on_time + 0.04  # about to be sent 0.04 s after its slot: within `late`
    assert await pace.leave(on_time, inbound=True) == on_time


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
    assert await pace.take(inbound=True) == 100.0  # the slot nobody searched in, not 100.525


async def test_an_inbound_search_the_budget_held_past_its_slot_is_sent_in_a_new_one(store, session):
    """The reader takes its search's slot, then the account's budget holds it back a second (a
    Retry-After): by then the slot is long past. It gives the slot back and leaves in a new one - the one
    HubSpot sees it in. Before: it was sent at once, a second after its slot (bunching with the searches
    on time after it)."""
    async with HubSpotEmulator() as hubspot:
        connection = _hubspot_connection(hubspot.base_url)
        budget = SharedBudget(store, connection)
        await budget.throttled(time.time(), retry_after=1, daily=False)
        pace = Taken()  # the machine's clock (monotonic)
        reader = HubSpotReader(connection, session, TOKEN, budget, searches=pace)
        await reader._search("contacts", EPOCH, None)
        first, second = pace.taken
        assert pace.given_back == [first]
        assert second - first > pace.late  # the budget's second: the stale slot given back, a new one taken
        (search,) = [r for r in hubspot.requests if r.path.endswith("/search")]
        arrived = search.at - hubspot.clock.offset - (time.time() - time.monotonic())  # on the pace's clock
        assert arrived >= second - 0.005  # (HubSpot's clock converted: within a few milliseconds)


async def test_an_inbound_search_cancelled_while_it_waits_for_its_new_slot_gives_back_the_slot_and_the_budget(
    store, session
):
    """The budget held the reader's search past its slot; the new slot it takes comes a spacing on (a
    lookup's is in the way) and the poller stops meanwhile: never searched, it gives the new slot back and
    the unit of the account's budget it held."""
    connection = _hubspot_connection("http://127.0.0.1:9")  # never asked: stopped before searching
    budget = SharedBudget(store, connection)
    refunded = []
    refund = budget.refund

    async def recorded(reservation, now):
        refunded.append(reservation)
        await refund(reservation, now)

    budget.refund = recorded
    await budget.throttled(time.time(), retry_after=1, daily=False)
    now = [100.0]
    pace = Taken(clock=lambda: now[0])
    reader = HubSpotReader(connection, session, TOKEN, budget, searches=pace)
    search = asyncio.create_task(reader._search("contacts", EPOCH, None))
    await until(lambda: pace.taken, "the search's slot")
    now[0] = 101.0  # the budget's second
    assert await pace.take(inbound=False) == 101.0  # a lookup, sent
    await until(lambda: len(pace.taken) == 3, "the search's new slot", timeout=10)
    assert pace.taken == pytest.approx([100.0, 101.0, 101.2625]) and pace.given_back == [100.0]
    search.cancel()  # the poller stopped
    with pytest.raises(asyncio.CancelledError):
        await search
    assert pace.given_back == pytest.approx([100.0, 101.2625])
    assert len(refunded) == 1 and refunded[0].granted
    assert (await budget.status(time.time()))["burst_remaining"] == budget.burst  # nothing held


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
