"""Privacy deletion in the graph (`IdentityGraph.purge`): the person goes with everyone merged into it and
every identifier it owns, and the records that stay name neither any more. Plain Python, no I/O.
"""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_identity.domain.graph import Drop, IdentityGraph, Purged, Resolution, mentions
from cdp_identity.domain.normalize import Normalizer
from cdp_identity.domain.rules import MergeRules

MINUTE = 60_000


class World:
    """A graph fed like the service feeds it: raw values normalised, one event id per event, time moving on."""

    def __init__(self) -> None:
        self.rules = MergeRules.default()
        self.normalizer = Normalizer(self.rules)
        self.graph = IdentityGraph(self.rules)
        self.now = 0
        self.sent = 0

    def event(self, *keys: str) -> Resolution:
        self.sent += 1
        self.now += MINUTE
        identifiers, _ = self.normalizer.normalize([tuple(k.split(":", 1)) for k in keys])
        resolution = self.graph.resolve(identifiers, event_id=f"event-{self.sent:04d}", at=self.now)
        assert resolution is not None
        return resolution

    def person(self, *keys: str) -> str:
        return self.event(*keys).person

    def keys_of(self, person: str) -> set[str]:
        return set(self.graph.identifiers_of(self.graph.root_of(person)))

    def documents(self) -> str:
        """Everything the graph would store, as one JSON text."""
        graph = self.graph
        return json.dumps(
            {
                "identifiers": {k: s.to_doc() for k, s in graph.identifiers.items()},
                "persons": {p: s.to_doc() for p, s in graph.persons.items()},
                "merges": graph.merge_index,
            }
        )


def assert_partition(graph: IdentityGraph) -> None:
    resolving: dict[str, set[str]] = {}
    for key in graph.identifiers:
        resolving.setdefault(graph.person_of(key), set()).add(key)
    roots = {p.id for p in graph.persons.values() if p.merged_into is None}
    assert set(resolving) <= roots
    for root in roots:
        assert set(graph.persons[root].ids) == resolving.get(root, set())


def assert_forgotten(w: World, purged: Purged, *names: str) -> None:
    text = w.documents()
    for name in [*purged.persons, *purged.identifiers, *purged.merges, *names]:
        assert name not in text, f"{name!r} is still in the graph"
    for key in purged.identifiers:
        assert w.graph.person_of(key) is None
    for person in purged.persons:
        assert w.graph.canonical(person) is None
    assert_partition(w.graph)


def ada_with_a_merge(w: World) -> tuple[str, str]:
    """Ada browsed on her laptop anonymously, signed up on her phone, then signed in on the laptop."""
    laptop = w.person("anonymous_id:ada-laptop", "device_id:laptop")
    ada = w.person("user_id:ada", "anonymous_id:ada-phone", "email:ada@example.com")
    (merge,) = w.event("user_id:ada", "anonymous_id:ada-laptop").merges
    assert (merge.winner, merge.loser) == (ada, laptop)
    return ada, laptop


def test_a_purged_person_goes_with_everyone_merged_into_it_and_every_identifier_it_owns():
    w = World()
    ada, laptop = ada_with_a_merge(w)
    bob = w.person("user_id:bob", "email:bob@example.com")
    w.graph.take_dirty()

    purged = w.graph.purge([ada])

    assert purged.persons == [laptop, ada]  # the merged-away person first, the root last
    assert purged.identifiers == {
        "user_id:ada",
        "anonymous_id:ada-phone",
        "email:ada@example.com",
        "anonymous_id:ada-laptop",
        "device_id:laptop",
    }
    assert len(purged.merges) == 1
    assert_forgotten(w, purged, "event-0001", "event-0002", "event-0003", "ada-laptop")
    assert w.keys_of(bob) == {"user_id:bob", "email:bob@example.com"}
    identifiers, persons, merges = w.graph.take_removed()
    assert (set(identifiers), persons, merges) == (purged.identifiers, [laptop, ada], sorted(purged.merges))
    assert w.graph.take_removed() == ([], [], [])
    assert w.graph.take_dirty() == ({}, {}, {})  # nothing that stays named ada


def test_purging_again_or_an_unknown_person_changes_nothing():
    w = World()
    ada, _laptop = ada_with_a_merge(w)
    w.graph.purge([ada])
    w.graph.take_dirty(), w.graph.take_removed()
    before = w.documents()

    assert not w.graph.purge([ada])
    assert not w.graph.purge(["p_never_seen"])
    assert w.graph.take_dirty() == ({}, {}, {}) and w.graph.take_removed() == ([], [], [])
    assert w.documents() == before


