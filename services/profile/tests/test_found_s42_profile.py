"""Defects found by trying the platform as a customer, an operator and an attacker would (session 42): the
profile service's side."""

from __future__ import annotations

import orjson

from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
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


def test_a_person_whose_values_keep_changing_stays_within_what_the_store_keeps():
    """The store keeps a profile document of at most 8 MiB and refused every write of a person past it.
    An identify of a 30 KB trait that changes each time (a cart sent as a trait) added 30 KB of history:
    after 272 of them every later event of the person failed its partition's batch (InvalidArgument
    ops[..].doc), holding the partition's other persons until the message was dead-lettered, and so again
    for each of the person's events. A consent manager's categories on every event grew the
    record 94 bytes an event, there after some 90,000. Now the oldest versions that are not current go
    first, as the timeline's oldest entries do; current values and the recent history stay, and the
    histories keep within 2 MiB."""
    profile = Profile.new("p")
    for n in range(300):
        profile.apply(_identify(n, 1000.0 + n, cart=f"{n:06d}" + "c" * 30_000), NO_DEFS, now=9000.0)
        if n % 10 == 9:
            assert len(profile.to_json()) < MAX_DOCUMENT_BYTES, n
    view = profile.view(now=9000.0)
    assert view.traits["cart"].value.startswith("000299")
    assert profile.view(now=9000.0, as_of=1250.5).traits["cart"].value.startswith("000250")
    stored = Profile.from_doc(orjson.loads(profile.to_json()))
    assert stored.trait_history("cart")[-1].event_id == "e000299"

    consent = {"purpose:Marketing": True, "purpose:Analytics": True, "purpose:Advertising": False}
    profile = Profile.new("p")
    for n in range(35_000):
        at = 1000.0 + n
        event = ProfileEvent(
            event_id=f"t{n:06d}", type="track", name="Page Viewed", at=at, source="web", consent=consent
        )
        profile.apply(event, NO_DEFS, now=at)
    assert len(profile.to_json()) < 2_200_000  # the histories' 2 MiB and the rest of the record
    assert profile.view(now=40_000.0).consent["purpose:Advertising"].granted is False
