"""IdentityGraph scenarios: what a user of the identity service relies on, one story per test.

Events are written as identifier keys ("user_id:u1"), normalised like the service does, in time order.
"""

from __future__ import annotations

import copy
import json

import pytest

from cdp_identity.domain.graph import Drop, IdentityGraph, Merge, MergeRefused, Resolution
from cdp_identity.domain.normalize import Normalizer
from cdp_identity.domain.rules import MergeRules

MINUTE = 60_000
DAY = 86_400_000


class World:
    """A graph fed like the service feeds it: raw values normalised, one event id per event, time moving on."""

    def __init__(self, rules: dict | None = None) -> None:
        self.rules = MergeRules.from_dict(rules or {})
        self.normalizer = Normalizer(self.rules)
        self.graph = IdentityGraph(self.rules)
        self.now = 0
        self.sent = 0

    def identifiers(self, keys: tuple[str, ...]):
        pairs = [tuple(key.split(":", 1)) for key in keys]
        identifiers, _rejected = self.normalizer.normalize(pairs)
        return identifiers

    def event(self, *keys: str, at: int | None = None, event_id: str | None = None) -> Resolution | None:
        self.sent += 1
        self.now = self.now + MINUTE if at is None else at
        return self.graph.resolve(self.identifiers(keys), event_id=event_id or f"e{self.sent}", at=self.now)

    def person(self, *keys: str, at: int | None = None) -> str:
        resolution = self.event(*keys, at=at)
        assert resolution is not None
        return resolution.person

    def keys_of(self, person: str) -> set[str]:
        return set(self.graph.identifiers_of(self.graph.root_of(person)))

    def together(self, *keys: str) -> bool:
        return len({self.graph.person_of(k) for k in keys}) == 1


def assert_partition(graph: IdentityGraph) -> None:
    """Every identifier belongs to exactly one root, and each root lists exactly the identifiers resolving to it."""
    resolving: dict[str, set[str]] = {}
    for key in graph.identifiers:
        resolving.setdefault(graph.person_of(key), set()).add(key)
    roots = {p.id for p in graph.persons.values() if p.merged_into is None}
    assert set(resolving) <= roots
    for root in roots:
        assert set(graph.persons[root].ids) == resolving.get(root, set())
    for person in graph.persons.values():
        if person.merged_into is not None:
            assert person.ids == {}


def user_ids_per_person(graph: IdentityGraph) -> list[int]:
    return [sum(k.startswith("user_id:") for k in keys) for keys in graph.partition().values()]


# --- everyday linking ------------------------------------------------------------------------------


def test_an_anonymous_visitor_who_signs_up_stays_one_person():
    w = World()
    first = w.event("anonymous_id:a1")
    assert first.created and first.attached == ["anonymous_id:a1"]
    again = w.event("anonymous_id:a1")
    assert (again.person, again.created, again.attached) == (first.person, False, [])

    identify = w.event("user_id:u1", "anonymous_id:a1", "email:Ada@Example.com")

    assert identify.person == first.person
    assert identify.attached == ["user_id:u1", "email:ada@example.com"]
    assert identify.merges == [] and identify.drops == []
    assert w.keys_of(first.person) == {"anonymous_id:a1", "user_id:u1", "email:ada@example.com"}
    assert_partition(w.graph)


def test_signing_in_on_a_second_device_merges_the_anonymous_person_into_the_known_one():
    w = World()
    laptop = w.person("anonymous_id:laptop-a", "device_id:laptop")  # the older person
    phone = w.person("anonymous_id:phone-a", "device_id:phone")
    assert w.event("user_id:u1", "anonymous_id:phone-a").person == phone

    sign_in = w.event("anonymous_id:laptop-a", "user_id:u1")

    # The person holding the user id wins, though the laptop's person is older.
    assert sign_in.person == phone
    assert sign_in.merges == [
        Merge(
            id=sign_in.merges[0].id,
            winner=phone,
            loser=laptop,
            at=w.now,
            cause={"event_id": "e4", "identifiers": ["user_id:u1", "anonymous_id:laptop-a"], "rule": "event"},
        )
    ]
    assert w.together("user_id:u1", "anonymous_id:laptop-a", "device_id:laptop", "anonymous_id:phone-a")
    assert w.graph.canonical(laptop) == phone
    assert w.graph.describe(laptop)["person"] == phone
    assert_partition(w.graph)


def test_alias_links_a_previous_anonymous_id_and_links_chain_transitively():
    w = World()
    first_visit = w.person("anonymous_id:a1")
    second_browser = w.person("anonymous_id:a2")
    third_browser = w.person("anonymous_id:a3")

    # alias(previous_id=a1, user_id=u1): the new user id joins the visitor's person.
    assert w.event("user_id:u1", "anonymous_id:a1").person == first_visit
    # alias(previous_id=a3, user_id=a2)-like links between anonymous ids, then one of them signs in.
    assert w.event("anonymous_id:a2", "anonymous_id:a3").person == second_browser
    assert w.event("user_id:u1", "anonymous_id:a3").person == first_visit

    assert w.keys_of(first_visit) == {"user_id:u1", "anonymous_id:a1", "anonymous_id:a2", "anonymous_id:a3"}
    assert w.graph.canonical(third_browser) == first_visit
    assert_partition(w.graph)


def test_an_alias_between_two_user_ids_does_not_put_them_on_one_person():
    w = World()
    old = w.person("user_id:u-old", "email:ada@example.com")

    alias = w.event("user_id:u-new", "user_id:u-old")

    assert alias.person != old and alias.created
    assert alias.attached == ["user_id:u-new"]
    assert alias.drops == [Drop("user_id:u-old", "limit:user_id")]
    assert w.keys_of(old) == {"user_id:u-old", "email:ada@example.com"}
    assert user_ids_per_person(w.graph) == [1, 1]


def test_an_event_without_a_usable_identifier_resolves_to_nobody():
    w = World()
    assert w.event() is None
    assert w.event("anonymous_id:undefined", "email:not-an-email", "user_id: ") is None
    assert w.graph.identifiers == {} and w.graph.persons == {}