def test_a_purged_identifier_seen_again_makes_a_new_person():
    w = World()
    ada, _laptop = ada_with_a_merge(w)
    w.graph.purge([ada])

    again = w.event("user_id:ada", "email:ada@example.com")

    assert again.created and again.person != ada
    assert w.keys_of(again.person) == {"user_id:ada", "email:ada@example.com"}
    identifiers, _persons, _merges = w.graph.take_dirty()
    removed_identifiers, _, _ = w.graph.take_removed()
    assert "user_id:ada" in identifiers and "user_id:ada" not in removed_identifiers


def test_purging_a_person_merged_into_a_survivor_takes_out_only_its_part():
    # C merged into B, B (with C) into A; the request names B: B and C go, A stays with what is its own.
    w = World()
    c = w.person("anonymous_id:c1")
    b = w.person("anonymous_id:b1", "device_id:bd")
    (inner,) = w.event("anonymous_id:b1", "anonymous_id:c1").merges
    w.event("anonymous_id:b1", "email:b@example.com")
    a = w.person("user_id:ua")
    (outer,) = w.event("user_id:ua", "anonymous_id:c1").merges
    w.event("user_id:ua", "email:a@example.com")

    purged = w.graph.purge([b])

    assert purged.persons == [c, b]
    assert purged.identifiers == {"anonymous_id:b1", "device_id:bd", "anonymous_id:c1", "email:b@example.com"}
    assert purged.merges == {inner.id, outer.id}
    assert purged.rewritten_persons == {a}
    assert w.keys_of(a) == {"user_id:ua", "email:a@example.com"}
    assert w.graph.describe(a)["merges"] == []
    assert_forgotten(w, purged)


def test_separations_from_a_purged_person_are_forgotten_on_both_sides():
    w = World()
    ada = w.person("user_id:ada", "email:ada@example.com")
    stranger = w.person("anonymous_id:s1", "device_id:s-phone")
    (wrong,) = w.event("user_id:ada", "anonymous_id:s1").merges
    w.graph.unmerge(wrong.id, at=w.now)
    assert w.graph.describe(ada)["apart"] == [stranger]

    purged = w.graph.purge([stranger])

    assert purged.persons == [stranger]
    # The undone merge stays in the index under its winner: its id is a hash that names nobody.
    assert purged.merges == set() and w.graph.merge_index[wrong.id] == ada
    assert w.graph.describe(ada)["apart"] == []
    assert purged.rewritten_persons == {ada}
    assert_forgotten(w, purged, "s-phone")
    # The stranger's anonymous id now is a new person's, and nothing keeps it apart from ada any more.
    assert w.event("user_id:ada", "anonymous_id:s1").drops == []


def test_unmerge_history_inside_the_purged_person_goes_and_the_split_off_side_stays():
    w = World()
    ada = w.person("user_id:ada", "email:ada@example.com")
    kiosk_visitor = w.person("anonymous_id:kiosk-visitor")
    (wrong,) = w.event("user_id:ada", "anonymous_id:kiosk-visitor").merges
    w.graph.unmerge(wrong.id, at=w.now)
    laptop = w.person("anonymous_id:ada-laptop")
    (right,) = w.event("user_id:ada", "anonymous_id:ada-laptop").merges

    purged = w.graph.purge([ada])

    assert set(purged.persons) == {ada, laptop}
    assert purged.merges == {wrong.id, right.id}
    assert w.keys_of(kiosk_visitor) == {"anonymous_id:kiosk-visitor"}
    assert w.graph.describe(kiosk_visitor)["apart"] == []
    assert_forgotten(w, purged)


def test_quarantined_identifiers_go_and_evidence_naming_the_person_no_longer_counts():
    w = World()  # device_id: quarantined after 3 persons
    ada = w.person("user_id:ada", "device_id:ada-tablet")
    w.event("user_id:u2", "device_id:ada-tablet")
    assert w.event("user_id:u3", "device_id:ada-tablet").quarantined == ["device_id:ada-tablet"]
    # Ada's user id met Bob's kiosk: the kiosk's evidence names ada's person.
    bob = w.person("user_id:bob", "device_id:kiosk")
    w.event("user_id:ada", "device_id:kiosk")
    assert ada in w.graph.identifiers["device_id:kiosk"].conflicts

    purged = w.graph.purge([ada])

    assert "device_id:ada-tablet" in purged.identifiers
    assert w.graph.quarantined() == []
    assert w.graph.identifiers["device_id:kiosk"].conflicts == {}
    assert purged.rewritten_identifiers == {"device_id:kiosk"}
    assert w.graph.person_of("device_id:kiosk") == bob
    assert_forgotten(w, purged, "ada-tablet")
    # Two more persons on the kiosk: with ada gone, it takes both to quarantine it.
    assert w.event("user_id:u4", "device_id:kiosk").quarantined == []
    assert w.event("user_id:u5", "device_id:kiosk").quarantined == ["device_id:kiosk"]


