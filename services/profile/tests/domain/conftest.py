"""Small factories for the profile domain tests (fixtures: test modules are imported without a package)."""

from __future__ import annotations

from typing import Any

import pytest

from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileEvent

DAY = 86400.0


def make_event(event_id: str, type: str = "track", name: str = "", at: float = 0.0, **fields: Any) -> ProfileEvent:
    fields.setdefault("source", "web")
    if type in ("track", "page", "screen") and not name:
        name = "Order Completed" if type == "track" else "Home"
    return ProfileEvent(event_id=event_id, type=type, name=name, at=at, **fields)


@pytest.fixture
def ev():
    """ev("e1", "track", "Order Completed", at, properties={...}, identifiers=(...))"""
    return make_event


@pytest.fixture
def defs_of():
    """defs_of(ComputedTrait(...) | dict, ...) -> ComputedTraits"""

    def build(*items: ComputedTrait | dict) -> ComputedTraits:
        return ComputedTraits(
            item if isinstance(item, ComputedTrait) else ComputedTrait.from_dict(item) for item in items
        )

    return build


@pytest.fixture
def profile_of():
    """profile_of(events, defs, now=..., person="p", retention=...) -> Profile built by applying in order."""

    def build(events, defs=None, *, now: float = 100 * DAY, person: str = "p", **kwargs: Any) -> Profile:
        profile = Profile.new(person, **kwargs)
        for event in events:
            profile.apply(event, defs if defs is not None else ComputedTraits(), now=now)
        return profile

    return build