def test_read_only_says_who_without_changing_anything():
    w = World()
    person = w.person("user_id:u1", "anonymous_id:a1")
    other = w.person("anonymous_id:a2")
    w.graph.take_dirty()

    answer = w.graph.resolve(
        w.identifiers(("user_id:u1", "anonymous_id:a2", "email:new@example.com")),
        event_id="x",
        at=w.now,
        read_only=True,
    )

    assert answer == Resolution(person=person)
    assert w.graph.resolve(w.identifiers(("email:new@example.com",)), event_id="x", at=w.now, read_only=True) is None
    assert w.graph.take_dirty() == ({}, {}, {})
    assert w.graph.person_of("anonymous_id:a2") == other


def test_the_winner_is_the_strongest_identifier_then_the_oldest_then_the_smallest_id():
    strongest = World()
    old_anonymous = strongest.person("anonymous_id:a1")
    young_email = strongest.person("email:ada@example.com")
    assert strongest.event("anonymous_id:a1", "email:ada@example.com").person == young_email
    assert strongest.graph.canonical(old_anonymous) == young_email

    oldest = World()
    older = oldest.person("anonymous_id:b")
    younger = oldest.person("anonymous_id:a")
    # "anonymous_id:a" comes first in the event; the older person still wins.
    assert oldest.event("anonymous_id:a", "anonymous_id:b").person == older
    assert oldest.graph.canonical(younger) == older

    tie = World()
    one = tie.person("anonymous_id:x", at=1_000)
    two = tie.person("anonymous_id:y", at=1_000)
    assert tie.event("anonymous_id:y", "anonymous_id:x", at=2_000).person == min(one, two)


# --- limits and priority ---------------------------------------------------------------------------


def test_a_family_tablet_never_puts_two_user_ids_on_one_person():
    w = World()
    mum = w.person("user_id:mum", "device_id:tablet")

    dad = w.event("user_id:dad", "device_id:tablet")

    assert dad.person != mum and dad.created
    assert dad.attached == ["user_id:dad"]
    assert dad.drops == [Drop("device_id:tablet", "limit:user_id")]
    assert w.graph.describe(dad.person)["drops"] == [
        {"identifier": "device_id:tablet", "reason": "limit:user_id", "event_id": "e2", "at": w.now}
    ]
    # Dad browsing anonymously on the tablet does not land on mum: the tablet, seen with both, cannot tell
    # whose session it is; when he signs in, the session joins him, and mum's identifiers stay hers.
    browsing = w.event("anonymous_id:tablet-session", "device_id:tablet")
    assert browsing.person not in (mum, dad.person)
    assert browsing.drops == [Drop("device_id:tablet", "shared")]
    sign_in = w.event("user_id:dad", "anonymous_id:tablet-session")
    assert sign_in.person == dad.person
    assert sign_in.drops == [] and [m.loser for m in sign_in.merges] == [browsing.person]
    assert w.keys_of(mum) == {"user_id:mum", "device_id:tablet"}
    assert w.keys_of(dad.person) == {"user_id:dad", "anonymous_id:tablet-session"}
    assert user_ids_per_person(w.graph) == [1, 1]
    assert_partition(w.graph)


def test_a_device_two_users_signed_in_on_in_turn_links_neither_of_them_to_the_next_anonymous_visitor():
    """Mum then dad sign in on the family tablet: two persons, and the tablet (mum's) has been seen with dad.
    Whoever browses on it anonymously next could be either: the session was glued to mum through the
    tablet, so dad's browsing went on her profile and his sign-in on that browser could not take it back."""
    w = World()
    mum = w.person("user_id:mum", "anonymous_id:mum-browser", "device_id:tablet")
    dad = w.event("user_id:dad", "anonymous_id:dad-browser", "device_id:tablet")
    assert dad.person != mum and dad.drops == [Drop("device_id:tablet", "limit:user_id")]

    browsing = w.event("anonymous_id:tablet-session", "device_id:tablet")

    assert browsing.created and browsing.person not in (mum, dad.person)
    assert browsing.merges == [] and browsing.drops == [Drop("device_id:tablet", "shared")]
    assert w.keys_of(mum) == {"user_id:mum", "anonymous_id:mum-browser", "device_id:tablet"}
    # A replay of the event (after a crash, read-only) finds the same person.
    replay = w.graph.resolve(
        w.identifiers(("anonymous_id:tablet-session", "device_id:tablet")), event_id="e3", at=w.now, read_only=True
    )
    assert replay.person == browsing.person
    # Dad signing in on that browser takes his session; mum keeps exactly what she brought.
    sign_in = w.event("user_id:dad", "anonymous_id:tablet-session", "device_id:tablet")
    assert sign_in.person == dad.person
    assert w.keys_of(dad.person) == {"user_id:dad", "anonymous_id:dad-browser", "anonymous_id:tablet-session"}
    assert w.keys_of(mum) == {"user_id:mum", "anonymous_id:mum-browser", "device_id:tablet"}
    # Mum's own events on the tablet are still hers.
    assert w.event("anonymous_id:mum-browser", "device_id:tablet").person == mum
    assert w.event("user_id:mum", "device_id:tablet").person == mum
    assert user_ids_per_person(w.graph) == [1, 1]
    assert_partition(w.graph)


def test_a_browser_two_users_signed_in_on_in_turn_links_neither_of_them_to_a_device_seen_with_it_next():
    """The same with the browser's anonymous id shared: an anonymous event bringing it and a new device does
    not give mum the device (dad may hold it)."""
    w = World()
    mum = w.person("user_id:mum", "anonymous_id:family-browser")
    dad = w.event("user_id:dad", "anonymous_id:family-browser")
    assert dad.person != mum

    visit = w.event("anonymous_id:family-browser", "device_id:new-phone")

    assert visit.person not in (mum, dad.person)
    assert visit.drops == [Drop("anonymous_id:family-browser", "shared")]
    assert w.keys_of(mum) == {"user_id:mum", "anonymous_id:family-browser"}
    assert w.keys_of(dad.person) == {"user_id:dad"}
    assert_partition(w.graph)


def test_the_lowest_priority_identifier_is_dropped_whatever_its_place_in_the_event():
    w = World()
    ada = w.person("user_id:ada", "email:shared@example.com")
    bob = w.person("user_id:bob", "device_id:bobs-phone")

    event = w.event("device_id:bobs-phone", "email:shared@example.com")

    assert event.person == ada
    assert event.drops == [Drop("device_id:bobs-phone", "limit:user_id")]
    assert w.keys_of(bob) == {"user_id:bob", "device_id:bobs-phone"}


