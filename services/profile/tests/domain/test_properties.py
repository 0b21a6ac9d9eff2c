"""Random event sets against Profile: a merged profile equals one built from the union, a split gives back
both originals, order and repetition do not matter, and expiring equals building fresh later.

Every computed operation is defined with and without a window, some with filters (plain values and
operator objects), over values of mixed JSON types (numbers, numeric strings, booleans, nulls) so the
skipping rules are exercised too. Event times fall on a grid, so ties on time (decided by event id) are
common. Events carry a context (device, location, time zone, ip), user and anonymous ids, so the
pseudo-paths ($context, $hour, $at, $user_id, $anonymous_id), max_speed and mismatch_count go through
the same properties; a backfill from the (stored) timeline must give what live application gave.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_profile.domain import (
    OPS,
    ComputedTrait,
    ComputedTraits,
    Profile,
    ProfileEvent,
    Retention,
    TimelineEntry,
)

DAY = 86400.0
NOW = 40 * DAY
BIG = Retention(max_events=1000)

TRACK_NAMES = ["Order Completed", "Product Viewed", "Signed Up"]
PAGE_NAMES = ["Home", "Pricing"]
CATEGORIES = ["shoes", "bags", "hats", 3, 3.0, True, None, ["x"]]
TOTALS = st.one_of(
    st.integers(-5, 100),
    st.floats(-10, 100, allow_nan=False).map(lambda f: round(f, 2)),
    st.sampled_from(["12", True, None]),
)
PLANS = ["free", "pro", "team", None]
LOCATIONS = [
    {"city": "Berlin", "country": "DE", "latitude": 52.52, "longitude": 13.405},
    {"city": "New York", "country": "US", "latitude": 40.7128, "longitude": -74.006},
    {"city": "Paris", "country": "fr", "latitude": 48.8566, "longitude": 2.3522},
    {"country": " de "},  # no coordinates
    {"latitude": 52.52, "longitude": 13.405},  # Berlin again, no country
    {"city": "Tokyo", "country": "JP", "latitude": 35.6762, "longitude": 139.6503},
]
CARD_COUNTRIES = ["DE", "us", "FR", " ", None, 49]
# Most events are located, so that windows hold enough points for max_speed's pairs to change as they age.
CONTEXTS = st.fixed_dictionaries(
    {"location": st.sampled_from(LOCATIONS)},
    optional={
        "device": st.sampled_from([{"id": "d1"}, {"id": "d2", "model": "Pixel"}, {"id": "d3"}]),
        "timezone": st.sampled_from(["Europe/Berlin", "America/New_York", "Not/AZone"]),
        "ip": st.sampled_from(["203.0.113.1", "198.51.100.2"]),
        "userAgent": st.just("Mozilla/5.0"),
    },
)


def _definitions() -> ComputedTraits:
    traits = []
    for op in OPS:
        prop = None if op == "count" else ("category" if op in ("most_frequent", "unique", "unique_count") else "total")
        extra: dict[str, Any] = {}
        if op == "max_speed":
            prop, extra = "$context.location", {"event_type": "any"}
        elif op == "mismatch_count":
            prop, extra = "card_country", {"compare": "$context.location.country"}
        traits.append(ComputedTrait(f"{op}_all", op, property=prop, **extra))
        traits.append(ComputedTrait(f"{op}_10d", op, property=prop, window="10d", **extra))
    traits += [
        ComputedTrait("orders", "count", event_names=("Order Completed",)),
        ComputedTrait("orders_7d", "count", event_names=("Order Completed",), window="7d"),
        ComputedTrait(
            "bag_shoe_revenue",
            "sum",
            event_names=("Order Completed",),
            property="total",
            where={"category": ["shoes", "bags"]},
        ),
        ComputedTrait("last_order_total_20d", "last", event_names=("Order Completed",), property="total", window="20d"),
        ComputedTrait("pages_any", "count", event_type="page"),
        ComputedTrait("pages_pricing_5d", "count", event_type="page", event_names=("Pricing",), window="5d"),
        ComputedTrait("favourite_plan", "most_frequent", event_type="identify", property="plan"),
        ComputedTrait("categories_everywhere", "unique_count", event_type="any", property="category"),
        ComputedTrait("with_category", "count", property="category", window="15d"),
        ComputedTrait("cheap_avg", "avg", property="total", where={"cheap": True}),
        ComputedTrait("devices_10d", "unique_count", event_type="any", property="$context.device.id", window="10d"),
        ComputedTrait("send_hour", "most_frequent", event_type="any", property="$hour"),
        ComputedTrait("last_order_at", "max", event_names=("Order Completed",), property="$at"),
        ComputedTrait("accounts_10d", "unique_count", event_type="any", property="$user_id", window="10d"),
        ComputedTrait("anonymous_ids", "unique", event_type="any", property="$anonymous_id"),
        ComputedTrait("german_orders", "count", where={"$context.location.country": ["DE", " de "]}),
        ComputedTrait(
            "mid_totals_10d",
            "sum",
            event_names=("Order Completed",),
            property="total",
            where={"total": {"$gt": 5, "$lte": 60}},
            window="10d",
        ),
        ComputedTrait(
            "morning_not_hats",
            "count",
            event_type="any",
            where={"category": {"$exists": True, "$ne": "hats"}, "$hour": {"$lt": 12}},
        ),
        ComputedTrait(
            "ips_in_berlin_time",
            "unique",
            event_type="any",
            property="$context.ip",
            where={"$context.timezone": "Europe/Berlin"},
        ),
    ]
    return ComputedTraits(traits)


DEFS = _definitions()


# The strategies `events` draws from, built once: a strategy built inside a composite is built (and
# validated) again on every draw, which cost most of this module's time; the values drawn are the same.
KINDS = st.sampled_from(["track", "track", "track", "identify", "page", "group", "alias"])
# Whole days anywhere (ties on time are common), or quarter days in the last 16 days, where the
# windows are: contributions enter, age out and tie there.
TIMES = st.one_of(st.integers(0, 40).map(lambda d: d * DAY), st.integers(96, 160).map(lambda q: q * DAY / 4))
CONSENTS = st.dictionaries(st.sampled_from(["purpose:Marketing", "channel:email"]), st.booleans(), max_size=2)
SOURCES = st.sampled_from(["web", "ios", "salesforce"])
NAMES = {"track": st.sampled_from(TRACK_NAMES), "page": st.sampled_from(PAGE_NAMES)}
PROPERTIES = st.fixed_dictionaries({}, optional={"category": st.sampled_from(CATEGORIES), "cheap": st.booleans()})
HAS_TOTAL = st.integers(0, 4)
BOOLEANS = st.booleans()
CARD_COUNTRY = st.sampled_from(CARD_COUNTRIES)
IDENTIFY_TRAITS = st.fixed_dictionaries(
    {},
    optional={
        "plan": st.sampled_from(PLANS),
        "email": st.sampled_from(["a@x.io", "b@x.io"]),
        "address": st.fixed_dictionaries({"city": st.sampled_from(["Oslo", "Lima"])}),
        "category": st.sampled_from(CATEGORIES),
    },
)
GROUP_IDS = st.sampled_from(["g1", "g2"])
GROUP_TRAITS = st.fixed_dictionaries({}, optional={"plan": st.sampled_from(PLANS)})
EVENT_CONTEXTS = st.one_of(CONTEXTS, CONTEXTS, CONTEXTS, st.just({}))
USER_IDS = st.sampled_from(["", "u1", "u2"])
ANONYMOUS_IDS = st.sampled_from(["", "a1"])
_COUNTS: dict[int, st.SearchStrategy[int]] = {}
_IDENTIFIERS: dict[tuple[str, ...], st.SearchStrategy[list[str]]] = {}


@st.composite
def events(draw: Any, prefix: str, pool: list[str], size: int = 10) -> list[ProfileEvent]:
    count = _COUNTS.setdefault(size, st.integers(0, size))
    identifiers_of = _IDENTIFIERS.setdefault(
        tuple(pool), st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True)
    )
    out = []
    for i in range(draw(count)):
        kind = draw(KINDS)
        at = draw(TIMES)
        identifiers = tuple(draw(identifiers_of))
        consent = draw(CONSENTS)
        source = draw(SOURCES)
        name, properties, traits, group_id = "", {}, {}, ""
        if kind in ("track", "page"):
            name = draw(NAMES[kind])
            properties = draw(PROPERTIES)
            if draw(HAS_TOTAL):
                properties["total"] = draw(TOTALS)
            if draw(BOOLEANS):
                properties["card_country"] = draw(CARD_COUNTRY)
        elif kind == "identify":
            traits = draw(IDENTIFY_TRAITS)
        elif kind == "group":
            group_id = draw(GROUP_IDS)
            traits = draw(GROUP_TRAITS)
        out.append(
            ProfileEvent(
                event_id=f"{prefix}{i:03d}",
                type=kind,
                name=name,
                at=at,
                source=source,
                properties=properties,
                traits=traits,
                consent=consent,
                identifiers=identifiers,
                group_id=group_id,
                context=draw(EVENT_CONTEXTS),
                user_id=draw(USER_IDS),
                anonymous_id=draw(ANONYMOUS_IDS),
            )
        )
    return out


A_POOL = ["user_id:a", "email:a@x.io", "anonymous_id:a1"]
B_POOL = ["user_id:b", "anonymous_id:b1", "anonymous_id:b2"]
NEW_POOL = ["anonymous_id:n1", "device_id:n2"]


def build(person: str, items: list[ProfileEvent], *, now: float = NOW, retention: Retention = BIG) -> Profile:
    profile = Profile.new(person, retention=retention)
    for event in items:
        profile.apply(event, DEFS, now=now)
    return profile


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _close(a: Any, b: Any) -> bool:
    """Equal, with a tolerance for floats: sums depend on the order values were added in."""
    if _number(a) and _number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def assert_same_view(a: Profile, b: Profile, *, now: float = NOW, recorded_at: bool = True) -> None:
    va, vb = a.view(now=now), b.view(now=now)
    if recorded_at:
        assert va.traits == vb.traits
        assert va.groups == vb.groups
    else:
        strip = lambda versions: {k: (v.value, v.source, v.event_id, v.at) for k, v in versions.items()}  # noqa: E731
        assert strip(va.traits) == strip(vb.traits)
        assert strip(va.groups) == strip(vb.groups)
    assert va.consent == vb.consent
    assert {k: c.history for k, c in va.consent.items()} == {k: c.history for k, c in vb.consent.items()}
    assert va.scores == vb.scores
    assert va.identifiers == vb.identifiers
    assert (va.first_seen, va.last_seen, va.event_count) == (vb.first_seen, vb.last_seen, vb.event_count)
    assert va.computed.keys() == vb.computed.keys()
    for name in va.computed:
        assert _close(va.computed[name], vb.computed[name]), (name, va.computed[name], vb.computed[name])
    assert timeline(a) == timeline(b)
    for name in va.traits:
        histories = [[(v.value, v.source, v.event_id, v.at) for v in p.trait_history(name)] for p in (a, b)]
        assert histories[0] == histories[1]


def timeline(profile: Profile) -> list[tuple]:
    return [
        (e.at, e.event_id, e.type, e.name, e.properties, e.source, e.context, e.user_id, e.anonymous_id)
        for e in profile.timeline()
    ]


def shuffled(data: Any, items: list[ProfileEvent]) -> list[ProfileEvent]:
    return data.draw(st.permutations(items))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_merged_profile_equals_the_profile_of_the_union(data):
    a_events = data.draw(events("a", A_POOL))
    b_events = data.draw(events("b", B_POOL))
    retention = data.draw(
        st.sampled_from([BIG, Retention(max_events=4), Retention(max_events=1000, max_age_seconds=20 * DAY)])
    )
    winner = build("a", shuffled(data, a_events), retention=retention)
    loser = build("b", shuffled(data, b_events), retention=retention)
    before = winner.view(now=NOW)
    old = {e.event_id for e in winner.timeline()}  # the winner's own timeline before the merge
    change = winner.merge(loser, merge_id="m1", at=NOW, defs=DEFS, now=NOW)

    union = build("a", shuffled(data, a_events + b_events), retention=retention)
    assert_same_view(winner, union)
    after = winner.view(now=NOW)
    assert after.merged_from == ["b"]
    assert change.merged == ["b"]
    assert_change_is_faithful(before, after, change)
    # The change's timeline delta turns the old timeline into the new one.
    new = (old | {e.event_id for e in change.timeline_added}) - {e.event_id for e in change.timeline_removed}
    assert new == {e.event_id for e in winner.timeline()}
    # Merging again is a no-op.
    assert not winner.merge(Profile.new("b"), merge_id="m1", at=NOW, defs=DEFS, now=NOW)


def assert_change_is_faithful(before: Any, after: Any, change: Any) -> None:
    """Every value that differs between the views is in the change, with its new value, and nothing else."""
    for section in ("traits", "groups", "consent", "scores"):
        old, new = getattr(before, section), getattr(after, section)
        read = (lambda c: c.granted) if section == "consent" else (lambda v: v.value)
        for key in old.keys() | new.keys():
            a = read(old[key]) if key in old else None
            b = read(new[key]) if key in new else None
            differs = type(a) is not type(b) or a != b
            assert differs == (key in getattr(change, section)), (section, key, a, b)
            if differs:
                assert getattr(change, section)[key] == b
    for name in before.computed.keys() | after.computed.keys():
        if name not in after.computed:
            assert change.computed.get(name, "absent") is None
        elif name not in before.computed:
            assert _close(change.computed[name], after.computed[name])
        elif not _close(before.computed[name], after.computed[name]):
            assert _close(change.computed[name], after.computed[name]), name


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_split_after_merge_gives_back_both_profiles_with_later_events_attributed_by_identifier(data):
    a_events = data.draw(events("a", A_POOL))
    b_events = data.draw(events("b", B_POOL))
    later = data.draw(events("z", A_POOL + B_POOL + NEW_POOL, size=8))
    winner = build("a", a_events)
    winner.merge(build("b", b_events), merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    for event in later:
        winner.apply(event, DEFS, now=NOW)

    # The attribution rule, written plainly: the first identifier some part has seen decides; else the root.
    owners = dict.fromkeys((i for e in a_events for i in e.identifiers), "a")
    for key in (i for e in b_events for i in e.identifiers):
        owners.setdefault(key, "b")
    expected = {"a": list(a_events), "b": list(b_events)}
    for event in later:
        owner = next((owners[i] for i in event.identifiers if i in owners), "a")
        expected[owner].append(event)
        for key in event.identifiers:
            owners.setdefault(key, owner)

    before = winner.view(now=NOW)
    restored, mine, theirs = winner.split("b", merge_id="m1", defs=DEFS, now=NOW)
    assert restored.person_id == "b"
    assert_same_view(winner, build("a", expected["a"]))
    assert_same_view(restored, build("b", expected["b"]))
    assert winner.view(now=NOW).merged_from == []
    assert mine.split == ["b"] and theirs.split_from == "a"
    assert_change_is_faithful(before, winner.view(now=NOW), mine)
    assert {e.event_id for e in theirs.timeline_added} == {e.event_id for e in restored.timeline()}
    assert {e.event_id for e in mine.timeline_removed} == {e.event_id for e in restored.timeline()}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_nested_merges_split_the_whole_subtree(data):
    """c into b, b into a, then d into a: splitting b takes c along and leaves d with a."""
    sets = {p: data.draw(events(p, [f"user_id:{p}", f"anonymous_id:{p}"], size=6)) for p in "abcd"}
    b = build("b", sets["b"])
    b.merge(build("c", sets["c"]), merge_id="m-bc", at=NOW, defs=DEFS, now=NOW)
    a = build("a", sets["a"])
    a.merge(b, merge_id="m-ab", at=NOW, defs=DEFS, now=NOW)
    a.merge(build("d", sets["d"]), merge_id="m-ad", at=NOW, defs=DEFS, now=NOW)
    assert_same_view(a, build("a", data.draw(st.permutations([e for p in "abcd" for e in sets[p]]))))

    restored, _, _ = a.split("b", merge_id="m-ab", defs=DEFS, now=NOW)
    assert restored.view(now=NOW).merged_from == ["c"]
    assert a.view(now=NOW).merged_from == ["d"]
    assert_same_view(restored, build("b", sets["b"] + sets["c"]))
    assert_same_view(a, build("a", sets["a"] + sets["d"]))
    # And the inner merge can still be undone on the restored profile.
    inner, _, _ = restored.split("c", merge_id="m-bc", defs=DEFS, now=NOW)
    assert_same_view(inner, build("c", sets["c"]))
    assert_same_view(restored, build("b", sets["b"]))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_order_of_arrival_does_not_matter(data):
    items = data.draw(events("e", A_POOL, size=16))
    retention = data.draw(st.sampled_from([BIG, Retention(max_events=5), Retention(max_age_seconds=15 * DAY)]))
    one = build("p", items, retention=retention)
    other = build("p", shuffled(data, items), retention=retention)
    assert_same_view(one, other)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_applying_an_event_again_changes_nothing(data):
    items = data.draw(events("e", A_POOL, size=12))
    profile = build("p", items)
    doc = json.dumps(profile.to_doc(), sort_keys=True)
    for event in data.draw(st.lists(st.sampled_from(items), max_size=6)) if items else []:
        assert not profile.apply(event, DEFS, now=NOW)
    assert json.dumps(profile.to_doc(), sort_keys=True) == doc


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_expiring_later_equals_building_fresh_later(data):
    items = data.draw(events("e", A_POOL, size=14))
    retention = data.draw(st.sampled_from([BIG, Retention(max_events=6, max_age_seconds=25 * DAY)]))
    earlier = NOW - data.draw(st.integers(0, 20)) * DAY / 2
    later = NOW + data.draw(st.integers(0, 30)) * DAY / 2
    profile = build("p", items, now=earlier, retention=retention)
    pure = profile.view(now=later)  # a view evaluates windows at `now` without changing anything
    before = profile.view(now=earlier)
    steps = [*sorted(data.draw(st.lists(st.floats(earlier, later), max_size=3))), later]
    changes = [profile.expire(DEFS, now=step) for step in steps]
    fresh = build("p", items, now=later, retention=retention)
    assert_same_view(profile, fresh, now=later, recorded_at=False)
    assert pure.computed.keys() == profile.view(now=later).computed.keys()
    assert all(_close(pure.computed[k], v) for k, v in profile.view(now=later).computed.items())
    folded = changes[0]
    for change in changes[1:]:
        folded.combine(change)
    assert_change_is_faithful(before, profile.view(now=later), folded)
    due = profile.next_expiry()
    assert due is None or due > later
    if due is not None:
        # Nothing can change before `due`; at `due` a contribution leaves.
        quiet = profile.view(now=(later + due) / 2).computed
        assert all(_close(quiet[k], v) for k, v in profile.view(now=later).computed.items())
        profile.expire(DEFS, now=due)
        assert profile.next_expiry() is None or profile.next_expiry() > due


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_persistence_round_trips_exactly(data):
    a_events = data.draw(events("a", A_POOL))
    b_events = data.draw(events("b", B_POOL))
    profile = build("a", a_events, retention=Retention(max_events=6))
    if data.draw(st.booleans()):
        profile.merge(build("b", b_events), merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    profile.update_traits({"plan": "vip", "nested": {"k": [1, 2.5]}}, source="api", at=NOW, event_id="w1", now=NOW)
    profile.set_consent({"channel:sms": False}, source="salesforce", at=5.0, event_id="w2")
    profile.set_scores({"churn": 0.25}, model="churn", version="3", at=NOW)

    doc = json.loads(json.dumps(profile.to_doc()))
    entries = [TimelineEntry.from_doc(json.loads(json.dumps(e.to_doc()))) for e in profile.timeline()]
    loaded = Profile.from_doc(doc, data.draw(st.permutations(entries)), retention=Retention(max_events=6))
    assert loaded.to_doc() == profile.to_doc()
    assert loaded.view(now=NOW) == profile.view(now=NOW)
    assert loaded.timeline() == profile.timeline()
    assert loaded.export(now=NOW) == profile.export(now=NOW)
    # And both go on the same way.
    for event in data.draw(events("z", A_POOL + B_POOL, size=4)):
        assert loaded.apply(event, DEFS, now=NOW) == profile.apply(event, DEFS, now=NOW)
    assert loaded.to_doc() == profile.to_doc()


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_backfilling_from_the_stored_timeline_gives_what_live_application_gave(data):
    """Every definition, pseudo-paths included, recomputed from the timeline entries as the store returns
    them (JSON) equals the values the events gave live; so do merges that replay entries."""
    items = data.draw(events("e", A_POOL, size=14))
    live = build("p", items)
    entries = [TimelineEntry.from_doc(json.loads(json.dumps(e.to_doc()))) for e in live.timeline()]
    loaded = Profile.from_doc(json.loads(json.dumps(live.to_doc())), entries, retention=BIG)
    for trait in DEFS:
        loaded.backfill(trait, now=NOW)
    assert_same_view(loaded, live)
    # Nothing but what pseudo-paths read is kept of the context.
    for entry in loaded.timeline():
        assert "userAgent" not in entry.context
        assert "model" not in entry.context.get("device", {})
