"""What HubSpot's inbound reader spends of the token's search limit (four a second: adapters/hubspot.py)
while the connector writes contacts and nobody else edits anything, against the local HubSpot over HTTP
with the outbound engine writing (on the real nats-server) and the poller run as the process runs it: its
polling turns, and `read_first` before each batch of upserts.

Before the search pace (searches spaced 0.25 s, pages of 100) a busy read paged through the connector's own
writes back to back: 2.5-3.6 searches a second at 300 writes/s, the limit's whole, with nothing left for
an erasure's lookups. Now the inbound side takes at most half of it (`INBOUND_SHARE`), pages of 200, and,
where signed webhooks reach it, quiet polling turns stretch - and a CRM user's edit of a contact the
connector writes in the same second still arrives."""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import itertools
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

import cdp_crm.adapters.hubspot as adapter_module
import cdp_crm.inbound.hubspot as reader_module
from cdp_crm.adapters.hubspot import INBOUND_SHARE, SEARCHES_PER_SECOND, HubSpotAdapter, SearchPace
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotPoller, HubSpotWebhooks, open_poller
from cdp_crm.inbound.core import QUIET_STRETCH
from cdp_crm.state import CURSORS
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_testing.waiting import until

TOKEN = "pat-local-hubspot"
SEARCH = "/search"


@dataclass
class Spent:
    searches_per_second: float  # inbound searches a second over the window
    read_back_per_second: float  # records the searches returned a second
    busiest: int  # the most searches that reached HubSpot within any two seconds
    written_per_second: float  # contact writes the connector made a second
    behind: int  # contacts changed after the inbound cursor when the writes stopped (how far it lags)


async def load(world, rate: int, seconds: float, during=None) -> float:
    """`rate` contact changes a second, each a new person (as the pipeline's load changes persons), for
    `seconds`; `during` (a coroutine function) runs once, a second into it. When it ended (monotonic)."""
    person, tick, began = 0, 0.1, time.monotonic()
    side = None
    while time.monotonic() - began < seconds:
        changes = {}
        for _ in range(int(rate * tick)):
            person += 1
            changes[f"person-{person}"] = {"traits.email": f"p{person}@example.com", "traits.first_name": "P"}
        await world.profiles(changes)
        if during is not None and side is None and time.monotonic() - began >= 1.0:
            side = asyncio.create_task(during())
        steps = round((time.monotonic() - began) / tick)
        await asyncio.sleep(max(0.0, began + tick * (steps + 1) - time.monotonic()))
    if side is not None:
        await side
    return time.monotonic()


async def start_reading(world, collector, every: float) -> tuple[HubSpotPoller, asyncio.Task, list]:
    """The connection's poller, reading every `every` seconds and before each batch of contact writes (as
    the process wires it); the (monotonic time, records) of each search it sends."""
    await world.start()
    (connection,) = world.connections
    poller = HubSpotPoller(
        world.store, connection, world.session, TOKEN, SharedBudget(world.store, connection),
        collector.client(world.session),
    )  # fmt: skip
    world.logic.inbound[connection.id] = poller
    pages: list[tuple[float, int]] = []
    search = poller.reader._search

    async def counted(*args, **kwargs):
        page, following = await search(*args, **kwargs)
        pages.append((time.monotonic(), len(page)))
        return page, following

    poller.reader._search = counted
    await poller.poll()  # the cursors: from now on
    return poller, asyncio.create_task(poller.run(every)), pages


async def measure(world, collector, hubspot: HubSpotEmulator, *, rate: int, seconds: float, every: float) -> Spent:
    """The harness: what the inbound side spent while the connector wrote `rate` contacts a second for
    `seconds` (over the window after a warm-up second)."""
    _, run, pages = await start_reading(world, collector, every)
    began = time.monotonic()
    searches_before = len(hubspot.requests)
    try:
        ended = await load(world, rate, seconds)
        cursor = await world.store.get(CURSORS, "hs:contacts")
        after = cursor.doc["after"]
        behind = sum(1 for c in hubspot.records("contacts") if c["properties"]["lastmodifieddate"] > after)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    span = ended - began - 1.0
    inside = [n for at, n in pages if began + 1.0 <= at <= ended]
    arrivals = [r.at for r in list(hubspot.requests)[searches_before:] if r.path.endswith(SEARCH)]
    busiest = max((bisect.bisect_right(arrivals, at + 2.0) - i for i, at in enumerate(arrivals)), default=0)
    written = len(hubspot.records("contacts")) / (ended - began)
    return Spent(len(inside) / span, sum(inside) / span, busiest, written, behind)


