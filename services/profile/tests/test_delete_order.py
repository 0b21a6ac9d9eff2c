"""A deletion's `removed` change comes after every change of the person applied before it.

Scoring and segmentation drop a person when their `removed` change arrives on profiles.changed, and take up
any later change of them as a new person from its values. A change applied before the deletion but not yet
stored by JetStream (in flight, or retried through an outage) was published after the deletion's own
`removed` when the deletion's retry came first: the person's traits were back downstream, for good. The
deletion now publishes `removed` once every change applied before it is stored (privacy.py, QUIET_WAIT)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import nats
import pytest
from nats.js.api import DiscardPolicy

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.errors import Unavailable
from cdp_profile import privacy as privacy_module

USER = "u-order"
PERSON = "p-order"


def identify(message_id: str, colour: str) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id=USER)
    event.traits.update({"favcolor": colour})
    event.timestamp.FromNanoseconds(int(time.time() * 1e9))
    event.received_at.CopyFrom(event.timestamp)
    return events_pb2.ResolvedEvent(event=event, person_id=PERSON, identifiers=[f"user_id:{USER}"])


async def person_changes(js) -> list[tuple[bool, str]]:
    """(removed, favcolor) of each change of PERSON on PROFILES, in stream order."""
    info = await js.stream_info("PROFILES")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        batch = profile_pb2.ProfileChangedBatch.FromString((await js.get_msg("PROFILES", seq)).data)
        for change in batch.changes:
            if change.person_id == PERSON:
                colour = change.traits["favcolor"].string_value if "favcolor" in change.traits else ""
                out.append((change.removed, colour))
    return out


async def test_a_change_held_back_by_jetstream_is_published_before_the_persons_removed_change(
    running_engine, nats_server, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(privacy_module, "RETRY_EVERY", 0.2)  # the deletion's retry comes long before the engine's
    monkeypatch.setattr(privacy_module, "QUIET_WAIT", 1.0)
    caplog.set_level(logging.WARNING, logger="cdp")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    async with running_engine(
        f"sqlite:///{tmp_path / 'profile.db'}", hash_key="platform-identifier-hash-key-0123456789", name="delete-order"
    ) as engine:
        try:
            await engine.feed(identify("e-1", "teal"))
            info = await js.stream_info("PROFILES")
            # PROFILES takes nothing more (a full stream, as in an outage of its disk): the next change of the
            # person is applied and committed, and the engine retries its publish (backing off up to 2 s).
            await js.update_stream(
                dataclasses.replace(info.config, max_msgs=info.state.messages, discard=DiscardPolicy.NEW)
            )
            await engine.feed(identify("e-2", "crimson"))
            # Its fourth refusal puts the engine's next try 2 s away (publish_backoff), while the deletion's own
            # retry comes each 0.2 s: the order the old code got wrong.
            deadline = time.monotonic() + 30  # a guard, not a speed figure
            while sum("not stored; retrying" in r.getMessage() for r in caplog.records) < 4:
                assert time.monotonic() < deadline, "the engine never retried the change's publish"
                await asyncio.sleep(0.05)
            with pytest.raises(Unavailable, match="retry the request"):
                await engine.delete(PERSON, suppress=False, request_id="r-order")
            await js.update_stream(info.config)  # JetStream takes them again

            deadline = time.monotonic() + 30  # a guard, not a speed figure
            while not {(True, ""), (False, "crimson")} <= set(changes := await person_changes(js)):
                assert time.monotonic() < deadline, f"not both published: {changes}"
                await asyncio.sleep(0.1)
            assert changes[-1] == (True, ""), changes  # nothing of the person after their removal
            assert changes.count((True, "")) == 1, changes
        finally:
            await nc.close()
