"""A deletion that JetStream does not take at once is still completed, by itself, as soon as it does.

A privacy trial paused nats-server (SIGSTOP) and deleted a person: the request answered UNAVAILABLE ("retry
the request"), its notice reached PRIVACY later, but the person's `removed` change, held only in memory,
was never published - scoring and segmentation kept the person's traits, in their stores and exports, for
good - and profile's own files were never erased. The same request repeated answered from its stored
result, and by person id NOT_FOUND: nothing completed it. Now the deletion stays pending until all of it is
done, retried in the background and by the repeated request."""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.errors import NotFound, Unavailable
from cdp_profile import privacy as privacy_module
from cdp_profile.records import DELETIONS

COLOUR = "ultramarine-zq-0451"  # a trait value found nowhere else
ACK_WAIT_PAUSED = 0.5  # seconds a publish waits for JetStream's acknowledgement while the server is paused


def identify(message_id: str, person: str) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="u-k")
    event.traits.update({"favcolor": COLOUR})
    event.timestamp.FromNanoseconds(int(time.time() * 1e9))
    event.received_at.CopyFrom(event.timestamp)
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=["user_id:u-k"])


async def stream_messages(url: str, stream: str) -> list[bytes]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        if not info.state.messages:
            return []
        return [(await js.get_msg(stream, seq)).data for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    finally:
        await nc.close()


async def removed_changes(url: str) -> list[str]:
    return [
        change.person_id
        for data in await stream_messages(url, "PROFILES")
        for change in profile_pb2.ProfileChangedBatch.FromString(data).changes
        if change.removed
    ]


async def eventually(check, what: str, within: float = 60.0):
    deadline = time.monotonic() + within  # a guard against waiting for ever, not a speed figure
    while not (result := await check()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)
    return result


@pytest.fixture
async def platform(running_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(privacy_module, "RETRY_EVERY", 0.2)
    key = "platform-identifier-hash-key-0123456789"
    async with running_engine(
        f"sqlite:///{tmp_path / 'profile.db'}", hash_key=key, name="delete-unavailable"
    ) as engine:
        await engine.feed(identify("e-1", "p-k"))
        yield engine


def paused(server):
    """nats-server stopped for certain for the block (`NatsServer.paused`: os.kill returns before every
    thread has stopped, and a deletion's notice published in those milliseconds was acknowledged, so this
    module's deletions answered success about 1 run in 12, "DID NOT RAISE Unavailable")."""
    return server.paused()


@contextlib.contextmanager
def paused_acks(server, publisher):
    """`paused(server)`, the engine's publisher waiting ACK_WAIT_PAUSED for an acknowledgement meanwhile: none
    comes while the server is stopped, and each deletion's publish waited the publisher's 5 s for it (15 s of
    this module's 17). Its own wait is back before the server resumes."""
    kept = publisher.ack_timeout
    with paused(server):
        publisher.ack_timeout = ACK_WAIT_PAUSED
        try:
            yield
        finally:
            publisher.ack_timeout = kept


def store_files(tmp_path) -> list:
    return [path for path in tmp_path.iterdir() if path.name.startswith("profile.db")]


async def test_a_deletion_jetstream_did_not_take_is_completed_once_it_does(platform, nats_server, tmp_path):
    engine = platform
    assert any(COLOUR.encode() in path.read_bytes() for path in store_files(tmp_path))
    with paused_acks(nats_server, engine.publisher), pytest.raises(Unavailable, match="retry the request"):
        await engine.delete("p-k", suppress=False, request_id="r-paused")

    # Nobody repeats the request: the deletion completes by itself.
    assert await eventually(lambda: _has(removed_changes(nats_server.url), "p-k"), "no removed change for p-k")
    notices = [privacy_pb2.PrivacyDeleted.FromString(d) for d in await stream_messages(nats_server.url, "PRIVACY")]
    assert [n.request_id for n in notices] == ["r-paused"]

    async def completed():
        record = await engine.store.get(DELETIONS, "r-paused")
        return not record.doc.get("pending")

    await eventually(completed, "the deletion stayed pending")

    async def erased():  # the files erased (the write-ahead log truncated once no reader holds it)
        return not any(COLOUR.encode() in path.read_bytes() for path in store_files(tmp_path))

    await eventually(erased, "the person's trait is still in the store's files")
    # The repeated request answers the stored result, once.
    result = await engine.delete("p-k", suppress=False, request_id="r-paused")
    assert result["person_id"] == "p-k" and result["request_id"] == "r-paused"
    assert (await removed_changes(nats_server.url)).count("p-k") == 1


async def test_the_repeated_request_completes_the_deletion_and_answers_only_then(platform, nats_server, monkeypatch):
    engine = platform
    monkeypatch.setattr(privacy_module, "RETRY_EVERY", 3600)  # only the repeated request completes it here
    with paused_acks(nats_server, engine.publisher):
        with pytest.raises(Unavailable):
            await engine.delete("p-k", suppress=True, request_id="r-again")
        with pytest.raises(Unavailable):  # still paused: still not done, and it says so
            await engine.delete("p-k", suppress=True, request_id="r-again")
    result = await engine.delete("p-k", suppress=True, request_id="r-again")
    assert result["suppressed"] and result["person_id"] == "p-k"
    assert "p-k" in await removed_changes(nats_server.url)
    assert not (await engine.store.get(DELETIONS, "r-again")).doc.get("pending")


async def _has(found, person: str) -> bool:
    return person in await found


async def test_an_event_identity_still_gave_the_deleted_person_starts_no_profile_of_them(platform, nats_server):
    """Identity purges the person when the notice reaches it; until then (a second, or an outage like the one
    above) it still resolves the person's new events to the deleted id. Profile made a fresh profile of such
    an event: identity then forgot every identifier leading to it, so nobody could find it - an export or a
    deletion by identifier would never reach it (the privacy trial found one, and deleted it by id)."""
    engine = platform
    await engine.delete("p-k", suppress=False, request_id="r-1")
    await engine.feed(identify("e-late", "p-k"))  # received now, after the deletion
    with pytest.raises(NotFound, match="was deleted"):
        await engine.profile("p-k")
