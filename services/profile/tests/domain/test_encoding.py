"""The stored form of a profile (`to_json`) reuses each computed state's encoding until the state changes:
what is written is always exactly the profile now, and a write re-encodes only the states that changed
(a score change none of them)."""

from __future__ import annotations

import orjson

from cdp_profile.domain import Profile, Retention, aggregates
from cdp_profile.domain.aggregates import ComputedState
from cdp_profile.records import decode_profile, encode_profile, encode_scores, overlay_scores

DAY = 86400.0
HOUR = 3600.0
NOW = 100 * DAY

DEFS = [
    {"name": "orders_24h", "op": "count", "event_names": ["Order Completed"], "window": "24h"},
    {"name": "revenue", "op": "sum", "event_names": ["Order Completed"], "property": "total"},
    {"name": "top_page", "op": "most_frequent", "event_type": "page", "property": "section"},
    {"name": "max_total_2d", "op": "max", "event_names": ["Order Completed"], "property": "total", "window": "2d"},
    {"name": "pages", "op": "unique", "event_type": "page", "property": "section"},
]


def _fresh(profile: Profile) -> dict:
    return orjson.loads(orjson.dumps(profile.to_doc()))


def _counted_encodings(monkeypatch) -> list[str]:
    """From now on, the op of every computed state encoded (in order): which states a write made again."""
    encoded: list[str] = []
    encode = ComputedState._encode

    def counting(state: ComputedState) -> bytes:
        encoded.append(state.op)
        return encode(state)

    monkeypatch.setattr(ComputedState, "_encode", counting)
    return encoded


def test_the_stored_form_follows_every_change_of_the_computed_states(ev, defs_of, profile_of):
    defs = defs_of(*DEFS)
    ann = profile_of(
        [
            ev("o1", "track", "Order Completed", NOW - 30 * HOUR, properties={"total": 10}),
            ev("v1", "page", "Home", NOW - 20 * HOUR, properties={"section": "shoes"}),
        ],
        defs,
        now=NOW - 20 * HOUR,
        person="ann",
    )
    steps = [
        lambda now: ann.apply(ev("o2", "track", "Order Completed", now, properties={"total": 5}), defs, now=now),
        lambda now: ann.set_scores({"churn": 0.3}, model="m", version="1", at=now),
        lambda now: ann.expire(defs, now=now),  # the first order leaves the 24 h window
        lambda now: ann.apply(ev("v2", "page", "Home", now, properties={"section": "bags"}), defs, now=now),
        lambda now: ann.expire(defs, now=now + 3 * DAY),  # every window empties
        lambda now: ann.backfill(defs.get("pages"), now=now + 3 * DAY),
        lambda now: ann.drop_computed("revenue"),
    ]
    bob = profile_of(
        [ev("o9", "track", "Order Completed", NOW - HOUR, properties={"total": 99})], defs, now=NOW, person="bob"
    )
    for index, step in enumerate(steps):
        step(NOW - 10 * HOUR + index * HOUR)
        assert orjson.loads(ann.to_json()) == _fresh(ann), f"step {index}"
    ann.merge(bob, merge_id="m1", at=NOW, defs=defs, now=NOW)
    assert orjson.loads(ann.to_json()) == _fresh(ann)
    ann.split("bob", merge_id="m1", defs=defs, now=NOW + HOUR)
    assert orjson.loads(ann.to_json()) == _fresh(ann)
    # and it loads back as the same profile
    loaded = decode_profile(encode_profile(ann), ann.timeline(), ann.retention)
    assert loaded.to_doc() == ann.to_doc()


def test_a_score_change_reencodes_no_computed_state_and_an_event_only_those_it_fed(
    ev, defs_of, profile_of, monkeypatch
):
    defs = defs_of(*DEFS)
    profile = profile_of(
        [
            ev("o1", "track", "Order Completed", NOW - HOUR, properties={"total": 10}),
            ev("v1", "page", "Home", NOW - HOUR, properties={"section": "shoes"}),
        ],
        defs,
        now=NOW,
    )
    profile.to_json()
    encoded = _counted_encodings(monkeypatch)
    profile.set_scores({"churn": 0.5}, model="m", version="1", at=NOW)
    profile.to_json()
    assert encoded == []
    profile.apply(ev("v2", "page", "Home", NOW, properties={"section": "bags"}), defs, now=NOW)
    profile.to_json()
    assert sorted(encoded) == ["most_frequent", "unique"]  # the two page traits; the order traits are as they were