def test_a_new_strong_identifier_wins_over_a_weaker_known_one():
    w = World()
    ada = w.person("user_id:ada", "anonymous_id:shared-kiosk")

    bob = w.event("anonymous_id:shared-kiosk", "user_id:bob")

    assert bob.created and bob.attached == ["user_id:bob"]
    assert bob.drops == [Drop("anonymous_id:shared-kiosk", "limit:user_id")]
    assert w.graph.person_of("anonymous_id:shared-kiosk") == ada


def test_a_new_identifier_over_its_limit_is_dropped():
    w = World()
    emails = [f"email:e{i}@example.com" for i in range(1, 7)]

    first = w.event("user_id:u1", *emails)

    assert first.attached == ["user_id:u1", *emails[:5]]
    assert first.drops == [Drop(emails[5], "limit:email")]
    later = w.event("user_id:u1", "email:e7@example.com", at=w.now + 30 * DAY)  # no window: forever
    assert later.person == first.person
    assert later.drops == [Drop("email:e7@example.com", "limit:email")]
    assert "email:e7@example.com" not in w.graph.identifiers


EMAILS_WITHIN_7_DAYS = {
    "types": [
        {"name": "user_id"},
        {"name": "email", "limit": 5, "window": "7d"},
        {"name": "anonymous_id"},
    ]
}


def test_a_limit_window_counts_only_identifiers_added_within_it():
    w = World(EMAILS_WITHIN_7_DAYS)
    person = w.person("user_id:u1", *(f"email:e{i}@example.com" for i in range(1, 6)), at=0)

    six_days_later = w.event("user_id:u1", "email:e6@example.com", at=6 * DAY)
    assert six_days_later.drops == [Drop("email:e6@example.com", "limit:email")]

    eight_days_later = w.event("user_id:u1", "email:e7@example.com", at=8 * DAY)
    assert eight_days_later.drops == [] and eight_days_later.attached == ["email:e7@example.com"]
    assert w.event("user_id:u1", "email:e8@example.com", at=8 * DAY + MINUTE).attached == ["email:e8@example.com"]
    assert len([k for k in w.keys_of(person) if k.startswith("email:")]) == 7


@pytest.mark.parametrize(("link_after", "linked"), [(8 * DAY, True), (1 * DAY, False)])
def test_a_limit_window_decides_whether_two_persons_may_link(link_after, linked):
    w = World(EMAILS_WITHIN_7_DAYS)
    w.person("anonymous_id:a", "email:a1@example.com", "email:a2@example.com", "email:a3@example.com", at=0)
    w.person("anonymous_id:b", "email:b1@example.com", "email:b2@example.com", "email:b3@example.com", at=link_after)

    event = w.event("anonymous_id:a", "anonymous_id:b", at=link_after + MINUTE)

    assert w.together("anonymous_id:a", "anonymous_id:b") is linked
    assert event.drops == ([] if linked else [Drop("anonymous_id:b", "limit:email")])


# --- blocked values ---------------------------------------------------------------------------------


def test_placeholder_and_invalid_values_never_link_strangers():
    w = World()
    shared_junk = ("anonymous_id:undefined", "device_id:00000000-0000-0000-0000-000000000000", "email:N/A")
    ada = w.person("user_id:ada", *shared_junk, "phone:not a phone")
    bob = w.person("anonymous_id:bob-session", *shared_junk, "phone:not a phone")
    assert ada != bob
    assert set(w.graph.identifiers) == {"user_id:ada", "anonymous_id:bob-session"}


# --- quarantine -------------------------------------------------------------------------------------


def test_a_device_shared_by_three_users_is_quarantined_and_stops_linking():
    w = World()  # device_id: quarantine after 3 persons
    visitor = w.person("anonymous_id:visitor")
    first = w.person("user_id:u1", "device_id:kiosk")
    second = w.event("user_id:u2", "device_id:kiosk")
    assert second.quarantined == []

    third = w.event("user_id:u3", "device_id:kiosk")

    assert third.quarantined == ["device_id:kiosk"]
    assert w.graph.quarantined() == ["device_id:kiosk"]
    assert w.graph.person_of("device_id:kiosk") == first  # quarantine does not move it
    described = {i["value"]: i["quarantined"] for i in w.graph.describe(first)["identifiers"]}
    assert described == {"u1": False, "kiosk": True}
    # A visitor seen on the kiosk is no longer glued to its first user.
    seen_on_kiosk = w.event("anonymous_id:visitor", "device_id:kiosk")
    assert seen_on_kiosk.person == visitor
    assert seen_on_kiosk.merges == [] and seen_on_kiosk.drops == [Drop("device_id:kiosk", "quarantined")]
    fresh = w.event("anonymous_id:new-visitor", "device_id:kiosk")
    assert fresh.created and fresh.person != first
    assert_partition(w.graph)


def test_an_event_whose_only_identifier_is_quarantined_resolves_to_its_person():
    w = World()
    owner = w.person("user_id:u1", "device_id:kiosk")
    w.graph.quarantine("device_id:kiosk", at=w.now)

    event = w.event("device_id:kiosk", "email:not-an-email")

    assert event == Resolution(person=owner, drops=[Drop("device_id:kiosk", "quarantined")])
    assert w.graph.describe(owner)["drops"][-1]["reason"] == "quarantined"


def test_quarantine_evidence_older_than_the_quarantine_window_is_forgotten():
    w = World({"quarantine_window": "1d"})
    w.event("user_id:u1", "device_id:kiosk", at=0)
    w.event("user_id:u2", "device_id:kiosk", at=2 * DAY)
    assert w.event("user_id:u3", "device_id:kiosk", at=4 * DAY).quarantined == []  # u2 is too long ago
    assert w.event("user_id:u4", "device_id:kiosk", at=4 * DAY + MINUTE).quarantined == ["device_id:kiosk"]


# --- sharing across persons (Resolution.shared) ---------------------------------------------------


def test_an_event_of_one_persons_known_identifiers_changes_nothing_and_still_counts_who_shares_them():
    w = World()
    owner = w.person("user_id:u1", "device_id:tablet", "email:mum@example.com")
    w.person("user_id:u2", "device_id:tablet")  # a second account on the family tablet
    merged = w.person("anonymous_id:a1")
    w.graph.merge(owner, merged, at=w.now, cause={"rule": "api"})  # an identifier owned by a merged-away id
    w.graph.take_dirty()

    seen = w.event("user_id:u1", "device_id:tablet", "anonymous_id:a1")

    assert seen == Resolution(person=owner, shared={"device_id": 1})
    assert w.graph.take_dirty() == ({}, {}, {}), "nothing to write"