def test_drops_and_merge_causes_naming_a_purged_identifier_are_scrubbed_from_the_survivors():
    w = World()
    zara = w.person("user_id:zara", "email:zara@example.com")
    bob = w.person("user_id:bob")
    bob_browsing = w.person("anonymous_id:bob-a")
    # Bob signs in on a page that also carries zara's user id: it is dropped, and bob's persons merge.
    sign_in = w.event("user_id:bob", "user_id:zara", "anonymous_id:bob-a")
    assert sign_in.person == bob
    assert sign_in.drops == [Drop("user_id:zara", "limit:user_id")]
    (merge,) = sign_in.merges
    assert merge.cause["identifiers"] == ["user_id:bob", "user_id:zara", "anonymous_id:bob-a"]

    purged = w.graph.purge([zara])

    described = w.graph.describe(bob)
    assert described["drops"] == []
    assert [m["cause"]["identifiers"] for m in described["merges"]] == [["user_id:bob", "anonymous_id:bob-a"]]
    assert w.graph.canonical(bob_browsing) == bob  # the merge itself was bob's and stays
    assert purged.rewritten_persons == {bob}
    assert_forgotten(w, purged, "zara")


def test_an_identifier_the_graph_gives_to_someone_else_is_not_purged():
    # The family tablet: mum's. Dad's event carried it too (his profile lists it), but it is not his.
    w = World()
    mum = w.person("user_id:mum", "device_id:tablet")
    dad = w.event("user_id:dad", "device_id:tablet")
    assert dad.drops == [Drop("device_id:tablet", "limit:user_id")]

    purged = w.graph.purge([dad.person])

    assert purged.identifiers == {"user_id:dad"}
    assert w.keys_of(mum) == {"user_id:mum", "device_id:tablet"}
    assert w.graph.person_of("device_id:tablet") == mum


def test_documents_taken_before_a_purge_do_not_change_afterwards():
    # A batch's documents may still be on their way to the store while the purge rewrites the survivors.
    w = World()
    ada = w.person("user_id:ada")
    sign_in = w.event("user_id:bob", "user_id:ada", "anonymous_id:bob-a")
    w.event("anonymous_id:bob-b")
    w.event("user_id:bob", "anonymous_id:bob-b")
    _, persons, _ = w.graph.take_dirty()
    kept = json.dumps(persons)

    w.graph.purge([ada])

    assert json.dumps(persons) == kept
    assert "user_id:ada" in json.dumps(persons[sign_in.person])


# --- a cold cache: what the service loads before it purges --------------------------------------------


class Store:
    """The documents the service keeps, written from take_dirty() and take_removed()."""

    def __init__(self) -> None:
        self.identifiers: dict[str, dict] = {}
        self.persons: dict[str, dict] = {}
        self.merges: dict[str, str] = {}

    def save(self, graph: IdentityGraph) -> None:
        identifiers, persons, merges = json.loads(json.dumps(graph.take_dirty()))
        self.identifiers.update(identifiers)
        self.persons.update(persons)
        self.merges.update(merges)
        gone_identifiers, gone_persons, gone_merges = graph.take_removed()
        for table, keys in ((self.identifiers, gone_identifiers), (self.persons, gone_persons)):
            for key in keys:
                del table[key]
        for merge_id in gone_merges:
            self.merges.pop(merge_id, None)

    def text(self) -> str:
        return json.dumps([self.identifiers, self.persons, self.merges])

    def cold_purge(self, rules: MergeRules, person_ids: list[str]) -> tuple[IdentityGraph, Purged]:
        """Load what purge_dependencies asks for, then purge, like the service on a fresh cache."""
        graph = IdentityGraph(rules)
        while needed := [p for p in graph.purge_dependencies(person_ids) if p in self.persons]:
            for person_id in needed:
                graph.load_person(person_id, self.persons[person_id])
        _persons, keys = graph.purge_scope(person_ids)
        for key in keys:
            if key in self.identifiers:
                graph.load_identifier(key, self.identifiers[key])
        for merge_id, winner in self.merges.items():
            graph.load_merge(merge_id, winner)
        purged = graph.purge(person_ids)
        self.save(graph)
        return graph, purged


def test_a_cold_cache_loads_the_separated_side_and_the_store_keeps_no_trace():
    w = World()
    store = Store()
    ada, laptop = ada_with_a_merge(w)
    stranger = w.person("anonymous_id:s1")
    (wrong,) = w.event("user_id:ada", "anonymous_id:s1").merges
    w.graph.unmerge(wrong.id, at=w.now)
    # The stranger's side later merges into someone else: the separation lives on that root now.
    other = w.person("email:other@example.com")
    w.event("email:other@example.com", "anonymous_id:s1")
    assert w.graph.canonical(stranger) == other
    store.save(w.graph)

    _graph, purged = store.cold_purge(w.rules, [ada, laptop])

    assert set(purged.persons) == {ada, laptop}
    assert purged.rewritten_persons >= {other}
    for name in [ada, laptop, "user_id:ada", "email:ada@example.com", "device_id:laptop", "ada-laptop"]:
        assert name not in store.text()
    assert {"email:other@example.com", "anonymous_id:s1"} <= set(store.identifiers)


