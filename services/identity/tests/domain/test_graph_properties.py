"""Random event streams against IdentityGraph: invariants after every step, and a simple reference model.

The reference model is the semantics written down plainly: a list of persons, each a dict identifier ->
when it was attached and a creation time; no union-find, no lineage. Small identifier pools make
collisions (and so merges, limits and drops) frequent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_identity.domain.graph import Drop, IdentityGraph, Resolution
from cdp_identity.domain.normalize import Identifier, Normalizer
from cdp_identity.domain.rules import MergeRules

MINUTE = 60_000
DAY = 86_400_000

USER_IDS = ["u1", "u2", "u3"]
EMAILS = ["ada@example.com", " Ada@Example.COM", "bob@example.com", "cy@example.com", "n/a", "not-an-email"]
ANONYMOUS_IDS = ["a1", "a2", "a3", "a4", "undefined"]
DEVICE_IDS = ["d1", "d2", "00000000-0000-0000-0000-000000000000"]
PLACEHOLDERS = {"n/a", "undefined", "00000000-0000-0000-0000-000000000000"}

TYPE_ORDER = ["user_id", "salesforce_id", "hubspot_id", "dynamics_id", "zoho_id", "email", "phone"]
TYPE_ORDER += ["device_id", "anonymous_id"]
# The default types and limits (user_id 1, email 5, phone 3, device_id 20), without quarantine.
DEFAULT_WITHOUT_QUARANTINE = {"types": [{"name": name, "quarantine_after": None} for name in TYPE_ORDER]}
# Limits that bite with these pools, two of them within windows.
TIGHT_WINDOWS = {
    "types": [
        {"name": "user_id", "limit": 1},
        {"name": "email", "limit": 2, "window": "2d"},
        {"name": "device_id", "limit": 1, "window": "1d", "quarantine_after": None},
        {"name": "anonymous_id", "limit": 2, "quarantine_after": None},
    ]
}


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    kind: str  # identify, alias, track, page, screen, server: which identifiers such a call carries
    pairs: tuple[tuple[str, str], ...]
    gap: int  # ms since the previous event
    redelivered: bool = False  # the bus delivers it a second time right after


def one(kind: str, pool: list[str]):
    return st.sampled_from(pool).map(lambda value: ((kind, value),))


def maybe(kind: str, pool: list[str]):
    return st.one_of(st.just(()), one(kind, pool))


def event(kind: str, *parts):
    return st.builds(
        lambda pairs, gap, again: Event(kind, sum(pairs, ()), gap, again),
        st.tuples(*parts),
        # Mostly minutes apart (two draws in three), sometimes days: limit windows open and close.
        st.one_of(st.integers(1, 10 * MINUTE), st.integers(1, 10 * MINUTE), st.integers(1, 3 * DAY)),
        st.booleans(),
    )


def streams(user_ids=USER_IDS, anonymous_ids=ANONYMOUS_IDS, device_ids=DEVICE_IDS, emails=EMAILS):
    events = st.one_of(
        event(
            "identify",
            one("user_id", user_ids),
            maybe("anonymous_id", anonymous_ids),
            maybe("email", emails),
            maybe("device_id", device_ids),
        ),
        # alias(previous_id, user_id): the previous id is an anonymous id or an older user id.
        event(
            "alias", one("user_id", user_ids), st.one_of(one("anonymous_id", anonymous_ids), one("user_id", user_ids))
        ),
        event("track", maybe("user_id", user_ids), one("anonymous_id", anonymous_ids), maybe("device_id", device_ids)),
        event("page", one("anonymous_id", anonymous_ids), maybe("email", emails)),
        event("screen", one("anonymous_id", anonymous_ids), one("device_id", device_ids)),  # a mobile app
        event("server", one("user_id", user_ids), maybe("email", emails)),  # a backend call: no browser ids
    )
    return st.lists(events, min_size=10, max_size=40)


STREAMS = streams()
# Shared devices met by many users: quarantine (device_id after 3 persons) happens often.
SHARED_DEVICE_STREAMS = streams(user_ids=[f"u{i}" for i in range(1, 7)], device_ids=["d1", "d2"])


def expected_keys(pairs, rules: MergeRules) -> list[str]:
    """The pools' normalisation, by hand: emails folded, placeholders and malformed values gone."""
    keys = set()
    for kind, value in pairs:
        value = value.strip()
        if value.lower() in PLACEHOLDERS or (kind == "email" and "@" not in value):
            continue
        keys.add(f"{kind}:{value.lower() if kind == 'email' else value}")
    return sorted(keys, key=lambda k: (rules.require_type(k.split(":")[0]).priority, k.split(":", 1)[1]))


# --- the reference model ---------------------------------------------------------------------------


def type_of(key: str) -> str:
    return key.split(":", 1)[0]


@dataclass(eq=False)
class ModelPerson:
    created_at: int
    added: dict[str, int] = field(default_factory=dict)  # identifier -> when it was first attached


@dataclass
class Outcome:
    keys: frozenset[str]
    created_at: int
    drops: list[Drop]


