"""A task whose journey node named no signals, from an orchestration that keeps only the scores its journeys
read (`ActionMessage.signals_from_profile`): the connector puts the person's top scores as the profile
service holds them on it (orchestration's ranking, `cdp_kit.signals`), one read for the batch. Orchestration
no longer reads them itself, where every action of its batch (a webhook beside the task) waited for that
read. Context helps a task, it never holds it back: a profile service that does not answer leaves the task
with the scores orchestration sent, after `SIGN_WAIT`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from cdp_crm_emulators.hubspot import HubSpotEmulator


class ProfileService:
    """BatchGetProfiles as the connector reads it (person id -> flat fields), optionally never answering."""

    def __init__(self, profiles: dict[str, dict[str, Any]], *, hung: bool = False) -> None:
        self.profiles = profiles
        self.hung = hung
        self.asked: list[str] = []

    async def fetch(self, person_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        self.asked.extend(person_ids)
        if self.hung:
            await asyncio.Event().wait()
        return {p: dict(self.profiles[p]) for p in person_ids if p in self.profiles}


ADA = {
    "traits.email": "ada@example.com",
    "scores.churn_risk": 0.91,
    "scores.upsell": 0.3,
    "scores.nps": 7.0,
    "scores.label": "high",  # not a number: not a top score
}


async def _task_body(profiles: ProfileService, world_factory, *, from_profile: bool) -> str:
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        await world.start(refresh=profiles.fetch)
        await world.profiles({"person-1": {"traits.email": "ada@example.com"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-1"))
        # What orchestration held: the one score its journeys read.
        await world.action("person-1", "act-1", "Call Ada", from_profile=from_profile, **{"scores.churn_risk": "0.2"})
        (task,) = await world.eventually(lambda: emulator.records("tasks"), timeout=30)
        return task["properties"]["hs_task_body"]


async def test_a_marked_task_carries_the_top_scores_the_profile_service_holds(world_factory):
    profiles = ProfileService({"person-1": ADA})
    body = await _task_body(profiles, world_factory, from_profile=True)
    assert body == "scores.nps: 7\nscores.churn_risk: 0.91\nscores.upsell: 0.3"
    assert profiles.asked == ["person-1"]


async def test_a_task_not_marked_keeps_its_signals_and_reads_nothing(world_factory):
    profiles = ProfileService({"person-1": ADA})
    body = await _task_body(profiles, world_factory, from_profile=False)
    assert body == "scores.churn_risk: 0.2"
    assert profiles.asked == []


async def test_a_profile_service_that_never_answers_leaves_the_task_its_scores(world_factory):
    profiles = ProfileService({"person-1": ADA}, hung=True)
    body = await _task_body(profiles, world_factory, from_profile=True)
    assert body == "scores.churn_risk: 0.2"
    assert profiles.asked == ["person-1"]