def test_a_contribution_already_out_of_its_window_reencodes_nothing(ev, defs_of, profile_of, monkeypatch):
    # A late event older than a window proves the trait exists but changes no state: the write that follows
    # reuses every state's encoding (it made the 24h states again on every such event).
    defs = defs_of(*DEFS)
    profile = profile_of([ev("o1", "track", "Order Completed", NOW - HOUR, properties={"total": 10})], defs, now=NOW)
    stored = profile.to_json()
    encoded = _counted_encodings(monkeypatch)
    late = ev("o0", "track", "Order Completed", NOW - 3 * DAY, properties={"total": 5})
    profile.apply(late, defs, now=NOW)
    written = orjson.loads(profile.to_json())
    assert sorted(encoded) == ["sum"]  # revenue took the order; orders_24h and max_total_2d are as they were
    before = orjson.loads(stored)["parts"][0]["computed"]
    assert {name: written["parts"][0]["computed"][name] for name in ("orders_24h", "max_total_2d")} == {
        name: before[name] for name in ("orders_24h", "max_total_2d")
    }
    monkeypatch.undo()
    assert written == _fresh(profile)


def test_an_event_that_leaves_an_all_time_first_max_or_min_as_it_was_reencodes_none_of_them(
    ev, defs_of, profile_of, monkeypatch
):
    # A returning customer's later orders do not displace their first order, and most do not beat their
    # largest: those states are written as they were, not encoded again on every order.
    defs = defs_of(
        {"name": "first_sku", "op": "first", "event_names": ["Order Completed"], "property": "sku"},
        {"name": "last_sku", "op": "last", "event_names": ["Order Completed"], "property": "sku"},
        {"name": "max_total", "op": "max", "event_names": ["Order Completed"], "property": "total"},
        {"name": "min_total", "op": "min", "event_names": ["Order Completed"], "property": "total"},
        {"name": "orders", "op": "count", "event_names": ["Order Completed"]},
    )
    profile = profile_of(
        [
            ev("o1", "track", "Order Completed", NOW - 3 * HOUR, properties={"sku": "a", "total": 10}),
            ev("o2", "track", "Order Completed", NOW - 2 * HOUR, properties={"sku": "b", "total": 50}),
        ],
        defs,
        now=NOW,
    )
    profile.to_json()
    encoded = _counted_encodings(monkeypatch)
    profile.apply(ev("o3", "track", "Order Completed", NOW - HOUR, properties={"sku": "c", "total": 20}), defs, now=NOW)
    written = orjson.loads(profile.to_json())
    assert sorted(encoded) == ["count", "last"]  # first, max and min kept their values
    assert written == _fresh(profile)
    encoded.clear()
    # A new largest, a new smallest and an earlier first order: each is encoded again, with its new value.
    profile.apply(
        ev("o0", "track", "Order Completed", NOW - 4 * HOUR, properties={"sku": "z", "total": 5}), defs, now=NOW
    )
    profile.apply(ev("o4", "track", "Order Completed", NOW, properties={"sku": "d", "total": 90}), defs, now=NOW)
    written = orjson.loads(profile.to_json())
    assert sorted(encoded) == ["count", "first", "last", "max", "min"]
    assert written == _fresh(profile)
    computed = {name: state["agg"] for name, state in written["parts"][0]["computed"].items()}
    assert computed["first_sku"][2] == "z" and computed["last_sku"][2] == "d"
    assert computed["max_total"] == [90] and computed["min_total"] == [5] and computed["orders"] == [5]


def test_an_all_time_mismatch_count_is_encoded_again_only_when_an_event_differs(ev, defs_of, profile_of, monkeypatch):
    # mismatch_count's aggregate answers False to an event whose values agree (the count stays): its state
    # keeps its encoding then, and only then - a differing event must reach the stored count.
    defs = defs_of(
        {"name": "mismatches", "op": "mismatch_count", "event_names": ["Order Completed"], "property": "card",
         "compare": "ship"},
    )  # fmt: skip
    profile = profile_of(
        [ev("o1", "track", "Order Completed", NOW - 3 * HOUR, properties={"card": "DE", "ship": "FR"})], defs
    )
    profile.to_json()
    encoded = _counted_encodings(monkeypatch)
    agree = ev("o2", "track", "Order Completed", NOW - 2 * HOUR, properties={"card": "DE", "ship": " de "})
    profile.apply(agree, defs, now=NOW)
    written = orjson.loads(profile.to_json())
    assert encoded == []
    assert written == _fresh(profile)
    differ = ev("o3", "track", "Order Completed", NOW - HOUR, properties={"card": "DE", "ship": "US"})
    profile.apply(differ, defs, now=NOW)
    written = orjson.loads(profile.to_json())
    assert encoded == ["mismatch_count"]
    assert written == _fresh(profile)
    assert written["parts"][0]["computed"]["mismatches"]["agg"] == [2]


