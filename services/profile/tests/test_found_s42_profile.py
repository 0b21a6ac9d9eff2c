"""Defects found by trying the platform as a customer, an operator and an attacker would (session 42): the
profile service's side."""

from __future__ import annotations

import orjson

from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileEvent, TraitVersion

NO_DEFS = ComputedTraits()
TRAITS = {"email": "ada@example.com", "plan": "pro", "name": "Ada Lovelace", "company": "Analytical Engines"}


def _identify(n: int, at: float, **traits) -> ProfileEvent:
    return ProfileEvent(event_id=f"e{n:06d}", type="identify", name="", at=at, source="web", traits=traits)


def _stored_bytes(profile: Profile) -> int:
    return len(orjson.dumps([part.to_doc(encoded=True) for part in profile.parts.values()]))


def test_a_write_of_a_person_with_a_long_history_encodes_what_was_added(monkeypatch):
    """Segment's SDKs send a person's traits with every identify, and each adds a version per trait. Every
    write of the person encoded each history that grew whole again: at 12,000 identifies of six traits and
    three consent keys, 80 ms of the partition's time an event (0.25 ms now), growing with every identify.
    A history that grew at its end has the added versions' JSON appended; one changed before its end (a late
    older event) is encoded whole, and the record reads back as the histories held."""
    profile = Profile.new("p")
    for n in range(3000):
        profile.apply(_identify(n, 1000.0 + n, **TRAITS), NO_DEFS, now=9000.0)
        if n % 10 == 0:
            profile.to_json()
    profile.to_json()
    encoded = []
    to_doc = TraitVersion.to_doc

    def counted(self):
        encoded.append(self.event_id)
        return to_doc(self)

    monkeypatch.setattr(TraitVersion, "to_doc", counted)
    profile.apply(_identify(3000, 5000.0, **TRAITS), NO_DEFS, now=9000.0)
    profile.to_json()
    assert encoded == ["e003000"] * len(TRAITS)
    monkeypatch.undo()

    profile.apply(_identify(3001, 1500.5, plan="free"), NO_DEFS, now=9000.0)  # late: before the end
    profile.apply(_identify(3002, 6000.0, plan="team", email="ada@example.org"), NO_DEFS, now=9000.0)
    stored = Profile.from_doc(orjson.loads(profile.to_json()))
    for name in TRAITS:
        assert stored.trait_history(name) == profile.trait_history(name), name
    assert stored.view(now=9000.0, as_of=1500.7).traits["plan"].value == "free"
    assert stored.view(now=9000.0).traits["plan"].value == "team"


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


def test_traits_under_new_names_without_end_stay_within_what_the_store_keeps():
    """An integration naming a trait after each order ({"order_8812": {...}}, 30 KB an identify) adds a key
    per identify, each a current value no trimming of old versions removes: after 280 the record passed the
    store's 8 MiB and every later event of the person failed its partition's batch. Now a person whose
    histories are past their budget keeps no new key (the event stays on the timeline); the keys it has
    keep changing."""
    profile = Profile.new("p")
    for n in range(400):
        profile.apply(_identify(n, 1000.0 + n, **{f"order_{n}": "o" * 30_000, "plan": f"p{n}"}), NO_DEFS, now=9000.0)
        assert len(profile.to_json()) < MAX_DOCUMENT_BYTES, n
    view = profile.view(now=9000.0)
    assert view.traits["plan"].value == "p399" and "order_0" in view.traits and "order_399" not in view.traits
    assert profile.events(limit=1)[0][0].event_id == "e000399"


def test_long_distinct_values_stay_within_what_the_store_keeps():
    """A trait of distinct values (unique, unique_count, most_frequent) held up to 10,000 of them whatever
    their length, and a value may be 32 KB (a search query, a URL): 300 searches of 30 KB made a record of
    9 MB, past the store's 8 MiB, after which every event of the person failed its partition's batch.
    Their characters are bounded too now: `unique` forgets the values seen least recently and still holds
    the ones seen last, the others take no new value (unique_count reads "at least")."""
    for op in ("unique_count", "most_frequent", "unique"):
        definition = {"name": "searched", "op": op, "event_names": ["Search"], "property": "q"}
        defs = ComputedTraits([ComputedTrait.from_dict(definition)])
        profile = Profile.new("p")
        for n in range(300):
            query = f"{n:05d}" + "q" * 30_000
            event = ProfileEvent(
                event_id=f"s{n:05d}", type="track", name="Search", at=1000.0 + n, source="web", properties={"q": query}
            )
            profile.apply(event, defs, now=2000.0)
            assert len(profile.to_json()) < MAX_DOCUMENT_BYTES, (op, n)
        value = profile.view(now=2000.0).computed["searched"]
        if op == "unique":
            assert value[-1].startswith("00299"), [v[:5] for v in value]
        elif op == "unique_count":
            assert 0 < value < 300
        else:
            assert value.startswith("00000")
