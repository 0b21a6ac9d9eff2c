"""A windowed computed trait stays bounded for a very busy person (aggregates: "Windowed traits ...").

Past MAX_WINDOW_ENTRIES contributions (or WINDOW_ENTRY_BYTES of them) in its window, a state coalesces its
oldest into buckets of window / WINDOW_BUCKETS: its answer is then over a set of contributions that holds
every one younger than window - width and none older than the window. The checks below hold a busy person's
state to that against the same code with coalescing switched off (`_exact`), which is what the state was
before: one entry per contribution.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_profile.domain import OPS, ComputedTrait, ComputedTraits, Profile, ProfileEvent, Retention, aggregates
from cdp_profile.domain.aggregates import (
    BUCKET,
    MAX_WINDOW_ENTRIES,
    WINDOW_BUCKET_BYTES,
    WINDOW_BUCKETS,
    WINDOW_ENTRY_BYTES,
    WINDOW_VALUE_BUCKET_BYTES,
    ComputedState,
    combined_result,
)

DAY = 86400.0
T0 = 1_700_000_000.0
WINDOW = 30 * DAY
WIDTH = WINDOW / WINDOW_BUCKETS
LOCATIONS = [
    {"country": "DE", "latitude": 52.52, "longitude": 13.405},
    {"country": "FR", "latitude": 48.8566, "longitude": 2.3522},
    {"country": "US", "latitude": 40.7128, "longitude": -74.006},
    {"country": "DE", "latitude": 52.52, "longitude": 13.405},
]


@contextlib.contextmanager
def _bounds(**values: Any) -> Iterator[None]:
    """Set the module's bounds for a block (hypothesis runs many examples in one test: no fixture)."""
    before = {name: getattr(aggregates, name) for name in values}
    for name, value in values.items():
        setattr(aggregates, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(aggregates, name, value)


def _exact() -> contextlib.AbstractContextManager[None]:
    """Coalescing off: one entry per contribution, as before the bound."""
    return _bounds(MAX_WINDOW_ENTRIES=10**9, WINDOW_ENTRY_BYTES=10**12)


def _every_op() -> ComputedTraits:
    traits = []
    for op in OPS:
        prop, extra = None, {}
        if op in ("sum", "avg", "min", "max"):
            prop = "v"
        elif op in ("first", "last", "most_frequent", "unique", "unique_count"):
            prop = "page"
        elif op == "max_speed":
            prop = "$context.location"
        elif op == "mismatch_count":
            prop, extra = "card", {"compare": "$context.location.country"}
        traits.append(ComputedTrait(f"{op}_30d", op, event_names=("Ping",), property=prop, window="30d", **extra))
    return ComputedTraits(traits)


def _ping(n: int, person: str = "p") -> ProfileEvent:
    return ProfileEvent(
        event_id=f"web:{n:08d}",
        type="track",
        name="Ping",
        at=T0 + n * 60.0,
        source="web",
        properties={"v": n % 97 - 20, "page": f"/p{n % 37}", "card": "DE" if n % 3 else "US"},
        identifiers=(f"user_id:{person}",),
        context={"location": LOCATIONS[n % 4]},
    )


def _built(numbers: range, defs: ComputedTraits, person: str = "p", *, whole: bool = False) -> Profile:
    """The profile of these pings; `whole`: its timeline keeps them all, so nothing is folded into a timeline
    base (a reference's live values are what they are with one: the base only serves rebuilds)."""
    profile = Profile.new(person, retention=Retention(max_events=len(numbers))) if whole else Profile.new(person)
    for n in numbers:
        event = _ping(n, person)
        profile.apply(event, defs, now=event.at)
    return profile


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return type(a) is type(b) and a == b


def test_a_busy_person_with_a_windowed_trait_stays_within_what_the_store_keeps():
    """A windowed trait kept one entry per contribution inside its window (44 bytes for sum over 30d),
    whatever the timeline's 1,000-event cap: 200,000 events in a month for one user id (a backend sending
    every server event as userId "system") made a 9.8 MB record (the state and the timeline base's, 4.9 MB
    each), past the store's 8 MiB: every later event of the person failed its partition's batch. Now 55 KB,
    and the sum is still exact (nothing has left the window)."""
    trait = {"name": "pings_30d", "op": "sum", "event_names": ["Ping"], "property": "v", "window": "30d"}
    defs = ComputedTraits([ComputedTrait.from_dict(trait)])
    profile = Profile.new("p")
    for n in range(200_000):
        at = 1000.0 + n * 10
        event = ProfileEvent(event_id=f"e{n:07d}", type="track", name="Ping", at=at, source="web", properties={"v": 1})
        profile.apply(event, defs, now=at)
    assert len(profile.to_json()) < MAX_DOCUMENT_BYTES // 64
    assert profile.view(now=at).computed == {"pings_30d": 200_000.0}


def test_long_values_in_a_window_are_bounded_by_their_bytes_not_only_by_their_number():
    """300 searches of 30 KB in a day made a 9.25 MB record through a windowed unique_count's entries (its
    summary had long refused values past 256K characters): 300 entries are few, their values are not. Now
    0.54 MB, and the same answer: at least 8 distinct queries, as many as the summary holds."""
    defs = ComputedTraits(
        [ComputedTrait("searches_1d", "unique_count", event_names=("Searched",), property="query", window="1d")]
    )
    profile = Profile.new("p")
    for n in range(300):
        at = T0 + n * 60.0
        query = f"{n:05d}" + "x" * 30_000
        event = ProfileEvent(
            event_id=f"web:{n}", type="track", name="Searched", at=at, source="web", properties={"query": query}
        )
        profile.apply(event, defs, now=at)
    assert len(profile.to_json()) < MAX_DOCUMENT_BYTES // 8
    assert profile.view(now=at).computed == {"searches_1d": 8}


def test_every_windowed_op_of_a_busy_person_is_bounded_and_exact_while_nothing_left_its_window():
    """12 windowed traits (every op) over 30,000 events in 21 days: each state within its bound, the record
    within a quarter of the store's limit (1.5 MB; before: 25.6 MB), and every value what one entry per contribution
    gives, since buckets are mergeable summaries. Once contributions age out, a count is between what the
    window gives and what a window one bucket's width shorter gives."""
    defs = _every_op()
    events = range(30_000)
    profile = _built(events, defs)
    with _exact():
        exact = _built(events, defs, whole=True)  # its 29,000 entries past the timeline's cap not folded again
    now = T0 + 30_000 * 60.0
    assert len(profile.to_json()) < MAX_DOCUMENT_BYTES // 4
    for part in (profile.parts["p"].computed, profile.parts["p"].base.computed):
        for name, state in part.items():
            budget = WINDOW_VALUE_BUCKET_BYTES if state.op in aggregates._VALUE_OPS else WINDOW_BUCKET_BYTES
            entries = len(orjson.dumps(state.to_doc()["entries"]))
            assert entries < WINDOW_ENTRY_BYTES + budget, name
            assert sum(1 for entry in state.entries if entry[1] != BUCKET) <= MAX_WINDOW_ENTRIES, name
            assert any(entry[1] == BUCKET for entry in state.entries), name
    bounded, reference = profile.view(now=now).computed, exact.view(now=now).computed
    assert bounded.keys() == reference.keys() == {trait.name for trait in defs}
    for name, value in reference.items():
        assert _close(bounded[name], value), (name, bounded[name], value)
    # 12 days on, 9 days of pings have left the window.
    later = now + 12 * DAY
    count = profile.view(now=later).computed["count_30d"]
    assert exact.view(now=later + WIDTH).computed["count_30d"] <= count <= exact.view(now=later).computed["count_30d"]
    profile.expire(defs, now=later)
    assert profile.view(now=later).computed["count_30d"] == count


def test_a_merge_of_busy_persons_with_events_on_both_equals_the_union():
    """Events both persons got before the merge count once: the loser's copy is taken out, of its bucket
    when it was coalesced (counts, sums and value counts exactly; a min, first or latest time the bucket
    keeps is also the winner's)."""
    defs = _every_op()
    loser = _built(range(0, 2_504), defs, "b")  # its last coalescing left 2,004-2,503 exact
    winner = _built(range(1_600, 2_600), defs, "a")  # 1,600-2,503 are on both sides
    coalesced = loser.parts["b"].computed["count_30d"].entries
    assert coalesced[0][1] == BUCKET and min(e[0] for e in coalesced if e[1] != BUCKET) == _ping(2_004).at
    now = T0 + 2_600 * 60.0
    winner.merge(loser, merge_id="m1", at=now, defs=defs, now=now)
    union = _built(range(2_600), defs, "a", whole=True)
    merged, reference = winner.view(now=now).computed, union.view(now=now).computed
    for name, value in reference.items():
        assert _close(merged[name], value), (name, merged[name], value)
    assert merged["count_30d"] == 2_600


def test_a_contribution_taken_out_of_its_bucket_leaves_the_sum_and_one_never_in_it_changes_nothing():
    state = ComputedState("sum", WINDOW, "sig")
    for n in range(MAX_WINDOW_ENTRIES + 1):
        state.add(T0 + n, f"web:{n}", 2, T0 + n)
    assert state.entries[0][:2] == (T0, BUCKET) and state.result() == 2.0 * (MAX_WINDOW_ENTRIES + 1)
    state.remove("web:3", T0 + 3, 2)  # coalesced: out of its bucket
    state.remove(f"web:{MAX_WINDOW_ENTRIES}", T0 + MAX_WINDOW_ENTRIES, 2)  # exact, as before
    state.remove("web:never", T0 - 1, 2)  # older than its cell's bucket: it aged out before it came
    assert state.result() == 2.0 * (MAX_WINDOW_ENTRIES - 1)
    coalesced = MAX_WINDOW_ENTRIES + 1 - MAX_WINDOW_ENTRIES // 2  # 0..500, one cell: the newest 500 stay
    assert state.entries[0][2][1] == [coalesced - 1, 2 * (coalesced - 1)]  # [count, total], without web:3
    stored = orjson.dumps(state.encoded())
    assert stored == orjson.dumps(state.to_doc())
    again = ComputedState.from_doc(orjson.loads(stored))
    again._rebuild()  # from its bucket and entries
    assert again.result() == state.result()
    state.prune(T0 + WINDOW)  # the bucket leaves with its oldest contribution, its total subtracted
    assert state.result() == 2.0 * (MAX_WINDOW_ENTRIES - 1 - (coalesced - 1))


ADDS = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 9), st.integers(0, 3)),  # (time step, value, what next)
    min_size=10,
    max_size=120,
)


