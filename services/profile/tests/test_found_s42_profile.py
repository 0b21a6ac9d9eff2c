"""Defects found by trying the platform as a customer, an operator and an attacker would (session 42): the
profile service's side."""

from __future__ import annotations

import orjson

from cdp_profile.domain import ComputedTraits, Profile, ProfileEvent

NO_DEFS = ComputedTraits()
TRAITS = {"email": "ada@example.com", "plan": "pro", "name": "Ada Lovelace", "company": "Analytical Engines"}


def _identify(n: int, at: float, **traits) -> ProfileEvent:
    return ProfileEvent(event_id=f"e{n:06d}", type="identify", name="", at=at, source="web", traits=traits)


def _stored_bytes(profile: Profile) -> int:
    return len(orjson.dumps([part.to_doc(encoded=True) for part in profile.parts.values()]))


def test_an_sdk_repeating_the_same_traits_does_not_grow_the_person_without_end():
    """Segment's SDKs send a person's traits with every identify (analytics.js on every page load after a
    login). Each identify added one version per trait, however often the value was the same: 5,000 of them
    made a 1.6 MB record of four traits that every write of the person encoded again, 10,000 one of 3.5 MB
    (0.2 s of the partition's time an event), 50,000 one of 18 MB, past what gRPC sends: GetProfile with
    history and the person's export failed for good. What the history answers is unchanged: since when a
    value held, the current one with the newest event's provenance, a change, a late older event."""
    profile = Profile.new("p")
    for n in range(5000):
        profile.apply(_identify(n, 1000.0 + n, **TRAITS), NO_DEFS, now=9000.0)
    assert _stored_bytes(profile) < 10_000
    history = profile.trait_history("plan")
    assert [(v.value, v.event_id) for v in history] == [("pro", "e000000"), ("pro", "e004999")]
    # One more repeat after that write: the record as stored holds the run's new end (a write encodes only
    # the histories that changed, and this one changed at the same length).
    profile.apply(_identify(9999, 6500.0, **TRAITS), NO_DEFS, now=9000.0)
    stored = Profile.from_doc(orjson.loads(profile.to_json()))
    assert [v.event_id for v in stored.trait_history("plan")] == ["e000000", "e009999"]

    # A change is a new version; a late, older event with another value is kept and does not overwrite it.
    profile.apply(_identify(5000, 7000.0, plan="team"), NO_DEFS, now=9000.0)
    profile.apply(_identify(5001, 500.0, plan="free"), NO_DEFS, now=9000.0)
    view = profile.view(now=9000.0)
    assert (view.traits["plan"].value, view.traits["plan"].event_id) == ("team", "e005000")
    assert profile.view(now=9000.0, as_of=600.0).traits["plan"].value == "free"
    assert profile.view(now=9000.0, as_of=3000.0).traits["plan"].value == "pro"
    assert profile.view(now=9000.0, as_of=6800.0).traits["plan"].event_id == "e009999"
    # The same value from another source is provenance of its own: kept.
    profile.apply(
        ProfileEvent(
            event_id="crm-1", type="identify", name="", at=8000.0, source="salesforce", traits={"plan": "team"}
        ),
        NO_DEFS,
        now=9000.0,
    )
    assert [v.source for v in profile.trait_history("plan")][-2:] == ["web", "salesforce"]