def test_references_to_a_person_no_longer_stored_are_ignored():
    # Another replica wrote evidence naming a person after this one purged it: loading stops at the
    # missing person, and it counts for nothing.
    w = World()
    store = Store()
    w.person("user_id:bob", "device_id:kiosk")
    w.person("user_id:u2")
    w.event("user_id:u2", "device_id:kiosk")
    store.save(w.graph)
    store.identifiers["device_id:kiosk"]["conflicts"].append(["p_purged", w.now])

    graph = IdentityGraph(w.rules)
    graph.load_identifier("device_id:kiosk", store.identifiers["device_id:kiosk"])
    while needed := [p for p in graph.unresolved_persons(["device_id:kiosk"]) if p in store.persons]:
        for person_id in needed:
            graph.load_person(person_id, store.persons[person_id])
    assert graph.unresolved_persons(["device_id:kiosk"]) == {"p_purged"}
    identifiers, _ = w.normalizer.normalize([("user_id", "u3"), ("device_id", "kiosk")])

    resolution = graph.resolve(identifiers, event_id="x", at=w.now + MINUTE)

    # bob's own person, u2's and u3's: three persons make the quarantine; the purged one does not count.
    assert resolution.quarantined == ["device_id:kiosk"]


def test_mentions_finds_a_name_as_a_whole_string_anywhere_in_a_document():
    doc = {"ids": [["email:ada@example.com", 1, "p_1"]], "cause": {"identifiers": ["user_id:ada"]}, "n": 3}
    assert mentions(doc, {"p_1"})
    assert mentions(doc, {"user_id:ada"})
    assert mentions({"p_1": 1}, {"p_1"})
    assert not mentions(doc, {"p_10", "ada", "user_id:ad"})
    assert not mentions(doc, set())


# --- any history --------------------------------------------------------------------------------------

# Many anonymous ids met one or two at a time: persons form apart and merge later.
POOL = [
    *(f"user_id:u{i}" for i in range(3)),
    *(f"email:e{i}@example.com" for i in range(3)),
    *(f"device_id:d{i}" for i in range(3)),
    *(f"anonymous_id:a{i}" for i in range(12)),
]


def history(rng: random.Random) -> World:
    """Events of one or two identifiers, and now and then an unmerge of one of the merges so far."""
    w = World()
    for _ in range(rng.randint(10, 60)):
        merges = [m["id"] for p in w.graph.persons.values() for m in p.lineage]
        if merges and rng.random() < 0.15:
            w.graph.unmerge(rng.choice(merges), at=w.now)
        else:
            w.event(*rng.sample(POOL, rng.randint(1, 2)))
    return w


# A seed, not a list of steps: hypothesis's small examples rarely merge anyone, random histories do.
@given(seed=st.integers(0, 2**32), pick=st.integers(0, 1_000))
@settings(max_examples=200, deadline=None)
def test_after_any_history_a_purge_leaves_no_mention_and_the_rest_unchanged(seed, pick):
    w = history(random.Random(seed))
    persons = sorted(w.graph.persons)
    merged = [p for p in persons if w.graph.persons[w.graph.root_of(p)].lineage]
    candidates = merged if merged and pick % 4 else persons  # mostly a person with merges
    target = candidates[pick % len(candidates)]  # a root, or a person merged into one

    def within(person_id: str | None) -> bool:  # target itself or merged into it, directly or not
        while person_id is not None and person_id != target:
            person_id = w.graph.persons[person_id].merged_into
        return person_id == target

    gone = {p for p in persons if within(p)}
    expected = {}
    for root, keys in w.graph.partition().items():
        owners = w.graph.persons[root].ids
        kept = frozenset(k for k in keys if owners[k][1] not in gone)
        if root not in gone and kept:
            expected[root] = kept

    purged = w.graph.purge([target])

    names = set(purged.persons) | purged.identifiers
    assert set(purged.persons) == gone
    assert w.graph.partition() == expected
    for key, state in w.graph.identifiers.items():
        assert key not in names and not mentions(state.to_doc(), names)
    for person_id, person in w.graph.persons.items():
        assert person_id not in names and not mentions(person.to_doc(), names)
    assert not mentions(w.graph.merge_index, names)
    assert_partition(w.graph)
    assert not w.graph.purge([target])
    # The graph goes on: every identifier can be met again.
    for n in range(0, len(POOL), 3):
        w.event(*POOL[n : n + 3])
    assert_partition(w.graph)
