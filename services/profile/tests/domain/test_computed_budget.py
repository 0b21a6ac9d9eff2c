"""The record's bound (profile.py: COMPUTED_MAX_BYTES, RECORD_MAX_BYTES): however a customer defines
computed traits, a person's record as the store keeps it stays within RECORD_MAX_BYTES, and what it gives
up is the documented coarsening (`ComputedState.shrink`), never a refused write.

Each test builds a person through `Profile.apply` (and `merge`) and measures every write as the store would
(`records.encode_profile`, then the JSON the store checks against its 8 MiB)."""

from __future__ import annotations

import orjson

from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileEvent, Retention
from cdp_profile.domain.aggregates import ComputedState, stored_size
from cdp_profile.domain.profile import COMPUTED_MAX_BYTES, MAX_PART_IDENTIFIERS, RECORD_MAX_BYTES
from cdp_profile.records import encode_profile

T0 = 1_790_000_000.0
RETENTION = Retention(max_events=100)


def _stored(profile: Profile) -> int:
    """What the store checks against MAX_DOCUMENT_BYTES: the record's JSON."""
    return len(orjson.dumps(encode_profile(profile)))


def _computed_bytes(profile: Profile) -> int:
    states = [state for part in profile.parts.values() for state in part.computed.values()]
    states += [state for part in profile.parts.values() if part.base for state in part.base.computed.values()]
    return sum(state.stored_bytes() for state in states)


def test_all_time_distinct_values_of_many_traits_keep_the_record_within_the_limit():
    """16 all-time traits over a bot's random ids (10,000 distinct values each, held live and in the timeline
    base) took 11 MB. Within the bound the most frequent value and the 100 seen last are what they were;
    unique_count reads what it could keep (documented as "at least")."""
    defs = ComputedTraits(
        [ComputedTrait(f"u{i}", "unique_count", event_names=("Ping",), property="id") for i in range(6)]
        + [ComputedTrait(f"f{i}", "most_frequent", event_names=("Ping",), property="id") for i in range(5)]
        + [ComputedTrait(f"r{i}", "unique", event_names=("Ping",), property="id") for i in range(5)]
    )
    profile = Profile.new("p", retention=RETENTION)
    largest = 0
    ids = []
    for n in range(10_500):
        value = "hot" if n % 3 == 0 else f"{n:08d}-{n * 7919 % 100_003:08d}-random-id"
        ids.append(value)
        event = ProfileEvent(f"web:{n}", "track", "Ping", T0 + n, "web", properties={"id": value})
        profile.apply(event, defs, now=T0 + n)
        if n % 500 == 499:
            largest = max(largest, _stored(profile))
    assert largest <= RECORD_MAX_BYTES < MAX_DOCUMENT_BYTES, largest
    assert _computed_bytes(profile) <= COMPUTED_MAX_BYTES
    view = profile.view(now=T0 + 10_500)
    newest = []
    for value in reversed(ids):
        if value not in newest:
            newest.append(value)
        if len(newest) == 100:
            break
    for i in range(5):
        assert view.computed[f"f{i}"] == "hot"
        assert sorted(view.computed[f"r{i}"]) == sorted(newest)
    for i in range(6):
        assert 1_000 <= view.computed[f"u{i}"] <= len(set(ids))
    assert profile.take_trimmed().get("computed", 0) >= 1
    assert profile.take_trimmed() == {}, "taken once"


def test_values_full_of_quotes_are_measured_as_the_store_escapes_them():
    """The record keeps the profile's JSON as a string, in which a quote takes two bytes and an escaped
    one four: 2 MiB of histories made of quotes are 4 MiB stored, and event ids of quotes make windowed
    entries four times their length. Past RECORD_MAX_BYTES with both budgets kept, both are halved."""
    quoted = '"' * 16_000
    defs = ComputedTraits(
        [ComputedTrait(f"q{i}", "last", event_names=("Ping",), property="q", window="1d") for i in range(10)]
        + [ComputedTrait(f"c{i}", "count", event_names=("Ping",), window="1d") for i in range(20)]
    )
    profile = Profile.new("p", retention=RETENTION)
    largest, trimmed = 0, {}
    for n in range(1_200):
        at = T0 + n
        value = f"{n:05d}{quoted}"
        if n % 3 == 0:
            identify = ProfileEvent(f"web:i{n}", "identify", "", at, "web", traits={f"cart{n % 5}": value})
            profile.apply(identify, defs, now=at)
        ping = ProfileEvent(f"web:{n:05d}".ljust(100, '"'), "track", "Ping", at, "web", properties={"q": value})
        profile.apply(ping, defs, now=at)
        if n % 40 == 39:
            largest = max(largest, _stored(profile))
            for step, count in profile.take_trimmed().items():
                trimmed[step] = trimmed.get(step, 0) + count
    assert largest <= RECORD_MAX_BYTES, largest
    view = profile.view(now=T0 + 1_200)
    assert all(view.computed[f"q{i}"] == f"{1_199:05d}{quoted}" for i in range(10))
    assert all(view.computed[f"c{i}"] == 1_200 for i in range(20)), "nothing left the window: exact"
    assert view.traits["cart3"].value == f"{1_188:05d}{quoted}"  # the last identify of cart3
    assert trimmed.get("computed") and trimmed.get("history")


