"""Training rows computed the way production computes features.

Each simulated person's events go through `cdp_profile.domain.Profile` with the models' computed-trait
definitions, one event at a time and with `now` = the event's time, as the profile service applies them.
The fraud moment reads the profile its order lands on under identity's default rules: a person with
several accounts (a fraud ring, a family) is one profile per account there (`Population.fraud_events`).
At each scoring moment the profile's view is read as the flat fields the scoring service keeps
("computed.orders_90d", "traits.plan", "consent.channel:email", "scores.x"), and the scoring domain's
`FeatureAssembler` turns those into the model's row. No feature is computed anywhere else.

The profile domain is plain Python (tens of microseconds an event), so populations are split into chunks
applied in worker processes; chunks are put back in order, so the result does not depend on the workers.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp_kit.profile_fields import COMPUTED, CONSENT, SCORES, TRAITS
from cdp_profile.domain import ComputedTraits, Profile, ProfileEvent, ProfileView
from cdp_scoring.domain import FeatureAssembler, ModelSpec
from cdp_training.simulator import Population

# The key prefixes of `cdp_kit.profile_fields`, joined once: this runs for every person and moment.
_TRAITS, _COMPUTED, _CONSENT, _SCORES = (root + "." for root in (TRAITS, COMPUTED, CONSENT, SCORES))


def view_fields(view: ProfileView) -> dict[str, Any]:
    """A profile view as the scoring service's flat fields (absent values left out, as it does).

    `cdp_kit.profile_fields.profile_fields` does the same for the profile service's protobuf `Profile`;
    training holds the domain's `ProfileView` instead, and keeps its plain values (turning it into a
    protobuf first would cost a conversion per person and moment for the same keys)."""
    fields: dict[str, Any] = {}
    for name, version in view.traits.items():
        fields[_TRAITS + name] = version.value
    for name, value in view.computed.items():
        fields[_COMPUTED + name] = value
    for key, state in view.consent.items():
        fields[_CONSENT + key] = state.granted
    for name, score in view.scores.items():
        fields[_SCORES + name] = score.value
    return {key: value for key, value in fields.items() if value is not None}


def fields_at(
    person_id: str, events: Sequence[ProfileEvent], defs: ComputedTraits, moments: Sequence[float]
) -> list[dict[str, Any]]:
    """Apply `events` (oldest first) to a new profile; the flat fields as of each of `moments` (ascending),
    counting every event at or before it."""
    profile = Profile.new(person_id)
    out: list[dict[str, Any]] = []
    pending = list(moments)
    for event in events:
        while pending and event.at > pending[0]:
            out.append(view_fields(profile.view(now=pending.pop(0))))
        profile.apply(event, defs, now=event.at)
    while pending:
        out.append(view_fields(profile.view(now=pending.pop(0))))
    return out


@dataclass(slots=True)
class PopulationFields:
    """Per person: the flat profile fields at the cutoff and at the fraud scoring moment."""

    at_cutoff: list[dict[str, Any]]
    at_fraud: list[dict[str, Any]]


def _chunk_fields(population: Population, definitions: list[Mapping[str, Any]]) -> PopulationFields:
    defs = ComputedTraits.from_dicts(definitions)
    at_cutoff, at_fraud = [], []
    for person in range(population.size):
        fraud_at = float(population.fraud_at[person])
        person_id = population.person_id(person)
        events = population.profile_events(person, population.cutoff)
        apart = population.fraud_events(person, population.cutoff)
        if apart is None:
            fraud, cutoff = fields_at(person_id, events, defs, [fraud_at, population.cutoff])
        else:  # several accounts: the fraud order lands on its own account's profile (identity's defaults)
            (cutoff,) = fields_at(person_id, events, defs, [population.cutoff])
            (fraud,) = fields_at(person_id, apart, defs, [fraud_at])
        at_fraud.append(fraud)
        at_cutoff.append(cutoff)
    return PopulationFields(at_cutoff, at_fraud)


def population_fields(
    population: Population, definitions: list[Mapping[str, Any]], *, workers: int | None = None
) -> PopulationFields:
    """Every person's fields (history events only), in worker processes when `workers` > 1."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or population.size < 2000:
        return _chunk_fields(population, definitions)
    chunks = workers * 4  # small enough that the workers finish together
    edges = np.linspace(0, population.size, chunks + 1).astype(int)
    parts = [population.subset(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]
    out = PopulationFields([], [])
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(_chunk_fields, parts, [definitions] * len(parts)):
            out.at_cutoff.extend(part.at_cutoff)
            out.at_fraud.extend(part.at_fraud)
    return out


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def matrix(spec: ModelSpec, fields: Sequence[Mapping[str, Any]], now: float | np.ndarray) -> np.ndarray:
    """The model's rows (float32), each assembled at its own `now` when `now` is an array."""
    assembler = FeatureAssembler(spec)
    if np.ndim(now) == 0:
        return assembler.matrix(fields, float(now))
    rows = np.empty((len(fields), assembler.width), dtype=np.float32)
    for i, (person, at) in enumerate(zip(fields, now, strict=True)):
        rows[i] = assembler.row(person, float(at))
    return rows