def test_a_phone_behind_four_accounts_tells_each_later_event_how_many_other_accounts_used_it():
    w = World()  # the defaults: one user id per person, device_id quarantined after 3 persons
    events = [w.event(f"user_id:ring-{k}", "device_id:ring-phone") for k in range(4)]

    assert len({e.person for e in events}) == 4, "the default rules keep four accounts apart"
    assert [e.shared for e in events] == [{}, {"device_id": 1}, {"device_id": 2}, {"device_id": 3}]
    assert events[2].quarantined == ["device_id:ring-phone"]
    # Later events of any of them count the others too, the quarantine notwithstanding.
    assert w.event("user_id:ring-1", "device_id:ring-phone").shared == {"device_id": 3}
    assert w.event("user_id:ring-0", "device_id:ring-phone").shared == {"device_id": 3}
    # An event that carries only the account (no device) says nothing about the device.
    assert w.event("user_id:ring-2").shared == {}


def test_persons_merged_since_count_once_and_so_does_the_events_own_person():
    w = World()
    w.event("user_id:u1", "device_id:tablet")
    visitor = w.person("anonymous_id:a2", "device_id:tablet")  # a visitor on the tablet: joins u1
    assert visitor == w.graph.person_of("user_id:u1")
    w.event("user_id:u2", "device_id:tablet")
    w.event("user_id:u3", "device_id:tablet")
    # An operator finds u2 and u3 are one customer (two logins) and merges them.
    w.graph.merge(w.graph.person_of("user_id:u2"), w.graph.person_of("user_id:u3"), at=w.now, cause={}, force=True)

    seen = w.event("user_id:u5", "device_id:tablet")
    assert seen.shared == {"device_id": 2}, "u1 and the u2+u3 person: two other persons, not three"
    assert w.event("user_id:u3", "device_id:tablet").shared == {"device_id": 2}  # u1 and u5; not itself


def test_persons_seen_with_the_device_more_than_a_day_before_do_not_count():
    w = World()
    w.event("user_id:u1", "device_id:d", at=0)
    w.event("user_id:u2", "device_id:d", at=MINUTE)
    assert w.event("user_id:u3", "device_id:d", at=DAY + 2 * MINUTE).shared == {"device_id": 1}  # the owner only
    assert w.event("user_id:u1", "device_id:d", at=DAY + 3 * MINUTE).shared == {"device_id": 1}  # u3, not u2
    assert w.event("user_id:u1", "device_id:d", at=3 * DAY).shared == {}  # nobody else in the last day


def test_a_replayed_event_reads_the_same_count_and_changes_nothing():
    w = World()
    for k in range(3):
        w.event(f"user_id:u{k}", "device_id:d")
    identifiers = w.identifiers(("user_id:u2", "device_id:d"))
    before = copy.deepcopy(w.graph.identifiers["device_id:d"].conflicts)
    replay = w.graph.resolve(identifiers, event_id="e3", at=w.now, read_only=True)
    assert replay.shared == {"device_id": 2}
    assert w.graph.identifiers["device_id:d"].conflicts == before


def test_sharing_evidence_is_written_at_most_once_a_minute_per_person():
    w = World()
    w.event("user_id:u1", "device_id:d", at=0)
    w.event("user_id:u2", "device_id:d", at=1_000)
    w.graph.take_dirty()
    w.event("user_id:u2", "device_id:d", at=2_000)
    identifiers, _persons, _merges = w.graph.take_dirty()
    assert "device_id:d" not in identifiers, "seen with u2 a second ago: nothing new to write"
    w.event("user_id:u2", "device_id:d", at=1_000 + MINUTE)
    identifiers, _persons, _merges = w.graph.take_dirty()
    assert "device_id:d" in identifiers


def test_the_persons_already_on_a_phone_are_told_each_time_another_account_joins_them():
    """The ring's first account used the phone alone; it is told of the second, third and fourth account
    (with its count then), as is every account before the one that just joined - never the joining one."""
    w = World()
    events = [w.event(f"user_id:ring-{k}", "device_id:ring-phone") for k in range(4)]
    accounts = [e.person for e in events]
    assert [e.told for e in events] == [
        {},
        {accounts[0]: {"device_id": 1}},
        {accounts[0]: {"device_id": 2}, accounts[1]: {"device_id": 2}},
        {accounts[0]: {"device_id": 3}, accounts[1]: {"device_id": 3}, accounts[2]: {"device_id": 3}},
    ]
    # The same persons again: nobody new, nobody told (once per person that joins, not per event).
    assert w.event("user_id:ring-3", "device_id:ring-phone").told == {}
    assert w.event("user_id:ring-0", "device_id:ring-phone", at=w.now + 2 * MINUTE).told == {}
    # A day on, the first account is back and the others are gone from the count: no one is told, as
    # the only ones who shared the phone in the last day are the account itself and...
    back = w.event("user_id:ring-0", "device_id:ring-phone", at=w.now + DAY + MINUTE)
    assert back.shared == {} and back.told == {}
    # ... a fifth account the next day tells the one seen with the phone in the last day: its owner.
    fifth = w.event("user_id:ring-4", "device_id:ring-phone", at=w.now + MINUTE)
    assert fifth.told == {accounts[0]: {"device_id": 1}}


def test_persons_merged_since_are_told_once_as_one_person():
    w = World()
    first = w.person("user_id:u1", "device_id:tablet")
    w.event("user_id:u2", "device_id:tablet")
    w.event("user_id:u3", "device_id:tablet")
    w.graph.merge(w.graph.person_of("user_id:u2"), w.graph.person_of("user_id:u3"), at=w.now, cause={}, force=True)
    merged = w.graph.person_of("user_id:u2")

    told = w.event("user_id:u5", "device_id:tablet").told
    assert told == {first: {"device_id": 2}, merged: {"device_id": 2}}, "u2 and u3 are one person, told once"


def test_an_event_with_several_shared_identifiers_tells_each_earlier_person_once_with_every_type():
    w = World()
    first = w.person("user_id:u1", "device_id:d1", "anonymous_id:a1")
    joined = w.event("user_id:u2", "device_id:d1", "anonymous_id:a1")
    assert joined.person != first
    assert joined.told == {first: {"device_id": 1, "anonymous_id": 1}}
    # Only the identifiers whose persons grew count: a third account on the device alone.
    third = w.event("user_id:u3", "device_id:d1")
    assert third.told == {first: {"device_id": 2}, joined.person: {"device_id": 2}}