class Model:
    def __init__(self, rules: MergeRules) -> None:
        self.rules = rules
        self.persons: list[ModelPerson] = []
        self.first_person: dict[str, int] = {}  # identifier -> created_at of the person it first attached to

    def person_with(self, key: str) -> ModelPerson | None:
        return next((p for p in self.persons if key in p.added), None)

    def over_limit(self, persons: list[ModelPerson], new: list[str], at: int) -> str | None:
        """The strongest type over its limit if these persons and new identifiers were one person."""
        for kind in self.rules.types:
            if kind.limit is None:
                continue
            since = -(10**18) if kind.window is None else at - kind.window * 1000
            count = sum(type_of(k) == kind.name and t >= since for p in persons for k, t in p.added.items())
            count += sum(type_of(k) == kind.name for k in new)
            if count > kind.limit:
                return kind.name
        return None

    def strength(self, person: ModelPerson) -> tuple[int, int]:
        return min(self.rules.require_type(type_of(k)).priority for k in person.added), person.created_at

    def resolve(self, keys: list[str], at: int) -> Outcome | None:
        linked: list[ModelPerson] = []
        new: list[str] = []
        drops: list[Drop] = []
        for key in keys:  # strongest first
            person = self.person_with(key)
            if person is None:
                over = self.over_limit(linked, [*new, key], at)
            elif person in linked:
                continue
            else:
                over = self.over_limit([*linked, person], new, at)
            if over is not None:
                drops.append(Drop(key, f"limit:{over}"))
            elif person is None:
                new.append(key)
            else:
                linked.append(person)
        if not linked and not new:
            return None
        if linked:
            winner = min(linked, key=self.strength)
            for loser in linked:
                if loser is not winner:
                    winner.added.update(loser.added)
                    self.persons.remove(loser)
        else:
            winner = ModelPerson(created_at=at)
            self.persons.append(winner)
        for key in new:
            winner.added[key] = at
            self.first_person[key] = winner.created_at
        return Outcome(frozenset(winner.added), winner.created_at, drops)

    def partition(self) -> set[frozenset[str]]:
        return {frozenset(p.added) for p in self.persons}


# --- invariants ----------------------------------------------------------------------------------


def check_invariants(graph: IdentityGraph, now: int, limits: bool = True) -> None:
    """The graph is a partition of identifiers; with `limits`, every person keeps within them (which holds for
    persons made by events, not for forced merges)."""
    resolving: dict[str, set[str]] = {}
    for key, state in graph.identifiers.items():
        assert state.person in graph.persons, key
        resolving.setdefault(graph.person_of(key), set()).add(key)
    roots = [p for p in graph.persons.values() if p.merged_into is None]
    # Every root owns at least the identifier it was created with.
    assert set(resolving) == {p.id for p in roots}
    for root in roots:
        assert set(root.ids) == resolving[root.id]
        for key, (added_at, owner) in root.ids.items():
            assert graph.identifiers[key].person == owner
            assert graph.root_of(owner) == root.id
            assert added_at == graph.identifiers[key].first_seen
        for kind in graph.rules.types if limits else ():
            if kind.limit is not None:
                since = -(10**18) if kind.window is None else now - kind.window * 1000
                count = sum(type_of(k) == kind.name and t >= since for k, (t, _) in root.ids.items())
                assert count <= kind.limit, (root.id, kind.name, sorted(root.ids))
    for person in graph.persons.values():
        if person.merged_into is not None:
            assert person.ids == {} and person.lineage == []


def blocks(graph: IdentityGraph) -> set[frozenset[str]]:
    return set(graph.partition().values())


class Feed:
    """Normalises and times a stream of events for one graph."""

    def __init__(self, config: dict) -> None:
        self.rules = MergeRules.from_dict(config)
        self.normalizer = Normalizer(self.rules)
        self.graph = IdentityGraph(self.rules)
        self.now = 0

    def identifiers(self, e: Event) -> list[Identifier]:
        identifiers, _ = self.normalizer.normalize(list(e.pairs))
        return identifiers

    def apply(self, n: int, e: Event) -> tuple[list[Identifier], Resolution | None]:
        self.now += e.gap
        identifiers = self.identifiers(e)
        return identifiers, self.graph.resolve(identifiers, event_id=f"e{n}", at=self.now)


# --- properties ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [DEFAULT_WITHOUT_QUARANTINE, TIGHT_WINDOWS], ids=["default", "tight-windows"])
@settings(max_examples=120, deadline=None)
@given(stream=STREAMS)
def test_the_graph_links_like_the_reference_model(config, stream):
    feed = Feed(config)
    model = Model(feed.rules)
    for n, e in enumerate(stream):
        identifiers, resolution = feed.apply(n, e)
        keys = [i.key for i in identifiers]
        assert keys == expected_keys(e.pairs, feed.rules)
        expected = model.resolve(keys, feed.now)

        if expected is None:
            assert resolution is None
        else:
            assert resolution is not None
            assert frozenset(feed.graph.identifiers_of(resolution.person)) == expected.keys
            # The same winner: the one with the strongest identifier, then the oldest.
            assert feed.graph.persons[resolution.person].created_at == expected.created_at
            assert resolution.drops == expected.drops
        assert blocks(feed.graph) == model.partition()
        check_invariants(feed.graph, feed.now)

        if e.redelivered and resolution is not None:
            before = feed.graph.partition()
            again = feed.graph.resolve(identifiers, event_id=f"e{n}", at=feed.now)
            assert again is not None and again.person == resolution.person
            assert (again.created, again.attached, again.merges) == (False, [], [])
            assert feed.graph.partition() == before