@settings(max_examples=200, deadline=None)
# Found by this test: both contributions of a value taken out of one bucket, the first its recorded latest;
# the second was kept for ever as "forgotten and seen again" (UniqueAgg.take_out).
@example(steps=[(0, 1, 0), *[(0, 0, 0)] * 7, (0, 2, 1), (0, 0, 1)], op="unique", tight=False)
@given(
    steps=ADDS,
    op=st.sampled_from(["count", "sum", "min", "max", "unique_count", "most_frequent", "first", "unique"]),
    tight=st.booleans(),
)
def test_a_coalesced_window_holds_every_contribution_younger_than_a_bucket_less_and_none_older(steps, op, tight):
    """Random contributions (late ones too), prunes and take-outs against the model: the answer is one of a
    set between L (every contribution younger than window - width) and U (every one inside the window),
    for monotone ops checked as L's answer <= it <= U's; the summary is what its buckets and entries give
    (what `prune` subtracts is what `_rebuild` would leave out); the stored form is `to_doc()`'s and reads
    back the same; coalescing never moves the state's expiry earlier; two parts combine within the same
    bounds. `tight`: bucket bytes so few that cells widen and the oldest leave early (no L then)."""
    window, width = 800.0, 100.0
    tight_bounds = {"WINDOW_BUCKET_BYTES": 120, "WINDOW_VALUE_BUCKET_BYTES": 240, "COARSEST_BUCKETS": 2}
    with _bounds(MAX_WINDOW_ENTRIES=4, WINDOW_BUCKETS=8, **(tight_bounds if tight else {})):
        parts = [ComputedState(op, window, "sig"), ComputedState(op, window, "sig")]
        live: dict[str, tuple[float, int, int]] = {}  # added, not taken out: (at, value, part)
        gone: dict[str, tuple[float, int, int]] = {}  # taken out (a bucket's min or first may keep them)
        now = 0.0
        for index, (step, value, what) in enumerate(steps):
            event_id = f"web:{index:04d}"
            at = now + step - 300.0 if what == 3 else now + step  # some late
            now = max(now, at)
            part = parts[index % 2]
            due = part.expires_at()
            part.add(at, event_id, value, now)
            if at + window > now:
                live[event_id] = (at, value, index % 2)
                assert (part.expires_at() or math.inf) >= min(due or math.inf, at + window)
            if what == 1 and live:  # a merge finds one on both sides
                taken = sorted(live)[value % len(live)]
                at_taken, value_taken, side = live.pop(taken)
                parts[side].remove(taken, at_taken, value_taken)
                gone[taken] = (at_taken, value_taken, side)
            if what == 2:
                now += step
                for state in parts:
                    state.prune(now)
            for state in parts:
                assert orjson.dumps(state.encoded()) == orjson.dumps(state.to_doc())
                again = ComputedState.from_doc(orjson.loads(orjson.dumps(state.encoded())))
                assert _close(again.result(), state.result())
                again._rebuild()  # what its buckets and entries give: the summary kept in step with them
                assert _close(again.result(), state.result())
            for sides, result in (
                ({0}, parts[0].summary(now).result(op)),
                ({1}, parts[1].summary(now).result(op)),
                ({0, 1}, _combined(parts, now, op)),
            ):
                young = [c for c in live.values() if c[2] in sides and c[0] + window - width > now and not tight]
                kept = live.values() if op not in ("min", "max", "first") else (*live.values(), *gone.values())
                inside = [c for c in kept if c[2] in sides and c[0] + window > now]
                _within(op, result, young, inside)


def _combined(parts: list[ComputedState], now: float, op: str) -> Any:
    return combined_result(op, [state.summary(now) for state in parts])


def _within(op: str, result: Any, young: list[tuple[float, int, int]], inside: list[tuple[float, int, int]]) -> None:
    values_young, values_inside = [c[1] for c in young], [c[1] for c in inside]
    if op == "count":
        assert len(young) <= result <= len(inside)
    elif op == "sum":
        assert sum(values_young) <= result <= sum(values_inside)
    elif op == "min":
        assert result is None or min(values_inside) <= result <= min(values_young, default=math.inf)
    elif op == "max":
        assert result is None or max(values_young, default=-math.inf) <= result <= max(values_inside)
    elif op == "unique_count":
        assert len(set(values_young)) <= result <= len(set(values_inside))
    elif op == "unique":
        assert set(values_young) <= set(result) <= set(values_inside)  # fewer than 100 values here
    else:  # most_frequent, first: one of the values inside
        assert result is None or result in values_inside
