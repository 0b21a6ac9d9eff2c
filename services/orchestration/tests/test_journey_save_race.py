"""A journey's change is saved against the stored version it was decided on, so a change that lands in between
is never overwritten in silence.

Every journey call reads the record, decides the change (a draft saved, published, discarded; a state
moved) and saves it. The save used to read the record again and expect *that* version: a concurrent save
between the two reads was simply written over (two editors: one edit gone, both told OK). Now the save
expects the version the decision was based on. On a conflict, a call that only moves the state (pause,
resume, archive) decides again on what is stored now; so does one whose draft is still as it read it. A call
about a draft someone else changed meanwhile (update, publish, discard) is refused, ABORTED, naming the
journey, what changed and to read it again. Creating a journey someone else created meanwhile is
ALREADY_EXISTS, as it is when the other came first.

The interleaving is made exact by the store the first call reads through: right after that call has read the
journey, the other call runs to completion (no sleeps). Each case runs with the two calls on one replica
(one `Journeys`) and on two (each its own), on SQLite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import orjson
import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import AlreadyExists, Conflict
from cdp_kit.storage import open_store
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.journeys import JOURNEYS, Journeys
from cdp_orchestration.state import prepare_store

SLOW = {
    "id": "slow",
    "version": 1,
    "name": "Slow",
    "priority": 1,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"api": True},
    "reentry": "always",
    "nodes": [{"id": "later", "type": "delay", "duration": "1h"}],
}


def edit(version: int, duration: str, name: str = "Slow") -> dict:
    return {**SLOW, "version": version, "name": name, "nodes": [{"id": "later", "type": "delay", "duration": duration}]}


def definition(document: dict) -> pb.JourneyDefinition:
    return pb.JourneyDefinition(json=orjson.dumps(document).decode())


def update(document: dict) -> pb.UpdateJourneyRequest:
    return pb.UpdateJourneyRequest(journey_id=document["id"], definition=definition(document))


class _Between:
    """The store as the first call reads it: right after that call's next read of a journey, `between` runs
    (the other call, start to finish), and only then does the first call get what it read."""

    def __init__(self, store) -> None:
        self._store = store
        self.between: Callable[[], Awaitable[object]] | None = None

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def get(self, collection, key):
        stored = await self._store.get(collection, key)
        if collection == JOURNEYS:
            between, self.between = self.between, None
            if between is not None:
                await between()
        return stored


@pytest.fixture(params=["one replica", "two replicas"])
async def apis(request, tmp_path):
    """(first, other, raced store, journeys as stored): the first call's API reads through the raced store;
    the other call's API is the same replica's or another replica's."""
    async with open_store(f"sqlite:///{tmp_path}/orchestration.db") as store:
        await prepare_store(store)  # the indexes, as the service declares them at start (`__main__`)
        raced = _Between(store)
        first = OrchestrationApi(journeys=Journeys(raced), store=store, bus=None, partitions=2)
        if request.param == "one replica":
            other = first
        else:
            other = OrchestrationApi(journeys=Journeys(store), store=store, bus=None, partitions=2)

        async def stored() -> Journeys:
            fresh = Journeys(store)
            await fresh.load()
            return fresh

        yield first, other, raced, stored


async def published(api: OrchestrationApi, *, draft: dict | None = None) -> None:
    """`slow` published as v1, with `draft` saved after it."""
    await api.CreateJourney(pb.CreateJourneyRequest(definition=definition(SLOW)), None)
    await api.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"), None)
    if draft is not None:
        await api.UpdateJourney(update(draft), None)


def duration(journey) -> str:
    return journey.document["nodes"][0]["duration"]


async def test_two_editors_saving_one_draft_at_once_one_is_refused_and_the_other_edit_is_kept(apis):
    first, other, raced, stored = apis
    await published(other)
    raced.between = lambda: other.UpdateJourney(update(edit(2, "2h", "Bea's edit")), None)

    with pytest.raises(Conflict) as refused:
        await first.UpdateJourney(update(edit(2, "3h", "Al's edit")), None)
    assert refused.value.code is grpc.StatusCode.ABORTED and refused.value.reason == "journey_changed"
    message = refused.value.message
    assert "journey slow" in message and "draft was saved" in message and "read it again" in message
    assert "cdpctl journey get slow --draft" in message

    kept = (await stored()).records["slow"]
    assert kept.draft.name == "Bea's edit" and duration(kept.draft) == "2h"
    assert sorted(kept.versions) == [1]
    # Al reads it again, and his next save (made knowing Bea's) goes through.
    assert (await first.GetJourney(pb.GetJourneyRequest(journey_id="slow", draft=True), None)).name == "Bea's edit"
    await first.UpdateJourney(update(edit(2, "3h", "Al's edit")), None)
    assert (await stored()).records["slow"].draft.name == "Al's edit"


async def test_a_publish_racing_a_new_draft_publishes_nothing_the_publisher_did_not_mean_and_keeps_the_draft(apis):
    first, other, raced, stored = apis
    await published(other, draft=edit(2, "2h"))
    raced.between = lambda: other.UpdateJourney(update(edit(2, "5h", "Changed meanwhile")), None)

    with pytest.raises(Conflict, match=r"journey slow .*draft was saved again.*read it again"):
        await first.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"), None)

    kept = (await stored()).records["slow"]
    assert sorted(kept.versions) == [1] and kept.draft.name == "Changed meanwhile" and duration(kept.draft) == "5h"