def test_a_device_seen_with_more_persons_than_the_bound_tells_nobody():
    """A shop's tablet: once those already on it would share it with more than SHARED_NOTIFY_MAX others,
    a new visitor tells no one (no fan-out of hundreds of events per visitor)."""
    from cdp_identity.domain.graph import SHARED_NOTIFY_MAX

    w = World({"types": [{"name": "user_id", "limit": 1}, {"name": "device_id", "quarantine_after": 1000}]})
    sizes = [len(w.event(f"user_id:v{k}", "device_id:shop-tablet").told) for k in range(SHARED_NOTIFY_MAX + 5)]
    assert sizes == [*range(SHARED_NOTIFY_MAX + 1), *[0] * 4]
    assert sum(sizes) == SHARED_NOTIFY_MAX * (SHARED_NOTIFY_MAX + 1) // 2


def test_the_bound_on_telling_is_the_operators_to_set():
    """CDP_IDENTITY_SHARED_NOTIFY_MAX: with 2, the third account on a phone still tells the two before it;
    the fourth tells nobody; with 0 nobody is ever told."""
    rules = {"types": [{"name": "user_id", "limit": 1}, {"name": "device_id", "quarantine_after": 1000}]}
    w = World(rules)
    w.graph = IdentityGraph(w.rules, shared_notify_max=2)
    assert [len(w.event(f"user_id:v{k}", "device_id:phone").told) for k in range(5)] == [0, 1, 2, 0, 0]
    w = World(rules)
    w.graph = IdentityGraph(w.rules, shared_notify_max=0)
    assert [len(w.event(f"user_id:v{k}", "device_id:phone").told) for k in range(4)] == [0, 0, 0, 0]
    # the count on the events themselves is not bounded: only whom identity tells
    assert w.event("user_id:v9", "device_id:phone").shared == {"device_id": 4}


def test_a_replayed_event_tells_nobody_again():
    w = World()
    for k in range(3):
        w.event(f"user_id:u{k}", "device_id:d")
    replay = w.graph.resolve(w.identifiers(("user_id:u2", "device_id:d")), event_id="e3", at=w.now, read_only=True)
    assert replay.told == {}


def test_quarantine_and_release_by_hand():
    w = World()
    owner = w.person("user_id:u1", "device_id:kiosk")
    visitor = w.person("anonymous_id:visitor")
    assert w.graph.quarantine("device_id:kiosk", at=w.now) is True
    assert w.graph.quarantine("device_id:kiosk", at=w.now) is False
    assert w.event("anonymous_id:visitor", "device_id:kiosk").person == visitor

    assert w.graph.release("device_id:kiosk") is True
    assert w.graph.release("device_id:kiosk") is False
    assert w.graph.quarantined() == []
    assert w.event("anonymous_id:visitor", "device_id:kiosk").person == owner
    assert w.graph.canonical(visitor) == owner
    # Release also forgets the evidence: it takes three persons again to quarantine it.
    assert w.event("user_id:u2", "device_id:kiosk").quarantined == []


def test_types_without_quarantine_are_never_quarantined():
    w = World()
    for i in range(10):
        w.event(f"user_id:u{i}", "email:family@example.com")
    assert w.graph.quarantined() == []


def test_a_call_centre_phone_is_quarantined_even_when_it_is_the_strongest_identifier_of_the_events():
    # Callers are recognised by their device; the call centre's phone number (phone: quarantine after 5
    # persons) is the strongest identifier of these events and meets four other persons.
    w = World()
    agent = w.person("user_id:agent", "phone:+1 415 555 0100")
    callers = [w.person(f"user_id:caller-{caller}", f"device_id:caller-{caller}") for caller in range(1, 5)]
    first = w.event("phone:+1 415 555 0100", "device_id:caller-1")
    assert first.person == agent and first.drops == [Drop("device_id:caller-1", "limit:user_id")]
    # Seen with two users since, the phone no longer decides whose event it is: the caller's device does.
    for caller in range(2, 5):
        event = w.event("phone:+1 415 555 0100", f"device_id:caller-{caller}")
        assert event.person == callers[caller - 1]
        assert event.drops == [Drop("phone:+14155550100", "shared")]

    assert w.graph.quarantined() == ["phone:+14155550100"]


def test_an_identifier_meeting_two_other_persons_in_one_event_counts_both():
    # The kiosk (device_id: quarantine after 3) meets u1's and u3's persons in one event: with its own
    # person that makes three.
    w = World()
    w.person("user_id:u1")
    w.person("user_id:u2", "device_id:kiosk")
    w.person("user_id:u3", "anonymous_id:a3")

    event = w.event("user_id:u1", "device_id:kiosk", "anonymous_id:a3")

    assert event.drops == [Drop("device_id:kiosk", "limit:user_id"), Drop("anonymous_id:a3", "limit:user_id")]
    assert w.graph.quarantined() == ["device_id:kiosk"]


# --- explicit merges ---------------------------------------------------------------------------------


def test_an_explicit_merge_is_refused_over_a_limit_and_allowed_with_force():
    w = World()
    ada = w.person("user_id:ada", "email:ada@example.com")
    ada2 = w.person("user_id:ada-2", "email:ada@work.example.com")
    cause = {"rule": "manual", "actor": "ops@example.com"}

    with pytest.raises(MergeRefused) as refused:
        w.graph.merge(ada, ada2, at=w.now, cause=cause)
    assert refused.value.rule == "limit:user_id"
    assert not w.together("user_id:ada", "user_id:ada-2")

    merge = w.graph.merge(ada, ada2, at=w.now, cause=cause, force=True)

    assert (merge.winner, merge.loser, merge.cause) == (ada, ada2, cause)
    assert w.keys_of(ada) == {"user_id:ada", "user_id:ada-2", "email:ada@example.com", "email:ada@work.example.com"}
    assert w.graph.describe(ada)["merges"] == [merge.as_dict()]
    assert w.graph.merge(ada2, ada, at=w.now, cause=cause) is None  # already one person
    assert_partition(w.graph)