@settings(max_examples=120, deadline=None)
@given(stream=STREAMS, data=st.data())
def test_undoing_every_merge_gives_each_identifier_back_to_the_person_it_first_attached_to(stream, data):
    feed = Feed(DEFAULT_WITHOUT_QUARANTINE)
    graph = feed.graph
    merges = []
    attached_to: dict[str, str] = {}  # identifier -> the person the event attached it to
    # Explicit merges (forced: the review queue overrides limits) between the events make merge trees deep.
    explicit = data.draw(st.lists(st.tuples(st.integers(0, 39), st.integers(0, 99), st.integers(0, 99)), max_size=8))
    for n, e in enumerate(stream):
        _, resolution = feed.apply(n, e)
        if resolution is not None:
            merges.extend(resolution.merges)
            attached_to.update(dict.fromkeys(resolution.attached, resolution.person))
        for after, i, j in explicit:
            keys = sorted(graph.identifiers)
            if after == n and keys:
                a, b = graph.person_of(keys[i % len(keys)]), graph.person_of(keys[j % len(keys)])
                merge = graph.merge(a, b, at=feed.now, cause={"rule": "review"}, force=True)
                merges.extend([merge] if merge else [])
        check_invariants(graph, feed.now, limits=not explicit)
    order = data.draw(st.one_of(st.just(merges[::-1]), st.permutations(merges)), label="unmerge order")

    separated = []
    for merge in order:
        loser = merge.loser
        subtree = {p for p in graph.persons if _reaches(graph, p, loser)}
        root = graph.root_of(loser)
        root_keys = set(graph.identifiers_of(root))
        owned = {k for k, state in graph.identifiers.items() if state.person in subtree}

        split = graph.unmerge(merge.id, at=feed.now)

        # The loser leaves with its subtree and exactly the identifiers those persons own.
        assert (split.winner, split.loser) == (root, loser)
        assert set(split.loser_identifiers) == set(graph.identifiers_of(loser)) == owned
        assert set(graph.identifiers_of(root)) == root_keys - owned
        check_invariants(graph, feed.now, limits=False)
        separated.append((root, loser))

    # With every merge undone, each identifier is back with the person it first attached to, and that
    # person keeps within the limits again.
    assert all(p.merged_into is None for p in graph.persons.values())
    assert {key: graph.person_of(key) for key in graph.identifiers} == attached_to
    check_invariants(graph, feed.now)

    # Events may merge other persons again, never the two sides of an unmerge.
    for n, e in enumerate(stream):
        feed.apply(len(stream) + n, e)
        check_invariants(graph, feed.now)
    owned_by = {p: next(k for k, s in graph.identifiers.items() if s.person == p) for pair in separated for p in pair}
    for root, loser in separated:
        assert graph.person_of(owned_by[root]) != graph.person_of(owned_by[loser])


def _reaches(graph: IdentityGraph, person_id: str, target: str) -> bool:
    while person_id is not None:
        if person_id == target:
            return True
        person_id = graph.persons[person_id].merged_into
    return False


@settings(max_examples=150, deadline=None)
@given(stream=SHARED_DEVICE_STREAMS)
def test_with_default_rules_quarantined_identifiers_never_link_and_replays_agree(stream):
    feed = Feed({})  # device_id quarantined after 3 persons, anonymous_id after 5
    replay = Feed({})
    quarantined: set[str] = set()
    for n, e in enumerate(stream):
        identifiers = feed.identifiers(e)
        roots_before = {i.key: feed.graph.person_of(i.key) for i in identifiers if i.key in feed.graph.identifiers}
        usable_roots = {root for key, root in roots_before.items() if key not in quarantined}

        _, resolution = feed.apply(n, e)
        assert replay.apply(n, e)[1] == resolution  # same events, same ids

        if resolution is not None:
            # Only persons reached through an identifier that was not quarantined are merged.
            assert {m.loser for m in resolution.merges} <= usable_roots
            if resolution.merges:
                assert resolution.person in usable_roots
            if roots_before and not usable_roots and len(roots_before) == len(identifiers):
                first_quarantined = next(i.key for i in identifiers if i.key in quarantined)
                assert resolution.person == roots_before[first_quarantined]
            for key in resolution.quarantined:
                assert feed.rules.require_type(type_of(key)).quarantine_after is not None
        elif identifiers:
            pytest.fail(f"{identifiers} resolved to nobody")
        now_quarantined = set(feed.graph.quarantined())
        assert now_quarantined >= quarantined  # nothing releases it but an operator
        assert now_quarantined - quarantined == set(resolution.quarantined if resolution else ())
        quarantined = now_quarantined
        check_invariants(feed.graph, feed.now)
        assert feed.graph.partition() == replay.graph.partition()