def test_the_stored_ids_without_a_timeline_entry_follow_retention_writes_and_merges(ev, defs_of, profile_of):
    # The ids applied whose entries retention dropped (and API writes, which have none) are stored in `seen`;
    # the profile keeps that list as it changes rather than walking its timeline on every write.
    defs = defs_of(*DEFS)
    retention = Retention(max_events=5)
    ann = Profile.new("ann", retention=retention)
    bob = Profile.new("bob", retention=retention)
    for i in range(9):
        ann.apply(
            ev(f"a{i}", "track", "Order Completed", NOW - (20 - i) * HOUR, properties={"total": i}), defs, now=NOW
        )
        ann.to_json()  # a write after every event, as the engine does
        bob.apply(ev(f"b{i}", "page", "Home", NOW - (20 - 2 * i) * HOUR, properties={"section": "x"}), defs, now=NOW)
        bob.to_json()
    ann.update_traits({"plan": "pro"}, source="api", at=NOW - HOUR, event_id="w1", now=NOW)
    ann.apply(ev("late", "track", "Order Completed", NOW - 40 * HOUR, properties={"total": 1}), defs, now=NOW)
    assert _seen_of(ann) == _recounted(ann)
    assert [event_id for event_id, _ in _seen_of(ann)] == ["late", "a0", "a1", "a2", "a3", "w1"]
    ann.merge(bob, merge_id="m1", at=NOW, defs=defs, now=NOW)
    ann.to_json()
    ann.apply(ev("a9", "track", "Order Completed", NOW - 2 * HOUR, properties={"total": 9}), defs, now=NOW)
    assert _seen_of(ann) == _recounted(ann)
    restored, _, _ = ann.split("bob", merge_id="m1", defs=defs, now=NOW)
    assert _seen_of(ann) == _recounted(ann)
    assert _seen_of(restored) == _recounted(restored)
    loaded = decode_profile(encode_profile(ann), ann.timeline(), retention)
    assert loaded.to_doc() == ann.to_doc()


def _seen_of(profile: Profile) -> list:
    return [item for part in orjson.loads(profile.to_json())["parts"] for item in part["seen"]]


def _recounted(profile: Profile) -> list:
    out = []
    for part in profile.parts.values():
        kept = {entry.event_id for entry in part.timeline}
        out.extend([event_id, at] for at, event_id in sorted((at, i) for i, at in part.seen.items() if i not in kept))
    return out


def test_the_stored_scores_follow_every_change_of_the_scores():
    # The scores' JSON is kept with the part until one changes (profile record and scores record alike).
    profile = Profile.new("ann")
    written = []
    profile.set_scores({"churn": 0.5, "clv": 10.0}, model="m", version="1", at=NOW)
    written.append(profile.to_json())
    profile.set_scores({"churn": 0.25}, model="m", version="1", at=NOW + 1)
    written.append(profile.to_json())
    profile.set_scores({"churn": 0.75}, model="m", version="1", at=NOW - 1)  # older: changes nothing
    written.append(profile.to_json())
    overlay_scores(profile, {"scores": orjson.dumps({"clv": [12.0, "m", "2", NOW + 2]}).decode()})
    written.append(profile.to_json())
    profile.set_scores({"fraud": 0.1}, model="f", version="1", at=NOW + 3)
    written.append(profile.to_json())
    assert [orjson.loads(doc)["parts"][0]["scores"] for doc in written] == [
        {"churn": [0.5, "m", "1", NOW], "clv": [10.0, "m", "1", NOW]},
        {"churn": [0.25, "m", "1", NOW + 1], "clv": [10.0, "m", "1", NOW]},
        {"churn": [0.25, "m", "1", NOW + 1], "clv": [10.0, "m", "1", NOW]},
        {"churn": [0.25, "m", "1", NOW + 1], "clv": [12.0, "m", "2", NOW + 2]},
        {"churn": [0.25, "m", "1", NOW + 1], "clv": [12.0, "m", "2", NOW + 2], "fraud": [0.1, "f", "1", NOW + 3]},
    ]
    assert orjson.loads(encode_scores(profile)["scores"]) == _fresh(profile)["parts"][0]["scores"]
    assert orjson.loads(written[-1]) == _fresh(profile)