def test_an_explicit_merge_within_the_limits_needs_no_force():
    w = World()
    a = w.person("anonymous_id:a")
    b = w.person("email:b@example.com")
    merge = w.graph.merge(a, b, at=w.now, cause={"rule": "matching"})
    assert (merge.winner, merge.loser) == (a, b)  # the caller chooses the winner
    assert w.together("anonymous_id:a", "email:b@example.com")


# --- unmerge -----------------------------------------------------------------------------------------


def test_unmerge_gives_both_persons_back_exactly_their_identifiers():
    w = World()
    ada = w.person("user_id:ada", "email:ada@example.com", "anonymous_id:a1")
    stranger = w.person("anonymous_id:a2", "device_id:d2")
    wrong = w.event("user_id:ada", "anonymous_id:a2", "email:later@example.com")
    (merge,) = wrong.merges
    assert w.event("user_id:ada", "email:even-later@example.com").person == ada

    split = w.graph.unmerge(merge.id, at=w.now, reason="support ticket 42")

    assert (split.winner, split.loser, split.reason) == (ada, stranger, "support ticket 42")
    assert set(split.loser_identifiers) == {"anonymous_id:a2", "device_id:d2"}
    assert w.keys_of(stranger) == {"anonymous_id:a2", "device_id:d2"}
    # Identifiers attached with or after the merge belong to the person they attached to: ada.
    assert w.keys_of(ada) == {
        "user_id:ada",
        "email:ada@example.com",
        "anonymous_id:a1",
        "email:later@example.com",
        "email:even-later@example.com",
    }
    assert w.graph.describe(ada)["merges"] == []
    assert w.graph.describe(ada)["apart"] == [stranger]
    assert w.graph.describe(stranger)["apart"] == [ada]
    assert w.graph.canonical(stranger) == stranger
    assert_partition(w.graph)


def nested(w: World) -> tuple[str, str, str, Merge, Merge]:
    """C merged into B, then B (with C) into A; B got an email between the two merges."""
    c = w.person("anonymous_id:c1")
    b = w.person("anonymous_id:b1", "device_id:bd")
    (inner,) = w.event("anonymous_id:b1", "anonymous_id:c1").merges
    assert (inner.winner, inner.loser) == (b, c)
    w.event("anonymous_id:b1", "email:b@example.com")
    a = w.person("user_id:ua")
    (outer,) = w.event("user_id:ua", "anonymous_id:c1").merges
    assert (outer.winner, outer.loser) == (a, b)
    w.event("user_id:ua", "email:a@example.com")
    return a, b, c, inner, outer


def test_unmerging_an_outer_merge_takes_the_losers_whole_subtree():
    w = World()
    a, b, c, inner, outer = nested(w)

    w.graph.unmerge(outer.id, at=w.now)

    assert w.keys_of(a) == {"user_id:ua", "email:a@example.com"}
    assert w.keys_of(b) == {"anonymous_id:b1", "device_id:bd", "anonymous_id:c1", "email:b@example.com"}
    assert w.graph.canonical(c) == b
    assert [m["id"] for m in w.graph.describe(b)["merges"]] == [inner.id]
    assert w.graph.describe(a)["merges"] == []
    assert_partition(w.graph)
    # The inner merge can still be undone on its own.
    w.graph.unmerge(inner.id, at=w.now)
    assert w.keys_of(c) == {"anonymous_id:c1"}
    assert w.keys_of(b) == {"anonymous_id:b1", "device_id:bd", "email:b@example.com"}
    assert_partition(w.graph)


def test_unmerging_an_inner_merge_takes_only_that_subtree():
    w = World()
    a, b, c, inner, outer = nested(w)

    w.graph.unmerge(inner.id, at=w.now)

    assert w.keys_of(c) == {"anonymous_id:c1"}
    assert w.keys_of(a) == {
        "user_id:ua",
        "email:a@example.com",
        "anonymous_id:b1",
        "device_id:bd",
        "email:b@example.com",
    }
    assert w.graph.canonical(b) == a
    assert [m["id"] for m in w.graph.describe(a)["merges"]] == [outer.id]
    assert_partition(w.graph)
    w.graph.unmerge(outer.id, at=w.now)
    assert w.keys_of(b) == {"anonymous_id:b1", "device_id:bd", "email:b@example.com"}
    assert w.keys_of(a) == {"user_id:ua", "email:a@example.com"}


def test_an_undone_merge_stays_on_both_sides_trail_and_follows_later_merges_and_splits():
    """support trial r3: after an unmerge the graph still says which merge was undone, its cause, when, by
    whom and why; the entry goes where its persons go, and is kept once when the two are merged again."""
    w = World()
    a, b, c, inner, outer = nested(w)
    w.now += MINUTE
    w.graph.unmerge(inner.id, at=w.now, reason="c is someone else", by="support-ann")

    def trail(person: str) -> list[tuple[str, str, str]]:
        return [(u["id"], u["reason"], u["undone_by"]) for u in w.graph.describe(person)["undone"]]

    (entry,) = w.graph.describe(c)["undone"]
    assert entry == {**inner.as_dict(), "undone_at": w.now, "undone_by": "support-ann", "reason": "c is someone else"}
    assert trail(a) == trail(c) == [(inner.id, "c is someone else", "support-ann")]
    # B leaves A's tree with the entry of the merge B won.
    w.graph.unmerge(outer.id, at=w.now + 1, reason="b too", by="support-bo")
    assert trail(a) == [(outer.id, "b too", "support-bo")]
    assert trail(b) == [(inner.id, "c is someone else", "support-ann"), (outer.id, "b too", "support-bo")]
    # Merged again by hand: both held the outer entry; the tree holds it once, and the new undo after it.
    again = w.graph.merge(a, b, at=w.now + 2, cause={"event_id": "api:1", "rule": "api"}, force=True)
    assert [u[0] for u in trail(a)] == [inner.id, outer.id]
    w.graph.unmerge(again.id, at=w.now + 3, reason="still not", by="support-ann")
    assert [u[0] for u in trail(a)] == [outer.id, again.id]
    assert [u[0] for u in trail(b)] == [inner.id, outer.id, again.id]
    # Stored and read back as it was.
    copy_of_b = type(w.graph.persons[b]).from_doc(b, json.loads(json.dumps(w.graph.persons[b].to_doc())))
    assert copy_of_b.undone == w.graph.persons[b].undone
    # A person that never had a merge undone stores no trail at all.
    assert "undone" not in w.graph.persons[w.person("user_id:zed")].to_doc()


