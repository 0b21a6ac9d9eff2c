"""A profile store holding what a platform that ran would hold: for benchmarks, tests and trying a
training run without a deployment.

Events go through `cdp_profile.domain.Profile.apply` (with the definitions the models read, so the
timeline keeps the context they need, as the profile service does once a model defines its traits) and
are stored with `cdp_profile.records`' encoders under the profile service's collection names, so the
training set reads exactly what it would read from the service's own store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cdp_kit.storage import Put, Store
from cdp_profile.domain import ComputedTraits, Profile, ProfileEvent
from cdp_profile.records import PROFILES, TIMELINE, encode_profile, timeline_pages
from cdp_profile.timeline import PAGE_ENTRIES
from cdp_training.simulator import Population


def apply_all(person_id: str, events: Sequence[ProfileEvent], defs: ComputedTraits) -> Profile:
    """A profile built by applying `events` in time order, each at its own time."""
    profile = Profile.new(person_id)
    for event in sorted(events, key=lambda e: (e.at, e.event_id)):
        profile.apply(event, defs, now=event.at)
    return profile


async def write_profiles(store: Store, profiles: Iterable[Profile], *, batch: int = 2000) -> int:
    """Store profiles and their timelines as the profile service does; returns how many."""
    ops: list[Put] = []
    count = 0
    for profile in profiles:
        count += 1
        ops.append(Put(PROFILES, profile.person_id, encode_profile(profile)))
        # Every entry in pages (a head is what the service's record holds until its page fills: none here).
        ops.extend(Put(TIMELINE, key, doc) for key, doc in timeline_pages(profile.timeline(), PAGE_ENTRIES))
        if len(ops) >= batch:
            await store.bulk_write(ops)
            ops = []
    if ops:
        await store.bulk_write(ops)
    return count


async def write_people(
    store: Store, people: Mapping[str, Sequence[ProfileEvent]], definitions: Sequence[Mapping[str, Any]]
) -> int:
    defs = ComputedTraits.from_dicts(list(definitions))
    return await write_profiles(store, (apply_all(p, events, defs) for p, events in people.items()))


async def write_population(
    store: Store, population: Population, definitions: Sequence[Mapping[str, Any]], until: float | None = None
) -> int:
    """Every simulated person's events (history and outcome window, or up to `until`) into the store."""
    defs = ComputedTraits.from_dicts(list(definitions))
    return await write_profiles(
        store,
        (apply_all(population.person_id(p), population.profile_events(p, until), defs) for p in range(population.size)),
    )