def test_the_stored_histories_follow_every_change_of_traits_groups_and_consent(ev, defs_of):
    # Each history's JSON is kept until it changes: new versions, late ones landing in the middle, new keys,
    # and a merge taking out the loser's copies of events both persons had.
    defs = defs_of(*DEFS)
    ann, bob = Profile.new("ann"), Profile.new("bob")
    steps = [
        (ann, ev("i1", "identify", at=NOW - 5 * HOUR, traits={"plan": "free", "city": "Lyon"})),
        (ann, ev("i2", "identify", at=NOW - 3 * HOUR, traits={"plan": "pro"})),
        (ann, ev("i0", "identify", at=NOW - 9 * HOUR, traits={"plan": "trial", "email": "a@x"})),  # late
        (ann, ev("g1", "group", at=NOW - 2 * HOUR, group_id="acme", traits={"size": 5})),
        (ann, ev("c1", "track", at=NOW - HOUR, consent={"purpose:Marketing": True})),
        (bob, ev("i2", "identify", at=NOW - 3 * HOUR, traits={"plan": "pro"})),  # both had it: taken out of bob's
        (bob, ev("b1", "identify", at=NOW - 4 * HOUR, traits={"city": "Berlin"})),
    ]
    for profile, event in steps:
        profile.apply(event, defs, now=NOW)
        assert orjson.loads(profile.to_json()) == _fresh(profile)
    ann.update_traits({"city": None}, source="api", at=NOW, event_id="w1", now=NOW)
    assert orjson.loads(ann.to_json()) == _fresh(ann)
    ann.merge(bob, merge_id="m1", at=NOW, defs=defs, now=NOW)
    stored = orjson.loads(ann.to_json())
    assert stored == _fresh(ann)
    assert stored["parts"][1]["traits"] == {"city": [["Berlin", "web", "b1", NOW - 4 * HOUR, NOW]]}
    restored, _, _ = ann.split("bob", merge_id="m1", defs=defs, now=NOW)
    assert orjson.loads(ann.to_json()) == _fresh(ann)
    assert orjson.loads(restored.to_json()) == _fresh(restored)
    assert [version[0] for version in orjson.loads(ann.to_json())["parts"][0]["traits"]["plan"]] == [
        "trial",
        "free",
        "pro",
    ]


def test_a_windowed_state_with_many_entries_is_encoded_as_it_is_after_every_kind_of_change():
    # Past a few entries the array's bytes are kept and later entries added at its end: every encoding
    # must still be exactly `to_doc()`'s, and read back to the same state.
    state = ComputedState("unique", 10 * DAY, "sig")
    now = NOW

    def check() -> None:
        encoded = orjson.dumps(state.encoded())
        assert encoded == orjson.dumps(state.to_doc())
        assert orjson.dumps(ComputedState.from_doc(orjson.loads(encoded)).to_doc()) == encoded

    for i in range(40):
        now += HOUR
        state.add(now, f"e{i:02d}", {"section": f"s{i % 7}", "n": i}, now)
        check()
        state.encoded()  # encoded again unchanged: the same
        check()
    state.add(now - 30 * HOUR, "late", "before the end", now)  # inserted, not appended
    check()
    for i in range(40, 45):
        now += HOUR
        state.add(now, f"e{i:02d}", i, now)
    check()
    state.remove_entry("e03")
    check()
    state.add(now + 1, "after-removal", 1, now + 1)
    check()
    assert state.prune(now + 10 * DAY - 20 * HOUR)  # the oldest go
    check()
    state.add(now + 2, "after-prune", 2, now + 2)
    check()
    assert [entry[1] for entry in state.entries][-2:] == ["after-removal", "after-prune"]


def test_a_write_of_a_record_far_from_its_bound_measures_no_state(ev, defs_of, profile_of, monkeypatch):
    # A state's stored size (its quotes and backslashes counted: `stored_size`) is what the record's bound
    # reads, and only a record past COMPUTED_MAX_BYTES / 2 asks for it: measured at every encoding, it was
    # two passes over every state each event changed, at every write. Asked for, it is what it was.
    defs = defs_of(*DEFS)
    measured: list[int] = []
    real = aggregates.stored_size
    monkeypatch.setattr(aggregates, "stored_size", lambda data: measured.append(len(data)) or real(data))
    ann = profile_of([ev("o1", "track", "Order Completed", NOW - HOUR, properties={"total": 10})], defs, now=NOW)
    ann.to_json()
    ann.apply(ev("v1", "page", "Home", NOW, properties={"section": 'the "shoes"'}), defs, now=NOW)
    ann.to_json()
    assert measured == []
    for state in ann.parts[ann.person_id].computed.values():
        assert state.stored_bytes() == real(orjson.dumps(state.to_doc()))
    assert len(measured) == len(ann.parts[ann.person_id].computed)
