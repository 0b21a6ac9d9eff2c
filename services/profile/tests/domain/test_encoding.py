"""The stored form of a profile (`to_json`) reuses each computed state's encoding until the state changes:
what is written is always exactly the profile now, and a write re-encodes only the states that changed
(a score change none of them)."""

from __future__ import annotations

import orjson

from cdp_profile.domain import Profile
from cdp_profile.domain.aggregates import ComputedState
from cdp_profile.records import decode_profile, encode_profile

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
    encoded: list[str] = []
    to_doc = ComputedState.to_doc

    def counting(state: ComputedState) -> dict:
        encoded.append(state.op)
        return to_doc(state)

    monkeypatch.setattr(ComputedState, "to_doc", counting)
    profile.set_scores({"churn": 0.5}, model="m", version="1", at=NOW)
    profile.to_json()
    assert encoded == []
    profile.apply(ev("v2", "page", "Home", NOW, properties={"section": "bags"}), defs, now=NOW)
    profile.to_json()
    assert sorted(encoded) == ["most_frequent", "unique"]  # the two page traits; the order traits are as they were
