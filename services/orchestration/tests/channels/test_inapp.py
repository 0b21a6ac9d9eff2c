"""The in-app inbox on a real store: once per action, newest first, read marks, live subscriptions."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from cdp_kit.errors import InvalidArgument, NotFound
from cdp_kit.storage import open_store
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.inapp import InboxChannel, SubscriberLagged


@pytest.fixture
async def inbox(tmp_path):
    ticks = itertools.count(1_700_000_000)
    async with open_store(f"sqlite:///{tmp_path}/inbox.db") as store:
        channel = await InboxChannel(store, queue_size=3, clock=lambda: float(next(ticks))).start()
        yield channel
        await channel.close()


def note(action_id: str, person_id: str = "person-1", title: str = "Hello") -> Action:
    return Action(
        action_id=action_id,
        person_id=person_id,
        channel="inapp",
        content=Content(title=title, body="Your points expire soon", url="app://points", data={"points": "120"}),
    )


async def test_messages_list_newest_first_and_a_redelivered_action_is_stored_once(inbox):
    for action_id in ("a1", "a2", "a3"):
        assert (await inbox.send(note(action_id))).status == "accepted"
    assert (await inbox.send(note("a2"))).status == "accepted"
    await inbox.send(note("b1", person_id="person-2"))

    messages, next_token = await inbox.list("person-1")
    assert [m.message_id for m in messages] == ["a3", "a2", "a1"] and next_token is None
    assert (messages[0].title, messages[0].body, messages[0].url, messages[0].data) == (
        "Hello",
        "Your points expire soon",
        "app://points",
        {"points": "120"},
    )

    first, token = await inbox.list("person-1", page_size=2)
    rest, token2 = await inbox.list("person-1", page_size=2, page_token=token)
    assert [m.message_id for m in first + rest] == ["a3", "a2", "a1"] and token2 is None


async def test_mark_read_counts_what_was_unread_and_guards_other_peoples_messages(inbox):
    for action_id in ("a1", "a2"):
        await inbox.send(note(action_id))
    await inbox.send(note("b1", person_id="person-2"))
    assert await inbox.mark_read("person-1", ["a1"]) == ["a1"]
    assert await inbox.mark_read("person-1", ["a1", "a2"]) == ["a2"]
    unread, _ = await inbox.list("person-1", unread_only=True)
    assert unread == []
    with pytest.raises(NotFound) as raised:
        await inbox.mark_read("person-1", ["b1"])
    assert "b1" not in str(raised.value)
    (theirs,), _ = await inbox.list("person-2")
    assert theirs.read_at_ms is None


async def test_a_subscriber_gets_each_new_message_once(inbox):
    async with inbox.subscribe("person-1") as subscription:
        await inbox.send(note("a1"))
        await inbox.send(note("a1"))  # redelivered: no second notification
        await inbox.send(note("b1", person_id="person-2"))
        await inbox.send(note("a2"))
        received = [await anext(subscription), await anext(subscription)]
        assert [m.message_id for m in received] == ["a1", "a2"]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(subscription), 0.05)


async def test_a_subscriber_that_falls_behind_is_ended_not_buffered_for_ever(inbox):
    subscription = inbox.subscribe("person-1")
    for n in range(5):
        await inbox.send(note(f"a{n}"))
    assert [(await anext(subscription)).message_id for _ in range(3)] == ["a0", "a1", "a2"]
    with pytest.raises(SubscriberLagged):
        await anext(subscription)
    messages, _ = await inbox.list("person-1")
    assert len(messages) == 5  # nothing is lost: the app re-lists


async def test_closing_ends_subscriptions(inbox):
    subscription = inbox.subscribe("person-1")
    waiting = asyncio.ensure_future(anext(subscription))
    await asyncio.sleep(0)
    await inbox.close()
    with pytest.raises(StopAsyncIteration):
        await waiting


async def test_bad_person_ids_name_the_field(inbox):
    with pytest.raises(InvalidArgument, match="person_id"):
        await inbox.list("person/1")
    outcome = await inbox.send(note("a1", person_id="p/1"))
    assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "invalid_person_id", False)


async def test_a_privacy_deletion_empties_the_inbox_and_ends_subscriptions(inbox):
    subscription = inbox.subscribe("person-1")
    for action_id in ("a1", "a2"):
        await inbox.send(note(action_id))
    await inbox.send(note("b1", person_id="person-2"))
    assert await inbox.forget("person-1") == 2
    assert (await inbox.list("person-1"))[0] == []
    assert [m.message_id for m in (await inbox.list("person-2"))[0]] == ["b1"]
    assert [m.message_id async for m in subscription] == ["a1", "a2"]  # what was queued, then the end
    # The action ids are free again: a later action with the same id is not mistaken for a duplicate.
    await inbox.send(note("a1"))
    assert [m.message_id for m in (await inbox.list("person-1"))[0]] == ["a1"]