def test_a_merged_person_of_busy_parts_is_bounded_as_a_whole():
    """Each part holds its own states: four busy persons merged hold four times what one does."""
    defs = ComputedTraits(
        [ComputedTrait(f"c{i}", "count", event_names=("Ping",), window="30d") for i in range(20)]
        + [
            ComputedTrait(f"v{i}", "unique_count", event_names=("Ping",), property="page", window="30d")
            for i in range(5)
        ]
    )
    persons = []
    for who in range(4):
        profile = Profile.new(f"p{who}", retention=RETENTION)
        for n in range(1_100):
            at = T0 + n
            page = f"/p/{who}/{n:06d}/" + "x" * 40
            event = ProfileEvent(
                f"web:{who}:{n:06d}".ljust(100, "m"), "track", "Ping", at, "web", properties={"page": page}
            )
            profile.apply(event, defs, now=at)
        persons.append(profile)
    survivor = persons[0]
    for n, loser in enumerate(persons[1:]):
        survivor.merge(loser, merge_id=f"m{n}", at=T0 + 2_000, defs=defs, now=T0 + 2_000)
    assert len(survivor.parts) == 4
    assert _stored(survivor) <= RECORD_MAX_BYTES
    view = survivor.view(now=T0 + 2_000)
    assert all(view.computed[f"c{i}"] == 4 * 1_100 for i in range(20)), "nothing left the window: exact"
    assert all(0 < view.computed[f"v{i}"] <= 4 * 1_100 for i in range(5))


def test_a_coarsened_window_errs_only_by_leaving_contributions_out_early():
    """A windowed count shrunk to a few KB: exact until something leaves; then at most the window's."""
    trait = ComputedTrait("c", "count", event_names=("Ping",), window="1d")
    state = ComputedState.for_trait(trait)
    for n in range(900):
        state.add(T0 + n * 60, f"web:{n:06d}".ljust(60, "m"), 1, T0 + n * 60)
    before = state.stored_bytes()
    assert state.shrink(4_000)
    assert state.stored_bytes() <= 4_000 < before
    assert state.result() == 900
    for n in range(900, 2_000):  # keeps to its narrower bounds as it goes on
        state.add(T0 + n * 60, f"web:{n:06d}".ljust(60, "m"), 1, T0 + n * 60)
        state.prune(T0 + n * 60)
        in_window = sum(1 for m in range(n + 1) if T0 + m * 60 + 86400 > T0 + n * 60)
        assert state.result() <= in_window
    assert state.stored_bytes() <= 3 * 4_000
    assert stored_size(b'{"a":"\\\\"}') == len(b'{"a":"\\\\"}') + 4 + 2


def test_an_anonymous_id_per_call_does_not_grow_the_record_without_bound():
    """A server integration making an anonymous id of 256 characters per call, under one user id: every
    event's identifiers were kept: 30,000 of them took 8.25 MB (the store keeps 8 MiB). A part keeps the first
    MAX_PART_IDENTIFIERS, identity's own bound (it links no more to the person)."""
    defs = ComputedTraits([])
    profile = Profile.new("p", retention=RETENTION)
    for n in range(30_000):
        anonymous = f"anonymous_id:{n:06d}".ljust(269, "a")
        event = ProfileEvent(f"server:{n}", "track", "Ping", T0 + n, "server", identifiers=("user_id:u1", anonymous))
        profile.apply(event, defs, now=T0 + n)
    assert _stored(profile) < MAX_DOCUMENT_BYTES // 8
    assert "user_id:u1" in profile.identifiers()
    assert len(profile.identifiers()) == MAX_PART_IDENTIFIERS
    assert profile.view(now=T0 + 30_000).event_count == 30_000