async def test_an_edit_racing_a_publish_of_the_draft_it_read_is_refused_saying_it_was_published(apis):
    first, other, raced, stored = apis
    await published(other, draft=edit(2, "2h"))
    raced.between = lambda: other.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"), None)

    with pytest.raises(Conflict, match=r"journey slow .*draft was published as v2.*read it again") as refused:
        await first.UpdateJourney(update(edit(2, "9h")), None)
    assert "(cdpctl journey get slow)" in refused.value.message  # no draft left to read: the live version

    kept = (await stored()).records["slow"]
    assert sorted(kept.versions) == [1, 2] and duration(kept.versions[2]) == "2h" and kept.draft is None


async def test_an_archive_racing_an_edit_is_decided_again_and_keeps_the_edit(apis):
    first, other, raced, stored = apis
    await published(other, draft=edit(2, "2h"))
    raced.between = lambda: other.UpdateJourney(update(edit(2, "4h", "Saved meanwhile")), None)

    answer = await first.ArchiveJourney(pb.JourneyRef(journey_id="slow"), None)

    assert answer.state == pb.JOURNEY_STATE_ARCHIVED and answer.draft_version == 2
    kept = (await stored()).records["slow"]
    assert kept.state.value == "archived" and kept.draft.name == "Saved meanwhile" and duration(kept.draft) == "4h"


async def test_a_pause_racing_a_publish_is_decided_again_and_keeps_the_published_version(apis):
    first, other, raced, stored = apis
    await published(other, draft=edit(2, "2h"))
    raced.between = lambda: other.PublishJourney(pb.PublishJourneyRequest(journey_id="slow"), None)

    answer = await first.PauseJourney(pb.JourneyRef(journey_id="slow"), None)

    assert answer.state == pb.JOURNEY_STATE_PAUSED and answer.version == 2
    kept = (await stored()).records["slow"]
    assert kept.state.value == "paused" and sorted(kept.versions) == [1, 2] and kept.draft is None


async def test_a_discard_racing_a_pause_is_decided_again_and_both_hold(apis):
    first, other, raced, stored = apis
    await published(other, draft=edit(2, "2h"))
    raced.between = lambda: other.PauseJourney(pb.JourneyRef(journey_id="slow"), None)

    answer = await first.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), None)

    assert answer.discarded and answer.discarded_version == 2 and answer.journey.state == pb.JOURNEY_STATE_PAUSED
    kept = (await stored()).records["slow"]
    assert kept.state.value == "paused" and kept.draft is None and sorted(kept.versions) == [1]


async def test_a_discard_racing_a_new_draft_is_refused_and_the_new_draft_stays(apis):
    first, other, raced, stored = apis
    await published(other, draft=edit(2, "2h"))
    raced.between = lambda: other.UpdateJourney(update(edit(2, "6h", "Not yet seen")), None)

    with pytest.raises(Conflict, match=r"journey slow .*draft was saved again.*read it again"):
        await first.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), None)

    kept = (await stored()).records["slow"]
    assert kept.draft.name == "Not yet seen" and duration(kept.draft) == "6h"


async def test_a_discard_racing_a_discard_answers_that_nothing_was_left_to_discard(apis):
    first, other, raced, stored = apis
    await published(other, draft=edit(2, "2h"))
    raced.between = lambda: other.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), None)

    answer = await first.DiscardDraft(pb.DiscardDraftRequest(journey_id="slow"), None)

    assert not answer.discarded and answer.journey.draft_version == 0
    assert (await stored()).records["slow"].draft is None


async def test_two_creates_of_one_journey_at_once_the_second_is_already_exists_and_the_first_is_kept(apis):
    first, other, raced, stored = apis
    raced.between = lambda: other.CreateJourney(
        pb.CreateJourneyRequest(definition=definition({**SLOW, "name": "Created first"})), None
    )

    with pytest.raises(AlreadyExists, match="journey slow exists"):
        await first.CreateJourney(pb.CreateJourneyRequest(definition=definition({**SLOW, "name": "Too late"})), None)

    assert (await stored()).records["slow"].draft.name == "Created first"


async def test_a_journey_changed_at_every_attempt_is_refused_after_a_few_rather_than_tried_for_ever(apis):
    first, other, raced, stored = apis
    await published(other)
    moves = [other.PauseJourney, other.ResumeJourney]
    made = 0

    async def move_and_again() -> None:
        nonlocal made
        await moves[made % 2](pb.JourneyRef(journey_id="slow"), None)
        made += 1
        raced.between = move_and_again

    raced.between = move_and_again
    with pytest.raises(Conflict, match=r"journey slow kept changing.*try again"):
        await first.ArchiveJourney(pb.JourneyRef(journey_id="slow"), None)
    raced.between = None

    assert 2 <= made <= 10
    assert (await stored()).records["slow"].state.value in ("active", "paused")  # never archived over a move
