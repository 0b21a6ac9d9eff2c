"""A caller's edit of a journey is refused when someone saved the journey after the caller read it, when the
caller says which revision it read (`expected_revision`).

Every journey carries its revision (`Journey.revision`: 1 when created, one more with each change saved).
Two editors read the journey; one saves a new draft. The other's update, publish or discard, made on the
copy read before and sent after, used to replace it (the service only catches races inside itself: between
its own read and save). With the revision the caller read, a stale call is ABORTED (reason
journey_changed), naming the journey, what it is now and to read it again, and changes nothing; the current
revision goes through. Without one (0), a call behaves as before: decided on what is stored when it arrives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import orjson
import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import Conflict, InvalidArgument, NotFound
from cdp_kit.storage import open_store
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.journeys import JOURNEYS, Journeys
from cdp_orchestration.state import prepare_store

WELCOME = {
    "id": "welcome",
    "version": 1,
    "name": "Welcome",
    "priority": 1,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"api": True},
    "reentry": "always",
    "nodes": [{"id": "later", "type": "delay", "duration": "1h"}],
}


def edit(version: int, duration: str, name: str) -> dict:
    return {
        **WELCOME,
        "version": version,
        "name": name,
        "nodes": [{"id": "later", "type": "delay", "duration": duration}],
    }


def update(document: dict, expected_revision: int = 0) -> pb.UpdateJourneyRequest:
    definition = pb.JourneyDefinition(json=orjson.dumps(document).decode())
    return pb.UpdateJourneyRequest(
        journey_id=document["id"], definition=definition, expected_revision=expected_revision
    )


class _Between:
    """The store as one call reads it: right after that call's next read of a journey, `between` runs (another
    call, start to finish), and only then does the first call get what it read."""

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


@pytest.fixture
async def world(tmp_path):
    """(api, raced api, raced store, the journey as stored): two replicas on one store; the second reads
    through a store that lets a call of the first land between its read and its save."""
    async with open_store(f"sqlite:///{tmp_path}/orchestration.db") as store:
        await prepare_store(store)  # the indexes, as the service declares them at start (`__main__`)
        raced = _Between(store)
        api = OrchestrationApi(journeys=Journeys(store), store=store, bus=None, partitions=2)
        racing = OrchestrationApi(journeys=Journeys(raced), store=store, bus=None, partitions=2)

        async def stored():
            fresh = Journeys(store)
            await fresh.load()
            return fresh.records["welcome"]

        yield api, racing, raced, stored


async def get(api: OrchestrationApi, draft: bool = False) -> pb.Journey:
    return await api.GetJourney(pb.GetJourneyRequest(journey_id="welcome", draft=draft), None)


async def published_with_a_draft(api: OrchestrationApi) -> None:
    """`welcome` published as v1 with a draft v2 ("Draft") saved after it: revisions 1, 2 and 3."""
    await api.CreateJourney(pb.CreateJourneyRequest(definition=update(WELCOME).definition), None)
    await api.PublishJourney(pb.PublishJourneyRequest(journey_id="welcome"), None)
    await api.UpdateJourney(update(edit(2, "2h", "Draft")), None)


def refused_for_revision(error: Conflict, read: int, now: int) -> None:
    assert error.code is grpc.StatusCode.ABORTED and error.reason == "journey_changed"
    message = error.message
    assert "journey welcome" in message and f"revision {now}" in message and f"{read}" in message, message
    assert "read it again" in message and "cdpctl journey get welcome" in message, message


async def test_every_change_saved_gives_the_journey_its_next_revision_and_every_answer_shows_it(world):
    api, *_ = world
    created = await api.CreateJourney(pb.CreateJourneyRequest(definition=update(WELCOME).definition), None)
    assert created.revision == 1
    assert (await api.PublishJourney(pb.PublishJourneyRequest(journey_id="welcome"), None)).revision == 2
    assert (await api.UpdateJourney(update(edit(2, "2h", "Draft")), None)).revision == 3
    assert (await api.PauseJourney(pb.JourneyRef(journey_id="welcome"), None)).revision == 4
    assert (await get(api)).revision == 4 and (await get(api, draft=True)).revision == 4
    listed = await api.ListJourneys(pb.ListJourneysRequest(), None)
    assert [(j.id, j.revision) for j in listed.journeys] == [("welcome", 4)]
    # A call that changes nothing saves nothing: the revision stays.
    assert (await api.ArchiveJourney(pb.JourneyRef(journey_id="welcome"), None)).revision == 5
    assert (await api.ArchiveJourney(pb.JourneyRef(journey_id="welcome"), None)).revision == 5


async def test_an_edit_made_on_a_copy_read_before_someone_elses_save_is_refused_and_theirs_is_kept(world):
    api, _, _, stored = world
    await published_with_a_draft(api)
    read = (await get(api, draft=True)).revision  # Al reads the draft (revision 3) ...
    await api.UpdateJourney(update(edit(2, "4h", "Bea's edit")), None)  # ... Bea saves hers (revision 4)

    with pytest.raises(Conflict) as refused:
        await api.UpdateJourney(update(edit(2, "9h", "Al's edit"), expected_revision=read), None)

    refused_for_revision(refused.value, read=3, now=4)
    kept = await stored()
    assert kept.draft.name == "Bea's edit" and (await get(api)).revision == 4
    # Al reads it again: his edit, made on what is there now, goes through.
    again = await get(api, draft=True)
    saved = await api.UpdateJourney(update(edit(2, "9h", "Al's edit"), expected_revision=again.revision), None)
    assert saved.revision == 5 and (await stored()).draft.name == "Al's edit"


async def test_without_a_revision_an_edit_replaces_whatever_was_saved_before_as_it_always_did(world):
    api, _, _, stored = world
    await published_with_a_draft(api)
    await api.UpdateJourney(update(edit(2, "4h", "Bea's edit")), None)

    saved = await api.UpdateJourney(update(edit(2, "9h", "Al's edit")), None)

    assert saved.revision == 5 and (await stored()).draft.name == "Al's edit"


async def test_a_publish_of_a_draft_someone_changed_since_it_was_read_is_refused_and_publishes_nothing(world):
    api, _, _, stored = world
    await published_with_a_draft(api)
    read = (await get(api, draft=True)).revision
    await api.UpdateJourney(update(edit(2, "8h", "Not reviewed")), None)

    with pytest.raises(Conflict) as refused:
        await api.PublishJourney(pb.PublishJourneyRequest(journey_id="welcome", expected_revision=read), None)

    refused_for_revision(refused.value, read=3, now=4)
    kept = await stored()
    assert sorted(kept.versions) == [1] and kept.draft.name == "Not reviewed"
    published = await api.PublishJourney(pb.PublishJourneyRequest(journey_id="welcome", expected_revision=4), None)
    assert published.version == 2 and published.revision == 5 and published.name == "Not reviewed"


async def test_a_discard_of_a_draft_someone_changed_since_it_was_read_is_refused_and_the_draft_stays(world):
    api, _, _, stored = world
    await published_with_a_draft(api)
    read = (await get(api, draft=True)).revision
    await api.UpdateJourney(update(edit(2, "5h", "Worth keeping")), None)

    with pytest.raises(Conflict) as refused:
        await api.DiscardDraft(pb.DiscardDraftRequest(journey_id="welcome", expected_revision=read), None)

    refused_for_revision(refused.value, read=3, now=4)
    assert (await stored()).draft.name == "Worth keeping"
    answer = await api.DiscardDraft(pb.DiscardDraftRequest(journey_id="welcome", expected_revision=4), None)
    assert answer.discarded and answer.discarded_version == 2 and answer.journey.revision == 5
    assert (await stored()).draft is None


async def test_a_state_moved_since_the_read_also_refuses_a_call_that_gave_its_revision(world):
    # Without a revision a publish is decided again on a journey paused meanwhile (its draft is as read);
    # with one, the caller asked for the journey exactly as read.
    api, _, _, stored = world
    await published_with_a_draft(api)
    await api.PauseJourney(pb.JourneyRef(journey_id="welcome"), None)

    with pytest.raises(Conflict) as refused:
        await api.PublishJourney(pb.PublishJourneyRequest(journey_id="welcome", expected_revision=3), None)

    refused_for_revision(refused.value, read=3, now=4)
    assert "paused" in refused.value.message
    assert sorted((await stored()).versions) == [1]


async def test_a_save_landing_between_the_services_read_and_its_save_refuses_a_call_that_gave_its_revision(world):
    api, racing, raced, stored = world
    await published_with_a_draft(api)
    # The call reads revision 3, as its caller did; a pause is saved before the call's own save.
    raced.between = lambda: api.PauseJourney(pb.JourneyRef(journey_id="welcome"), None)

    with pytest.raises(Conflict) as refused:
        await racing.PublishJourney(pb.PublishJourneyRequest(journey_id="welcome", expected_revision=3), None)

    refused_for_revision(refused.value, read=3, now=4)
    kept = await stored()
    assert sorted(kept.versions) == [1] and kept.state.value == "paused" and kept.draft is not None


async def test_a_revision_the_journey_never_had_is_refused_saying_which_it_is_at(world):
    api, _, _, stored = world
    await published_with_a_draft(api)

    with pytest.raises(Conflict) as refused:
        await api.UpdateJourney(update(edit(2, "7h", "From elsewhere"), expected_revision=9), None)

    refused_for_revision(refused.value, read=9, now=3)
    assert (await stored()).draft.name == "Draft"


async def test_a_negative_revision_is_refused_naming_the_field(world):
    api, *_ = world
    await published_with_a_draft(api)
    with pytest.raises(InvalidArgument) as refused:
        await api.DiscardDraft(pb.DiscardDraftRequest(journey_id="welcome", expected_revision=-1), None)
    assert refused.value.field == "expected_revision" and "cdpctl journey get" in refused.value.message


async def test_an_unknown_journey_is_not_found_whatever_revision_is_given(world):
    api, *_ = world
    with pytest.raises(NotFound, match="journey welcome does not exist"):
        await api.UpdateJourney(update(edit(2, "1h", "Nobody"), expected_revision=1), None)