async def test_inbound_searches_keep_to_their_share_of_the_limit_while_the_connector_writes_contacts(
    world_factory, collector
):
    """Fails before the search pace: 2.5-3.6 searches a second, 9 within two seconds."""
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        spent = await measure(world, collector, hubspot, rate=300, seconds=10.0, every=5.0)  # make up's turns
        print(f"\n{spent}")
        share = SEARCHES_PER_SECOND * INBOUND_SHARE
        assert spent.searches_per_second <= share * 1.05, spent
        # At HubSpot: a search arrives at its slot or a little after (the event loop's delay), never before.
        assert spent.busiest <= 2 * share + 1, spent
        assert collector.names() == []  # only the connector's own writes: no news
        await world.stop()


async def test_a_users_edit_of_a_contact_the_connector_writes_in_the_same_second_still_arrives(
    world_factory, collector
):
    async with HubSpotEmulator() as hubspot:
        world = await world_factory(hubspot)
        _, run, _ = await start_reading(world, collector, every=2.0)
        stamps: list[str] = []

        async def rep_and_connector() -> None:
            # The connector writes Ada's contact; a sales rep edits it; the connector writes it again - within
            # one second, while it writes 300 other contacts a second.
            await world.profiles({"ada": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
            contact = await until(lambda: hubspot.find("contacts", "cdp_id", "ada"), "the connector's write")
            stamps.append(contact["properties"]["lastmodifieddate"])
            edited = hubspot.user_update("contacts", contact["id"], {"lastname": "King", "phone": "+44 20 7946 0000"})
            stamps.append(edited["properties"]["lastmodifieddate"])
            await world.profiles({"ada": {"traits.first_name": "Augusta"}})
            await until(
                lambda: hubspot.find("contacts", "cdp_id", "ada")["properties"]["firstname"] == "Augusta",
                "the connector's second write",
            )

        try:
            await load(world, 300, 6.0, during=rep_and_connector)
            await until(lambda: collector.events("CRM Contact Updated"), "the rep's edit as an event", timeout=60)
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        first, edit = (dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in stamps)
        assert edit - first < 1.0  # the same second
        (updated,) = collector.events("CRM Contact Updated")
        assert updated["properties"]["lastname"] == "King" and updated["properties"]["phone"] == "+44 20 7946 0000"
        assert updated["properties"]["cdp_person_id"] == "ada"
        assert collector.names() == ["CRM Contact Updated"]  # the connector's own writes are still no news
        await world.stop()


async def test_an_erasure_lookup_is_not_held_behind_the_inbound_share():
    """The slots each search is given, on a clock that stands still while they are asked for (on the
    machine's clock a loaded event loop would move them, and an assertion on when each was sent with it)."""
    pace = SearchPace(per_second=10.0, inbound_share=0.5, clock=lambda: 100.0)  # 0.105 s apart (`late`), inbound 0.21
    first = await pace.take(inbound=True)
    inbound = asyncio.create_task(pace.take(inbound=True))  # its slot: 0.21 s after the first
    await asyncio.sleep(0)
    lookup = await pace.take(inbound=False)  # the free slot between the two, not after the second
    second = await inbound
    assert (first, lookup, second) == pytest.approx((100.0, 100.105, 100.21))


async def test_the_inbound_reader_and_the_adapter_share_the_tokens_searches(store, session, collector):
    document = {"connections": [{"id": "hs", "kind": "hubspot", "url": "http://127.0.0.1:9",
                                 "credentials": {"token": "HUBSPOT_TOKEN"},
                                 "mappings": [{"id": "contacts", "object": "contacts",
                                               "match": {"cdp_id": "person.id"}, "fields": {"email": "traits.email"}}]}]}  # fmt: skip
    (connection,) = parse_connections(document)
    adapter = HubSpotAdapter(session, token=TOKEN, base_url="http://127.0.0.1:9")
    budget = SharedBudget(store, connection)
    poller = open_poller(store, connection, adapter, budget, collector.client(session), session, {"token": TOKEN})
    assert poller.reader.searches is adapter.searches


@pytest.mark.parametrize("every", [0.25])
async def test_with_webhooks_reaching_it_quiet_polling_turns_stretch_and_a_webhook_brings_the_interval_back(
    store, session, collector, every
):
    async with HubSpotEmulator(client_secret="app-secret", search_per_second=1000) as hubspot:  # pace below
        ada = hubspot.user_create("contacts", {"email": "ada@example.com"})
        poller = _paced_poller(store, session, collector, _hubspot_connection(hubspot.base_url), ("contacts", "deals"))
        await poller.poll()

        def turns() -> list[float]:  # only a polling turn reads deals: a contact's webhook names contacts
            return [r.at for r in hubspot.requests if r.path == "/crm/v3/objects/deals/search"]

        async with _webhooks_and_turns(hubspot, poller, every):
            # No webhook taken yet: the usual interval, however quiet.
            await until(lambda: len(turns()) >= 6, "six polling turns")
            gaps = [b - a for a, b in itertools.pairwise(turns())]
            assert max(gaps[-4:]) < every * 2, gaps
            # A rep's edits: their signed webhooks read the contact and the deal at once; webhooks have now
            # announced every object the poller reads.
            hubspot.user_update("contacts", ada["id"], {"firstname": "Ada"})
            await until(lambda: collector.events("CRM Contact Updated"), "the webhook's read")
            assert not poller.notified  # deals not announced yet: seen by the polling turn alone
            hubspot.user_create("deals", {"dealname": "Renewal", "dealstage": "appointmentscheduled"})
            await until(lambda: poller.notified, "the deal's webhook")
            await until(lambda: not poller._reading.locked(), "its read")
            # Quiet from now on: the turns stretch, doubling, to QUIET_STRETCH intervals.
            woken = len(turns())
            await until(lambda: len(turns()) >= woken + 5, "five quiet polling turns", timeout=every * 40)
            gaps = [b - a for a, b in itertools.pairwise(turns()[woken:])]
            assert min(gaps[-2:]) >= every * QUIET_STRETCH * 0.9, gaps
            assert max(gaps) < every * QUIET_STRETCH * 1.5, gaps  # and no further: a lost webhook's edit waits so long
            # Another edit: the webhook brings the usual interval back (the next turn within one).
            hubspot.user_update("contacts", ada["id"], {"lastname": "King"})
            await until(lambda: len(collector.events("CRM Contact Updated")) == 2, "the second webhook's read")
            woken_at = time.time()
            quiet = len(turns())
            await until(lambda: len(turns()) > quiet + 1, "the next two polling turns")
            assert turns()[quiet] - woken_at < every * 2
            # ... and the stretch begins again from there: the turn after it two intervals on, not four.
            assert turns()[quiet + 1] - turns()[quiet] < every * QUIET_STRETCH * 0.8, turns()[quiet:]


def _paced_poller(store, session, collector, connection, objects: tuple[str, ...]) -> HubSpotPoller:
    """A poller of `objects` whose searches the pace lets through (100 a second): the test's own turns."""
    return HubSpotPoller(
        store, connection, session, TOKEN, SharedBudget(store, connection), collector.client(session),
        objects=objects, searches=SearchPace(per_second=100.0),
    )  # fmt: skip


def _hubspot_connection(url: str):
    document = {"connections": [{"id": "hs", "kind": "hubspot", "url": url,
                                 "credentials": {"token": "HUBSPOT_TOKEN"},
                                 "mappings": [{"id": "contacts", "object": "contacts",
                                               "match": {"cdp_id": "person.id"}, "fields": {"email": "traits.email"}}]}]}  # fmt: skip
    (connection,) = parse_connections(document)
    return connection


def _slots_taken(monkeypatch, reserved=None) -> list[tuple[bool, float, float]]:
    """(inbound, asked, slot) of every search slot the paces give from here on and nobody gives back: the
    slots searches were sent in (times on the pace's clock; a search that woke late gives its slot back and
    asks again). The spacing is asserted on the slots: what arrives at HubSpot is each search leaving at its
    slot plus its transit, which a loaded machine stretches by more than a gap (0.05 s between two
    arrivals, slots 0.25 s apart, in a run with six test workers). `reserved(inbound, asked, slot)`, if
    given, is told of each slot as it is reserved."""
    taken: list[tuple[bool, float, float]] = []
    reserve, give_back = SearchPace.reserve, SearchPace.give_back

    def recorded(self, *, inbound: bool) -> float:
        asked = self.clock()
        slot = reserve(self, inbound=inbound)
        taken.append((inbound, asked, slot))
        if reserved is not None:
            reserved(inbound, asked, slot)
        return slot

    def given_back(self, slot: float, *, inbound: bool) -> None:
        taken.remove(next(t for t in reversed(taken) if t[0] == inbound and t[2] == slot))
        give_back(self, slot, inbound=inbound)

    monkeypatch.setattr(SearchPace, "reserve", recorded)
    monkeypatch.setattr(SearchPace, "give_back", given_back)
    return taken


def _searches_at(hubspot: HubSpotEmulator) -> list[tuple[float, int | None]]:
    """(arrival, status) of every search HubSpot received, in arrival order, the arrival on the paces' clock
    (monotonic; HubSpot's is wall time plus what the test advanced it)."""
    wall_ahead = time.time() - time.monotonic()
    return [(r.at - hubspot.clock.offset - wall_ahead, r.status) for r in hubspot.requests if r.path.endswith(SEARCH)]


def _searches_sent(monkeypatch) -> list[float]:
    """When (monotonic: the paces' clock) each search from here on is handed to HTTP, by the adapter or the
    inbound reader: the moment it leaves, its slot checked just before (`SearchPace.leave`)."""
    sent: list[float] = []
    for module in (adapter_module, reader_module):

        async def recorded(session, method, url, *, _exchange=module.exchange, **kwargs):
            if url.endswith(SEARCH):
                sent.append(time.monotonic())
            return await _exchange(session, method, url, **kwargs)

        monkeypatch.setattr(module, "exchange", recorded)
    return sent


def _sent_in_their_slots_never_refused(
    searches: list[tuple[float, int | None]], slots: list[float], sent: list[float]
) -> None:
    """Every search left in a slot of its own, at it or at most 0.05 s after it (the pace's tolerance), and
    HubSpot refused none for its search limit (429 SECONDLY: the local HubSpot allows five a second) - not
    even where a stall of the test's event loop (HubSpot's too) held searches past their slots: those took
    new ones rather than bunch with the next on time (`SearchPace.leave`; before, they left together as the
    stall ended, a stall of half a second put six arrivals into one second and HubSpot refused the sixth).
    Slots, departures and arrivals are matched by rank (the k-th earliest each): with every search leaving
    between its slot and 0.05 s after it, the k-th departure does too from the k-th slot, and the k-th
    arrival comes no earlier than it. A search sent without its slot, before it, later than the tolerance,
    or in a slot it gave back, fails. How long a search then takes to reach HubSpot the pace does not
    govern: a loaded machine stretches it, and the local HubSpot's fifth search a second is the room."""
    arrivals = sorted(at for at, _ in searches)
    slots, sent = sorted(slots), sorted(sent)
    assert len(arrivals) == len(slots) == len(sent), (arrivals, slots, sent)  # each sent in a slot it kept
    left = [at - slot for at, slot in zip(sent, slots, strict=True)]
    assert min(left) >= -1e-6 and max(left) <= 0.05 + 0.005, left  # (+ the statements between check and send)
    late = [at - slot for at, slot in zip(arrivals, slots, strict=True)]
    assert min(late) >= -0.005, late  # (HubSpot's clock converted: within a few milliseconds)
    assert {status for _, status in searches} == {200}, (searches, late)


async def test_a_backlog_is_read_in_pages_of_200_at_two_searches_a_second_at_most(
    store, session, collector, monkeypatch
):
    """1,000 contacts changed in HubSpot, each at a stamp of its own: six searches of HubSpot's most (200 a
    page; each from the cursor's stamp, its first record read again), each at least 0.525 s after the one
    before at HubSpot - half of the four a second its search limit allows a token, spaced for searches
    leaving up to 0.05 s late ((1 + 0.05) / 4 x 2; the figures, not the module's constants: a share, a
    tolerance or a page size changed there fails here)."""
    async with HubSpotEmulator() as hubspot:
        for i in range(1000):
            hubspot.user_create("contacts", {"email": f"p{i}@example.com", "firstname": f"P{i}"})
            hubspot.clock.advance(1)  # a stamp each: a search from the cursor reads one record again
        connection = _hubspot_connection(hubspot.base_url)
        poller = HubSpotPoller(
            store, connection, session, TOKEN, SharedBudget(store, connection), collector.client(session),
            objects=("contacts",),
        )  # fmt: skip
        taken, sent = _slots_taken(monkeypatch), _searches_sent(monkeypatch)
        await poller.poll()
        assert len(collector.events("CRM Contact Created")) == 1000
        searches = _searches_at(hubspot)
        assert len([at for at, status in searches if status == 200]) == 6, searches
        slots = [slot for _, _, slot in taken]
        assert all(inbound for inbound, _, _ in taken), taken
        # Each leaves at its slot or a little after (the event loop's delay, the transit): 0.525 s apart.
        assert min(b - a for a, b in itertools.pairwise(slots)) >= 0.525 - 1e-6, slots
        _sent_in_their_slots_never_refused(searches, slots, sent)


async def test_an_erasures_lookups_and_the_inbound_reader_together_keep_to_the_tokens_four_searches_a_second(
    store, session, collector, monkeypatch
):
    """The adapter's privacy lookups (`find`) and the inbound reader paging through a backlog, on one
    connection as the process wires them (`open_poller` hands the adapter's pace to the reader): together
    never more than four searches a second at HubSpot, each at least 0.2625 s from any other (their slots:
    (1 + 0.05) / 4, room for a search leaving 0.05 s late), and no 429 SECONDLY at all, though the event
    loop (HubSpot's too) is held 0.55 s just as the first lookup's slot comes: the searches it holds past
    their slots take new ones (before, they left together with the next on time, six reached HubSpot
    within a second and it refused the sixth) - and the lookups are not queued behind the reader's pages
    (each slot within four spacings of being asked, while the read goes on)."""
    async with HubSpotEmulator() as hubspot:
        for i in range(1000):
            hubspot.user_create("contacts", {"email": f"p{i}@example.com", "firstname": f"P{i}"})
            hubspot.clock.advance(1)  # a stamp each: a search from the cursor reads one record again
        connection = _hubspot_connection(hubspot.base_url)
        (mapping,) = connection.mappings
        adapter = HubSpotAdapter(session, token=TOKEN, base_url=hubspot.base_url)
        budget = SharedBudget(store, connection)
        poller = open_poller(store, connection, adapter, budget, collector.client(session), session, {"token": TOKEN})
        poller.objects = ("contacts",)
        stalls: list[float] = []

        def stall_before(inbound: bool, asked: float, slot: float) -> None:
            # The event loop held from just before the first lookup's slot that is due a little later (no
            # search under way then), as a loaded machine holds it. Searches on time are sent as it ends.
            if not inbound and not stalls and slot - asked >= 0.05:
                stalls.append(slot - 0.02)
                asyncio.get_running_loop().call_at(slot - 0.02, time.sleep, 0.55)  # loop time: monotonic

        taken, sent = _slots_taken(monkeypatch, stall_before), _searches_sent(monkeypatch)
        read = asyncio.create_task(poller.poll())
        await until(lambda: _searches_at(hubspot), "the reader's first search")

        async def lookup(i: int) -> None:
            found, _ = await adapter.find(mapping, "email", [f"p{i}@example.com"], ["email"])
            assert found is not None and len(found) == 1

        await asyncio.gather(*(lookup(i) for i in range(4)))
        assert not read.done()  # the lookups went between the reader's pages
        await read
        assert stalls, taken  # the hold came
        assert len(collector.events("CRM Contact Created")) == 1000
        searches = _searches_at(hubspot)
        # The read's six pages and the four lookups, each answered once (a lookup refused would be None above).
        assert len([at for at, status in searches if status == 200]) == 6 + 4, searches
        slots = sorted(slot for _, _, slot in taken)
        # Any two 0.2625 s apart, whoever asked: never more than four in a second at HubSpot's end.
        assert min(b - a for a, b in itertools.pairwise(slots)) >= 0.2625 - 1e-6, slots
        assert max(bisect.bisect_left(slots, at + 1.0 - 1e-6) - i for i, at in enumerate(slots)) <= 4, slots
        _sent_in_their_slots_never_refused(searches, slots, sent)
        # Four lookups at once take the free slots between the reader's: the last within four spacings
        # (1.05 s) of asking for the slot it kept - a lookup the hold made late asked again after it.
        lookups = [(asked, slot) for inbound, asked, slot in taken if not inbound]
        assert len(lookups) == 4 and max(slot - asked for asked, slot in lookups) <= 4 * 0.2625 + 1e-6, lookups


@asynccontextmanager
async def _webhooks_and_turns(hubspot: HubSpotEmulator, poller: HubSpotPoller, every: float):
    """HubSpot's signed webhooks pointed at the poller (`HubSpotWebhooks`, as the process serves it), and the
    poller run as the process runs it, every `every` seconds; both stopped on the way out."""
    runner = web.AppRunner(HubSpotWebhooks({"hs": (poller, hubspot.client_secret)}).app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hubspot.webhook_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hs"
        reader = asyncio.create_task(poller.run(every))
        try:
            yield
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        await runner.cleanup()


def _searched(hubspot: HubSpotEmulator, obj: str) -> list[tuple[float, int | None]]:
    """(arrival, status) of each search of `obj` HubSpot received."""
    return [(r.at, r.status) for r in hubspot.requests if r.path == f"/crm/v3/objects/{obj}/search"]


async def test_an_edit_no_webhook_announces_is_still_read_within_a_polling_interval(store, session, collector):
    """Signed webhooks reach the poller (a rep's contact edit came through one), but HubSpot announces only
    what the app subscribes to: its legacy subscriptions have no task type at all (contacts, companies,
    deals, tickets, products, line items), and a propertyChange subscription names one property. A rep
    completing a task is then seen by the polling turn alone: it must come within the polling interval, as
    before the quiet turns stretched - not four intervals later (at the default 30 s, two minutes)."""
    every = 0.25
    async with HubSpotEmulator(client_secret="app-secret", search_per_second=1000) as hubspot:  # pace below
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "cdp_id": "person-1"})
        task = hubspot.user_create(
            "tasks",
            {"hs_task_subject": "Call Ada", "hs_task_status": "NOT_STARTED"},
            links=[("contacts", ada["id"], [])],
        )
        poller = _paced_poller(store, session, collector, _hubspot_connection(hubspot.base_url), ("contacts", "tasks"))
        await poller.poll()
        assert collector.names() == ["CRM Task Created"]  # a rep's task (Ada the connector's contact)
        async with _webhooks_and_turns(hubspot, poller, every):
            hubspot.user_update("contacts", ada["id"], {"firstname": "Ada"})  # its webhook reaches the poller
            await until(lambda: collector.events("CRM Contact Updated"), "the webhook's read")
            woken = len(_searched(hubspot, "tasks"))  # only a polling turn reads tasks: the webhook named contacts
            await until(lambda: len(_searched(hubspot, "tasks")) >= woken + 3, "three quiet turns", timeout=every * 40)
            await until(lambda: not poller._reading.locked(), "the polling turn's end")
            # The rep completes the task: nothing announces it.
            url, hubspot.webhook_url = hubspot.webhook_url, None
            hubspot.user_update("tasks", task["id"], {"hs_task_status": "COMPLETED"})
            hubspot.webhook_url = url
            edited = time.monotonic()
            await until(lambda: collector.events("CRM Task Completed"), "the task's outcome", timeout=every * 40)
            assert time.monotonic() - edited < every * 2


async def test_a_polling_turn_that_failed_is_not_quiet_the_next_comes_at_the_usual_interval(store, session, collector):
    """Webhooks announced every object the poller reads and quiet turns stretched to QUIET_STRETCH intervals;
    then HubSpot fails a turn's search (a 503). A failed turn read nothing - not a quiet one: the next comes
    one interval on, so what changed during the outage is read as soon as HubSpot answers again."""
    every = 0.25
    async with HubSpotEmulator(client_secret="app-secret", search_per_second=1000) as hubspot:  # pace below
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "cdp_id": "person-1"})
        poller = _paced_poller(store, session, collector, _hubspot_connection(hubspot.base_url), ("contacts", "deals"))
        await poller.poll()
        async with _webhooks_and_turns(hubspot, poller, every):
            hubspot.user_update("contacts", ada["id"], {"firstname": "Ada"})
            hubspot.user_create("deals", {"dealname": "Renewal", "dealstage": "appointmentscheduled"})
            await until(lambda: poller.notified and collector.events("CRM Contact Updated"), "the webhooks' reads")
            await until(lambda: len(_searched(hubspot, "deals")) >= 2, "the deal's read")
            woken = len(_searched(hubspot, "deals"))
            await until(lambda: len(_searched(hubspot, "deals")) >= woken + 3, "three quiet turns", timeout=every * 40)
            await until(lambda: not poller._reading.locked(), "the polling turn's end")
            failed = len(_searched(hubspot, "contacts"))
            hubspot.faults.fail_next(1)  # the next turn's first request: its contacts search
            await until(lambda: len(_searched(hubspot, "contacts")) >= failed + 2, "the turn after the failed one")
            (at, status), (after, _) = _searched(hubspot, "contacts")[failed : failed + 2]
            assert status == 503
            assert after - at < every * 2