def test_unmerging_an_unknown_or_undone_merge_is_a_key_error():
    w = World()
    w.person("anonymous_id:a")
    w.person("anonymous_id:b")
    with pytest.raises(KeyError):
        w.graph.unmerge("m_unknown", at=w.now)
    (merge,) = w.event("anonymous_id:a", "anonymous_id:b").merges
    w.graph.unmerge(merge.id, at=w.now)
    with pytest.raises(KeyError):
        w.graph.unmerge(merge.id, at=w.now)


def test_separated_persons_are_not_merged_again_by_events():
    w = World()
    ada = w.person("user_id:ada", "email:ada@example.com")
    stranger = w.person("anonymous_id:s1")
    wrong = w.event("user_id:ada", "anonymous_id:s1")
    w.graph.unmerge(wrong.merges[0].id, at=w.now)

    replay = w.event("user_id:ada", "anonymous_id:s1")

    assert replay.person == ada
    assert replay.merges == [] and replay.drops == [Drop("anonymous_id:s1", "separated")]
    # Not through a third person either: the stranger's side grows, and still stays apart.
    w.person("anonymous_id:s2")
    assert w.event("anonymous_id:s1", "anonymous_id:s2").person == stranger
    assert w.event("anonymous_id:s2", "email:ada@example.com").drops == [Drop("anonymous_id:s2", "separated")]
    assert not w.together("user_id:ada", "anonymous_id:s1")
    with pytest.raises(MergeRefused) as refused:
        w.graph.merge(ada, stranger, at=w.now, cause={"rule": "manual"})
    assert refused.value.rule == "separated"
    assert w.graph.merge(ada, stranger, at=w.now, cause={"rule": "manual"}, force=True) is not None
    assert w.together("user_id:ada", "anonymous_id:s2")


def test_an_unmerge_separates_only_the_two_sides_it_splits():
    w = World()
    x = w.person("anonymous_id:x")
    b = w.person("anonymous_id:b")
    (first,) = w.event("anonymous_id:b", "anonymous_id:x").merges
    w.graph.unmerge(first.id, at=w.now)  # x and b are apart
    a = w.person("user_id:ua", "anonymous_id:a")
    (second,) = w.event("user_id:ua", "anonymous_id:b").merges
    assert (second.winner, second.loser) == (a, b)
    w.graph.unmerge(second.id, at=w.now)  # a and b are apart; a and x never met

    event = w.event("user_id:ua", "anonymous_id:x")

    assert event.drops == []
    assert w.graph.canonical(x) == a


# --- describe ----------------------------------------------------------------------------------------


def test_describe_tells_who_someone_is_and_how_they_became_one_person():
    w = World()
    laptop = w.person("anonymous_id:laptop-a", at=1_000)
    phone = w.person("user_id:u1", "anonymous_id:phone-a", at=2_000)
    sign_in = w.event("user_id:u1", "anonymous_id:laptop-a", "user_id:u2", at=3_000, event_id="sign-in")

    described = w.graph.describe(laptop)

    assert described["person"] == phone and described["requested"] == laptop
    assert described["created_at"] == 2_000
    assert sorted(described["identifiers"], key=lambda i: i["value"]) == [
        {"type": "anonymous_id", "value": "laptop-a", "added_at": 1_000, "owner": laptop, "quarantined": False},
        {"type": "anonymous_id", "value": "phone-a", "added_at": 2_000, "owner": phone, "quarantined": False},
        {"type": "user_id", "value": "u1", "added_at": 2_000, "owner": phone, "quarantined": False},
    ]
    assert described["merges"] == [
        {
            "id": sign_in.merges[0].id,
            "winner": phone,
            "loser": laptop,
            "at": 3_000,
            "cause": {
                "event_id": "sign-in",
                "identifiers": ["user_id:u1", "user_id:u2", "anonymous_id:laptop-a"],
                "rule": "event",
            },
        }
    ]
    assert described["drops"] == [
        {"identifier": "user_id:u2", "reason": "limit:user_id", "event_id": "sign-in", "at": 3_000}
    ]
    assert described["apart"] == []


# --- persistence -------------------------------------------------------------------------------------


class Store:
    """What the service keeps: the documents take_dirty() returns, stored as JSON."""

    def __init__(self) -> None:
        self.identifiers: dict[str, dict] = {}
        self.persons: dict[str, dict] = {}
        self.merges: dict[str, str] = {}

    def save(self, graph: IdentityGraph) -> None:
        identifiers, persons, merges = json.loads(json.dumps(graph.take_dirty()))
        self.identifiers.update(identifiers)
        self.persons.update(persons)
        self.merges.update(merges)

    def full_graph(self, rules: MergeRules) -> IdentityGraph:
        graph = IdentityGraph(rules)
        for key, doc in self.identifiers.items():
            graph.load_identifier(key, doc)
        for person_id, doc in self.persons.items():
            graph.load_person(person_id, doc)
        for merge_id, winner in self.merges.items():
            graph.load_merge(merge_id, winner)
        return graph

    def graph_for(self, rules: MergeRules, keys: list[str]) -> IdentityGraph:
        """A cold cache loaded the way the graph asks: the event's identifiers, then the persons it needs."""
        graph = IdentityGraph(rules)
        for key in graph.missing_identifiers(keys):
            if key in self.identifiers:
                graph.load_identifier(key, self.identifiers[key])
        while needed := [p for p in graph.unresolved_persons(keys) if p in self.persons]:
            for person_id in needed:
                graph.load_person(person_id, self.persons[person_id])
        for merge_id, winner in self.merges.items():
            graph.load_merge(merge_id, winner)
        return graph


def history(w: World, store: Store) -> None:
    """Merges, an unmerge, drops and a quarantine, saved after every step."""
    steps = [
        lambda: w.event("anonymous_id:laptop-a"),
        lambda: w.event("user_id:u1", "anonymous_id:phone-a", "email:ada@example.com"),
        lambda: w.event("user_id:u1", "anonymous_id:laptop-a"),
        lambda: w.event("anonymous_id:stranger"),
        lambda: w.event("email:ada@example.com", "anonymous_id:stranger"),
        lambda: w.graph.unmerge(w.graph.describe(w.graph.person_of("user_id:u1"))["merges"][-1]["id"], at=w.now),
        lambda: w.event("user_id:u2", "device_id:kiosk"),
        lambda: w.event("user_id:u3", "device_id:kiosk"),
        lambda: w.event("user_id:u4", "device_id:kiosk"),
        lambda: w.event("user_id:u1", "user_id:u5"),
    ]
    for step in steps:
        step()
        store.save(w.graph)


