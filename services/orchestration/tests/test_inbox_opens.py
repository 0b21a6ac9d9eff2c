"""MarkInboxRead: each newly read in-app message becomes one Message Opened outcome event, under the
person's identifier and with its journey, and one the collector refused goes with the next call."""

from __future__ import annotations

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.storage import Put, open_store
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.channels import Action, Content
from cdp_orchestration.channels.inapp import InboxChannel
from cdp_orchestration.dispatch import Opens
from cdp_orchestration.state import OUTCOMES, PERSONS, SENDS, prepare_store


async def test_reading_an_inbox_message_reports_it_opened_once():
    posted: list[list[dict]] = []
    answers = [False, True, True]  # the collector refuses the first post

    async def report(events: list[dict]) -> bool:
        posted.append(events)
        return answers.pop(0)

    async with open_store("memory://") as store:
        await prepare_store(store)
        inbox = await InboxChannel(store).start()
        api = OrchestrationApi(
            journeys=None,  # type: ignore[arg-type]
            store=store,
            bus=None,  # type: ignore[arg-type]
            partitions=2,
            inbox=inbox,
            opens=Opens(store, report),
        )
        await store.bulk_write(
            [
                Put(PERSONS, "ada", {"ids": {"user_id": "ada-42", "anonymous_id": "visitor-7"}}),
                Put(SENDS, "a1", {"person_id": "ada", "event": {"properties": {"journey_id": "welcome"}}}),
            ]
        )
        for action_id in ("a1", "a2"):
            await inbox.add(Action(action_id, "ada", "inapp", Content(body="hi", title="Hello")))

        first = await api.MarkInboxRead(pb.MarkInboxReadRequest(person_id="ada", message_ids=["a1"]), None)
        again = await api.MarkInboxRead(pb.MarkInboxReadRequest(person_id="ada", message_ids=["a1"]), None)
        second = await api.MarkInboxRead(pb.MarkInboxReadRequest(person_id="ada", message_ids=["a2"]), None)

        assert (first.marked, again.marked, second.marked) == (1, 0, 1)
        # Refused, then posted again with the next call; a second read of a1 opened nothing new.
        assert [[e["messageId"] for e in batch] for batch in posted] == [
            ["outcome:a1:opened"],
            ["outcome:a1:opened"],
            ["outcome:a2:opened"],
        ]
        opened = posted[1][0]
        assert opened["event"] == "Message Opened" and opened["userId"] == "ada-42"
        assert opened["properties"]["journey_id"] == "welcome" and opened["properties"]["channel"] == "inapp"
        assert all(r.doc["reported"] is True for r in await store.find(OUTCOMES, "person_id", "ada"))
