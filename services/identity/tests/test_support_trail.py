"""What a support engineer needs to see, with a real nats-server and the service's own `setup`:

1. An undone merge leaves a trail: the graph keeps it (merge id, cause, when merged, when undone, by which
   token, the reason) on both persons, across a restart, and an audit line gives the ids (never the reason's
   text or an identifier); `identity.unmerged` names the identifiers given back, for profile to drop.
2. Identifiers left out of events are counted and logged per source (a configured id) and reason: an app
   build that stopped sending `context.userHash` shows as its source's `unverified_claim` drops.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.__main__ import setup
from cdp_identity.engine import PERSONS
from cdp_identity.settings import IdentitySettings
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import subjects
from cdp_kit.service import serving
from cdp_testing.metrics import MetricsCapture

SUPPORT = [("authorization", "Bearer support-token")]
REASON = "shared tablet (ticket 4711)"


def settings(nats_url: str, tmp_path) -> IdentitySettings:
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("support-ann", "support-token", ["identity:read", "identity:write", "identity:admin"])])
    key_file = tmp_path / "privacy-hash.key"
    key_file.write_text("support-trail-test-identifier-hash-key-0123\n")
    return IdentitySettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="tokens",
        auth_tokens_file=tokens,
        privacy_hash_key_file=key_file,
        store_url=f"sqlite:///{tmp_path / 'identity.db'}",
        partitions=1,
        batch_size=10,
        shutdown_grace=1.0,
    )


class Identity:
    def __init__(self, settings: IdentitySettings, nc) -> None:
        self.settings = settings
        self.js = nc.jetstream()
        self._serving = None
        self.sent = 0

    async def start(self) -> None:
        self._serving = serving(self.settings, setup)
        self.runtime = await self._serving.__aenter__()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.runtime.grpc.port}")
        self.stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.engine = self.runtime.parts["engine"]
        self.sent = 0

    async def stop(self) -> None:
        if self._serving is not None:
            await self.channel.close()
            serving_, self._serving = self._serving, None
            await serving_.__aexit__(None, None, None)

    async def resolve(self, *pairs: tuple[str, str]) -> str:
        request = identity_pb2.ResolveRequest(identifiers=[identity_pb2.Identifier(type=t, value=v) for t, v in pairs])
        return (await self.stub.Resolve(request, metadata=SUPPORT)).person_id

    async def send(self, *events: events_pb2.Event) -> None:
        for message in events:
            await self.js.publish(
                "events.raw.0", message.SerializeToString(), headers={"Nats-Msg-Id": message.message_id}
            )
        self.sent += len(events)
        deadline = asyncio.get_running_loop().time() + 15.0
        while self.runtime.parts["runners"][0].handled < self.sent:
            assert asyncio.get_running_loop().time() < deadline, "timed out waiting for the events to be handled"
            await asyncio.sleep(0.02)


@pytest.fixture
async def identity(nats_server, nats_client, tmp_path):
    running = Identity(settings(nats_server.url, tmp_path), nats_client)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


async def test_an_undone_merge_stays_on_the_graph_with_its_cause_time_caller_and_reason(identity, caplog):
    """support repro r3: gina signs in on the family tablet Hal used; the merge is undone."""
    caplog.set_level(logging.INFO)
    gina = await identity.resolve(("user_id", "gina"), ("anonymous_id", "gina-phone"))
    hal = await identity.resolve(("anonymous_id", "tablet"), ("email", "hal@example.com"))
    await identity.resolve(("user_id", "gina"), ("anonymous_id", "tablet"))
    graph = await identity.stub.GetGraph(identity_pb2.GetGraphRequest(person_id=gina), metadata=SUPPORT)
    (merge,) = graph.merges
    assert (merge.winner, merge.loser) == (gina, hal)

    caplog.clear()
    split = await identity.stub.Unmerge(
        identity_pb2.UnmergeRequest(merge_id=merge.merge_id, reason=REASON), metadata=SUPPORT
    )
    assert (split.winner, split.loser) == (gina, hal)

    def trail(person: str) -> list[dict]:
        return identity.engine.graph.describe(person)["undone"]

    # The graph (what GetGraph reads) keeps the undone merge on both sides: id, cause, when, by whom, why.
    for person in (gina, hal):
        (undone,) = trail(person)
        assert undone["id"] == merge.merge_id
        assert (undone["winner"], undone["loser"]) == (gina, hal)
        assert undone["at"] == merge.at.ToMilliseconds()
        assert undone["cause"]["rule"] == merge.cause.rule and undone["cause"]["event_id"] == merge.cause.event_id
        assert undone["undone_at"] >= undone["at"]
        assert (undone["undone_by"], undone["reason"]) == ("support-ann", REASON)
    graph = await identity.stub.GetGraph(identity_pb2.GetGraphRequest(person_id=gina), metadata=SUPPORT)
    assert list(graph.merges) == [] and list(graph.apart) == [hal]
    (shown,) = graph.unmerged
    assert shown.merge == merge and (shown.undone_by, shown.reason) == ("support-ann", REASON)
    assert shown.undone_at.ToMilliseconds() >= merge.at.ToMilliseconds()

    # An audit line with the ids and the caller; not the reason's text, no identifier.
    audits = [r for r in caplog.records if getattr(r, "audit", False) and getattr(r, "merge_id", "") == merge.merge_id]
    assert len(audits) == 1
    line = audits[0]
    assert (line.winner, line.loser, line.caller, line.levelno) == (gina, hal, "support-ann", logging.INFO)
    assert [t for t in ("4711", "tablet", "hal@example.com", "gina-phone") if t in caplog.text] == []

    # Profile is told which identifiers went back to hal: the tablet's anonymous id among them.
    info = await identity.js.stream_info(subjects.IDENTITY)
    unmerged = []
    for seq in range(info.state.first_seq or 1, (info.state.last_seq or 0) + 1):
        message = await identity.js.get_msg(subjects.IDENTITY, seq)
        if message.subject.startswith("identity.unmerged"):
            unmerged.append(identity_pb2.IdentityUnmerged.FromString(message.data))
    (notice,) = unmerged
    assert notice.merge_id == merge.merge_id and notice.reason == REASON
    given_back = {(i.type, i.value) for i in notice.loser_identifiers}
    assert given_back == {("anonymous_id", "tablet"), ("email", "hal@example.com")}

    # Stored: a restart (a cold cache) reads the same trail.
    await identity.stop()
    await identity.start()
    await identity.stub.GetGraph(identity_pb2.GetGraphRequest(person_id=hal), metadata=SUPPORT)
    await identity.stub.GetGraph(identity_pb2.GetGraphRequest(person_id=gina), metadata=SUPPORT)
    assert [u["reason"] for u in trail(gina)] == [REASON] and [u["id"] for u in trail(hal)] == [merge.merge_id]
    stored = await identity.engine.store.get(PERSONS, gina)
    assert json.dumps(stored.doc["undone"]).count(merge.merge_id) == 1


async def test_identifiers_left_out_are_counted_and_logged_per_source(identity, caplog):
    """support repro r6: the iOS source has an identity_secret, and a build stopped sending userHash."""
    caplog.set_level(logging.INFO)
    metrics = MetricsCapture("identity")
    identity.engine._drops = metrics.telemetry.meter.create_counter("cdp.identity.drops")
    await identity.resolve(("user_id", "ivy"), ("email", "ivy@example.com"))

    def unverified(n: int) -> events_pb2.Event:
        return events_pb2.Event(
            message_id=f"ios-{n}",
            type=events_pb2.EVENT_TYPE_TRACK,
            event="Order Completed",
            user_id="ivy",
            anonymous_id="ivy-device",
            source_id="ios",
            source_trust=events_pb2.SOURCE_TRUST_CLIENT_UNVERIFIED,
        )

    caplog.clear()
    await identity.send(unverified(1), unverified(2), unverified(3))
    _, points = metrics.collected()["cdp.identity.drops"]
    counted = {(p.attributes["source"], p.attributes["reason"]): p.value for p in points}
    assert counted == {("ios", "unverified_claim"): 3}
    told = [r for r in caplog.records if getattr(r, "source", None) == "ios"]
    # Rate-limited: one line for the batch, naming the source, the reason and the types, never a value.
    assert len(told) == 1
    assert (told[0].levelno, told[0].reason, set(told[0].identifier_types)) == (
        logging.WARNING,
        "unverified_claim",
        {"user_id"},
    )
    assert "ios" in told[0].getMessage() and "unverified_claim" in told[0].getMessage()
    await identity.send(unverified(4))
    assert len([r for r in caplog.records if getattr(r, "source", None) == "ios"]) == 1
    assert [t for t in ("ivy", "ivy-device") if t in caplog.text] == []