FUTURE = [
    ("user_id:u1", "anonymous_id:stranger"),
    ("anonymous_id:laptop-a", "device_id:kiosk"),
    ("device_id:kiosk",),
    ("user_id:u2", "email:ada@example.com"),
    ("anonymous_id:new", "anonymous_id:stranger", "email:s@example.com"),
    ("user_id:u6", "email:s@example.com"),
]


def test_take_dirty_hands_each_change_over_once():
    w = World()
    w.event("user_id:u1", "anonymous_id:a1")
    identifiers, persons, merges = w.graph.take_dirty()
    assert set(identifiers) == {"user_id:u1", "anonymous_id:a1"}
    assert list(persons) == [w.graph.person_of("user_id:u1")]
    assert merges == {}
    assert w.graph.take_dirty() == ({}, {}, {})
    w.event("user_id:u1")  # nothing new
    assert w.graph.take_dirty() == ({}, {}, {})
    w.event("anonymous_id:a2")
    (merge,) = w.event("user_id:u1", "anonymous_id:a2").merges
    _, persons, merges = w.graph.take_dirty()
    assert merges == {merge.id: merge.winner}
    assert set(persons) >= {merge.winner, merge.loser}


def test_a_graph_rebuilt_from_its_documents_has_the_same_partition_and_the_same_future():
    w = World()
    store = Store()
    history(w, store)
    rebuilt = store.full_graph(w.rules)

    assert rebuilt.partition() == w.graph.partition()
    assert rebuilt.quarantined() == w.graph.quarantined() == ["device_id:kiosk"]
    for root in w.graph.partition():
        assert rebuilt.describe(root) == w.graph.describe(root)
    for n, keys in enumerate(FUTURE):
        identifiers = w.identifiers(keys)
        expected = w.graph.resolve(identifiers, event_id=f"f{n}", at=w.now + n)
        assert rebuilt.resolve(identifiers, event_id=f"f{n}", at=w.now + n) == expected
    assert rebuilt.partition() == w.graph.partition()


def test_documents_already_taken_do_not_change_afterwards():
    # The service writes documents after the graph has moved on (a batch is written while the next one
    # is applied): what it writes must be what take_dirty() returned.
    w = World()
    w.event("user_id:u1", "anonymous_id:a1")
    w.event("anonymous_id:a2")
    w.event("user_id:u1", "anonymous_id:a2")
    taken = w.graph.take_dirty()
    kept = copy.deepcopy(taken)

    w.event("anonymous_id:a3")
    (merge,) = w.event("user_id:u1", "anonymous_id:a3", "user_id:u2").merges
    w.graph.unmerge(merge.id, at=w.now)

    assert taken == kept


def test_a_graph_loading_only_what_an_event_needs_keeps_unmerged_persons_apart():
    w = World()
    store = Store()
    x = w.person("anonymous_id:x")
    w.person("anonymous_id:y")
    (merge,) = w.event("anonymous_id:x", "anonymous_id:y").merges
    w.graph.unmerge(merge.id, at=w.now)  # x and y are apart from now on
    w.person("email:c@example.com")
    w.person("email:d@example.com")
    w.event("email:d@example.com", "anonymous_id:x")  # x's person merges into a stronger one
    w.event("email:c@example.com", "anonymous_id:y")  # and so does y's
    store.save(w.graph)
    identifiers = w.identifiers(("email:c@example.com", "email:d@example.com"))
    cold = store.graph_for(w.rules, [i.key for i in identifiers])

    expected = w.graph.resolve(identifiers, event_id="late", at=w.now + MINUTE)
    assert expected.drops == [Drop("email:d@example.com", "separated")]
    assert cold.resolve(identifiers, event_id="late", at=w.now + MINUTE) == expected
    assert w.graph.canonical(x) != w.graph.person_of("email:c@example.com")


def test_a_graph_loading_only_what_an_event_needs_counts_all_quarantine_evidence():
    # anonymous_id: quarantine after 5 persons. A shared anonymous id meets four more persons; the same
    # events go to a warm graph and, each on a cold cache, to graphs loaded from the store.
    warm = World()
    store = Store()
    warm.event("user_id:u0", "anonymous_id:shared")
    store.save(warm.graph)
    for n in range(1, 5):
        identifiers = warm.identifiers((f"user_id:u{n}", "anonymous_id:shared"))
        cold = store.graph_for(warm.rules, [i.key for i in identifiers])
        expected = warm.graph.resolve(identifiers, event_id=f"c{n}", at=n * DAY)
        assert cold.resolve(identifiers, event_id=f"c{n}", at=n * DAY) == expected
        store.save(cold)

    assert warm.graph.quarantined() == ["anonymous_id:shared"]


# --- determinism -------------------------------------------------------------------------------------


SCRIPT = [
    ("anonymous_id:a1",),
    ("anonymous_id:a2", "device_id:d1"),
    ("user_id:u1", "anonymous_id:a1", "email:ada@example.com"),
    ("user_id:u1", "anonymous_id:a2"),
    ("user_id:u2", "device_id:d1"),
    ("anonymous_id:a3", "email:ada@example.com", "phone:+1 415 555 0100"),
    ("user_id:u3", "phone:(415) 555-0100"),
    ("anonymous_id:a4",),
    ("anonymous_id:a4", "anonymous_id:a3"),
]


def run(script) -> tuple[World, list[Resolution | None]]:
    w = World()
    return w, [w.event(*keys) for keys in script]


def test_replaying_the_same_events_on_a_fresh_graph_gives_the_same_person_and_merge_ids():
    first, first_results = run(SCRIPT)
    second, second_results = run(SCRIPT)
    assert first_results == second_results
    assert first.graph.partition() == second.graph.partition()
    assert any(r.merges for r in first_results) and any(r.drops for r in first_results)


def test_a_redelivered_event_changes_nothing():
    w, results = run(SCRIPT)
    before = w.graph.partition()
    for n, keys in enumerate(SCRIPT):
        again = w.graph.resolve(w.identifiers(keys), event_id=f"e{n + 1}", at=w.now)
        assert again.person == w.graph.canonical(results[n].person)
        assert again.merges == [] and again.attached == [] and not again.created
    assert w.graph.partition() == before
