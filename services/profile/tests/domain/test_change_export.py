"""ProfileChange folding, the privacy export, and the persistence form."""

from __future__ import annotations

import json

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileChange, TimelineEntry

DAY = 86400.0
NOW = 100 * DAY
DEFS = ComputedTraits(
    [
        ComputedTrait("orders", "count", event_names=("Order Completed",)),
        ComputedTrait("orders_7d", "count", event_names=("Order Completed",), window="7d"),
        ComputedTrait("categories", "unique", property="category"),
    ]
)


def entry(event_id: str) -> TimelineEntry:
    return TimelineEntry(1.0, event_id, "track", "x", {}, "web", "p")


def test_an_empty_change_is_falsy_and_folding_keeps_the_latest_values():
    assert not ProfileChange("p")
    first = ProfileChange("p", traits={"plan": "free", "city": "Oslo"}, computed={"orders": 1}, event_ids=["e1"])
    first.timeline_added.append(entry("e1"))
    later = ProfileChange("p", traits={"plan": "pro"}, computed={"orders": 2}, event_ids=["e2"], scores={"churn": 0.1})
    later.timeline_added.append(entry("e2"))
    later.timeline_removed.append(entry("e1"))  # retention dropped what this batch added: nothing to write
    folded = first.combine(later)
    assert folded is first
    assert folded.traits == {"plan": "pro", "city": "Oslo"}
    assert folded.computed == {"orders": 2} and folded.scores == {"churn": 0.1}
    assert [e.event_id for e in folded.timeline_added] == ["e2"] and folded.timeline_removed == []
    assert folded.event_ids == ["e1", "e2"]
    accumulator = ProfileChange("p")
    assert accumulator.combine(ProfileChange("p", split_from="q")) is accumulator
    assert accumulator.split_from == "q" and accumulator
    with pytest.raises(ValueError):
        first.combine(ProfileChange("q"))
    assert json.loads(json.dumps(folded.to_dict()))["timeline_added"][0]["event_id"] == "e2"


def test_the_export_holds_everything_about_the_person_machine_readably(ev):
    profile = Profile.new("ann")
    profile.apply(
        ev("e1", "identify", at=10.0, traits={"plan": "free", "email": "a@x.io"}, identifiers=("email:a@x.io",)),
        DEFS,
        now=NOW,
    )
    profile.apply(ev("e2", "identify", at=20.0, traits={"plan": "pro"}), DEFS, now=NOW)
    profile.apply(
        ev(
            "e3",
            "track",
            "Order Completed",
            NOW - DAY,
            properties={"category": "bags"},
            consent={"channel:email": True},
        ),
        DEFS,
        now=NOW,
    )
    profile.apply(ev("e4", "group", at=30.0, group_id="acme"), DEFS, now=NOW)
    profile.set_consent({"channel:email": False}, source="api", at=NOW, event_id="c1")
    profile.set_scores({"churn": 0.3}, model="churn", version="2", at=NOW)
    bob = Profile.new("bob")
    bob.apply(ev("b1", identifiers=("user_id:bob",)), DEFS, now=NOW)
    profile.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)

    export = json.loads(json.dumps(profile.export(now=NOW)))  # JSON all the way down
    assert export["person_id"] == "ann" and export["merged_from"] == ["bob"]
    assert export["merges"] == [{"merge_id": "m1", "winner": "ann", "loser": "bob", "at": NOW}]
    assert export["identifiers"] == ["email:a@x.io", "user_id:bob"]
    plan = export["traits"]["plan"]
    assert plan["current"]["value"] == "pro"
    assert [(v["value"], v["source"], v["event_id"], v["at"]) for v in plan["history"]] == [
        ("free", "web", "e1", 10.0),
        ("pro", "web", "e2", 20.0),
    ]
    assert [c["granted"] for c in export["consent"]["channel:email"]["history"]] == [True, False]
    assert export["groups"]["acme"]["current"]["event_id"] == "e4"
    assert export["computed"] == {"orders": 2, "orders_7d": 1, "categories": ["bags"]}
    assert [c["event_id"] for c in export["computed_contributions"]["orders_7d"]] == ["e3"]
    assert export["scores"] == {"churn": {"value": 0.3, "model": "churn", "version": "2", "at": NOW}}
    assert [e["event_id"] for e in export["timeline"]] == ["b1", "e1", "e2", "e4", "e3"]
    assert {e["origin"] for e in export["timeline"]} == {"ann", "bob"}
    assert (export["event_count"], export["first_seen"]) == (5, 0.0)


def test_the_document_leaves_the_timeline_out_and_takes_it_back_as_records(ev):
    profile = Profile.new("ann")
    for i in range(3):
        profile.apply(ev(f"e{i}", at=float(i), properties={"category": ["x", i]}), DEFS, now=NOW)
    doc = profile.to_doc()
    text = json.dumps(doc)
    # applied ids in the timeline are not repeated in the document (a `unique` state keeps each value's
    # latest event id: its own, not a record of what was applied)
    assert "e1" not in json.dumps({key: value for key, value in doc["parts"][0].items() if key != "computed"})
    assert doc["merged_from"] == []
    records = [json.loads(json.dumps(e.to_dict())) for e in profile.timeline()]
    loaded = Profile.from_doc(json.loads(text), records)
    assert loaded.to_doc() == doc
    assert loaded.view(now=NOW) == profile.view(now=NOW)
    assert not loaded.apply(ev("e1", at=1.0), DEFS, now=NOW)  # still idempotent after a reload
    with pytest.raises(InvalidArgument) as caught:
        Profile.from_doc({**doc, "v": 99})
    assert caught.value.field == "v"
