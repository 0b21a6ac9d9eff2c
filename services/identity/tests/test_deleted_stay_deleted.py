"""Deleted persons stay deleted in identity, with a real nats-server and the service's own `setup`.

1. Events carrying a deleted person's identifier that identity resolves after the purge (it lags, or the
   collector learned of a suppression a moment late) are dropped - acknowledged, counted, never stored,
   never published, not dead letters: any of them when the deletion suppresses, those dated before the
   deletion (received before it, or happened before it and arrived after) when it does not.
2. A store restored from a copy taken before a deletion does not bring the person back: at start, before
   any event, identity purges every person a notice in PRIVACY names that the store still holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time

import grpc
import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.privacy.v1 import privacy_pb2
from cdp_identity.__main__ import setup
from cdp_identity.engine import CHECKPOINTS, FORGOTTEN, IDENTIFIERS, MERGES, OUTBOX, PERSONS
from cdp_identity.matching_service import MODEL, RECORDS, REVIEWS
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus import subjects
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.natsauth import OPERATOR, authorization_config, new_password, write_credentials
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import provision
from cdp_kit.service import serving
from cdp_testing.metrics import MetricsCapture

COLLECTIONS = (IDENTIFIERS, PERSONS, MERGES, OUTBOX, CHECKPOINTS, RECORDS, MODEL, REVIEWS, FORGOTTEN)
# What profile hashes a suppression with when it has no key file (CDP_AUTH_MODE=none): so does identity.
DEV_KEY = IdentifierHashKeys.for_development().current


def event(
    message_id: str,
    *,
    user: str = "",
    anon: str = "",
    email: str = "",
    received_ms: int | None = None,
    at_ms: int | None = None,
) -> events_pb2.Event:
    message = events_pb2.Event(
        message_id=message_id, type=events_pb2.EVENT_TYPE_IDENTIFY, user_id=user, anonymous_id=anon
    )
    if email:
        message.traits.update({"email": email})
    if received_ms is not None:
        message.received_at.FromMilliseconds(received_ms)
    if at_ms is not None:
        message.timestamp.FromMilliseconds(at_ms)
    return message


def notice(request_id: str, person: str, *, at_ms: int, suppress_keys: list[str] | None = None, merged=()):
    deleted = privacy_pb2.PrivacyDeleted(request_id=request_id, person_id=person, merged_person_ids=list(merged))
    deleted.at.FromMilliseconds(at_ms)
    if suppress_keys is not None:
        deleted.suppress = True
        deleted.identifier_hashes.extend(DEV_KEY.hash(k) for k in suppress_keys)
        deleted.identifier_hash_key_id = DEV_KEY.id
    return deleted


def now_ms() -> int:
    return int(time.time() * 1000)


class Identity:
    """The identity service, started and stopped on demand, with the stream it reads and what it published."""

    def __init__(self, settings: IdentitySettings, nc) -> None:
        self.settings = settings
        self.js = nc.jetstream()
        self._serving = None
        self.sent = 0
        self.deletions = 0
        self.metrics = MetricsCapture("identity")

    async def start(self) -> None:
        self._serving = serving(self.settings, setup)
        self.runtime = await self._serving.__aenter__()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.runtime.grpc.port}")
        self.stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.store = self.runtime.parts["store"]
        engine = self.runtime.parts["engine"]
        # The dropped events' counter, read back here (the service's own meter exports to Prometheus).
        engine._deleted_dropped = self.metrics.telemetry.meter.create_counter("cdp.identity.deleted.dropped")
        self.sent = self.deletions = 0  # the runners count from zero again

    async def stop(self) -> None:
        if self._serving is not None:
            await self.channel.close()
            serving_, self._serving = self._serving, None
            await serving_.__aexit__(None, None, None)

    async def send(self, *events: events_pb2.Event) -> None:
        for message in events:
            await self.js.publish(
                "events.raw.0", message.SerializeToString(), headers={"Nats-Msg-Id": message.message_id}
            )
        self.sent += len(events)
        await until(lambda: self.runtime.parts["runners"][0].handled >= self.sent, "events handled")

    async def delete(self, request: privacy_pb2.PrivacyDeleted) -> None:
        await self.js.publish(
            "privacy.deleted", request.SerializeToString(), headers={"Nats-Msg-Id": f"privacy:{request.request_id}"}
        )
        self.deletions += 1
        await until(lambda: self.runtime.parts["privacy_runner"].handled >= self.deletions, "privacy purge")

    async def person(self, kind: str, value: str) -> str | None:
        request = identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type=kind, value=value))
        try:
            return (await self.stub.Lookup(request)).person_id
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
            return None

    async def stored_text(self) -> str:
        return json.dumps({c: {r.key: r.doc async for r in self.store.scan_all(c)} for c in COLLECTIONS})

    async def published(self) -> dict[str, str]:
        """Every event identity published on events.resolved: message id -> person."""
        state = (await self.js.stream_info(subjects.EVENTS_RESOLVED)).state
        out: dict[str, str] = {}
        for seq in range(state.first_seq or 1, (state.last_seq or 0) + 1):
            batch = events_pb2.ResolvedEventBatch.FromString(
                (await self.js.get_msg(subjects.EVENTS_RESOLVED, seq)).data
            )
            out.update({resolved.event.message_id: resolved.person_id for resolved in batch.events})
        return out

    async def published_with(self, *message_ids: str) -> dict[str, str]:
        """`published()` once it holds `message_ids` (an event is handled before its batch is published).
        Events of the partition sent before them, if published at all, are published by then."""
        deadline = asyncio.get_running_loop().time() + 15.0
        while not set(message_ids) <= set(published := await self.published()):
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {message_ids} to be published"
            await asyncio.sleep(0.02)
        return published

    async def dead_letters(self) -> int:
        return (await self.js.stream_info(subjects.DLQ)).state.messages

    def dropped(self) -> dict[str, int]:
        _, points = self.metrics.collected().get("cdp.identity.deleted.dropped", ("", []))
        return {point.attributes["rule"]: point.value for point in points}


def identity_settings(nats_url: str, store_url: str = "memory://") -> IdentitySettings:
    return IdentitySettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        store_url=store_url,
        partitions=1,
        batch_size=10,
        shutdown_grace=1.0,
    )


@pytest.fixture
async def identity(nats_server, nats_client):
    running = Identity(identity_settings(nats_server.url), nats_client)
    try:
        yield running
    finally:
        await running.stop()


async def until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_suppressed_persons_events_resolved_after_the_deletion_are_dropped(identity):
    await identity.start()
    await identity.send(event("evt-before", user="u-gone", email="gone@example.com", anon="gone-browser"))
    gone = await identity.person("user_id", "u-gone")
    assert gone is not None
    at = now_ms()
    await identity.delete(
        notice("req-gone", gone, at_ms=at, suppress_keys=["user_id:u-gone", "email:gone@example.com"])
    )
    assert await identity.person("user_id", "u-gone") is None

    # The collector accepted these before it knew (or identity lags): received before and after the deletion.
    await identity.send(
        event("evt-late-1", user="u-gone", received_ms=at - 1000),
        event("evt-late-2", email="Gone@Example.com", anon="a-new-browser", received_ms=at + 60_000),
        event("evt-alive", user="u-alive", received_ms=at + 60_000),
    )
    for kind, value in (("user_id", "u-gone"), ("email", "gone@example.com"), ("anonymous_id", "a-new-browser")):
        assert await identity.person(kind, value) is None, f"{kind} of the deleted person is resolved again"
    published = await identity.published_with("evt-alive")
    assert "evt-late-1" not in published and "evt-late-2" not in published
    assert published["evt-alive"] == await identity.person("user_id", "u-alive")
    text = (await identity.stored_text()).lower()
    assert [t for t in ("u-gone", "gone@example.com", "evt-late", "a-new-browser") if t in text] == []
    assert identity.dropped() == {"suppressed": 2}
    assert await identity.dead_letters() == 0


async def test_events_received_before_a_deletion_are_dropped_and_later_ones_make_a_new_person(identity):
    """A deletion without suppression: identity lagged, and events the collector received before the
    deletion come after the purge. They were the deleted person's; an event received after it is not."""
    await identity.start()
    await identity.send(event("evt-1", user="u-gone", email="gone@example.com", anon="gone-browser"))
    gone = await identity.person("user_id", "u-gone")
    at = now_ms()
    await identity.delete(notice("req-gone", gone, at_ms=at))

    await identity.send(
        event("evt-lagging-1", user="u-gone", received_ms=at - 2000),
        event("evt-lagging-2", email="gone@example.com", received_ms=at - 1000),
        event("evt-lagging-3", anon="gone-browser", received_ms=at - 1000),
        # Her browser, someone else signing in on it before the deletion: his event, kept.
        event("evt-on-her-browser", user="u-other", anon="gone-browser", received_ms=at - 500),
    )
    assert await identity.person("user_id", "u-gone") is None
    assert await identity.person("email", "gone@example.com") is None
    other = await identity.person("user_id", "u-other")
    assert other is not None and await identity.person("anonymous_id", "gone-browser") == other
    published = await identity.published_with("evt-on-her-browser")
    assert [e for e in ("evt-lagging-1", "evt-lagging-2", "evt-lagging-3") if e in published] == []
    assert identity.dropped() == {"before_deletion": 3}

    # Received after the deletion: a new arrival, a new person with nothing of the old one.
    await identity.send(event("evt-returns", user="u-gone", received_ms=at + 1000))
    returned = await identity.person("user_id", "u-gone")
    assert returned not in (None, gone)
    assert (await identity.published_with("evt-returns"))["evt-returns"] == returned
    graph = await identity.stub.GetGraph(identity_pb2.GetGraphRequest(person_id=returned))
    assert [(i.identifier.type, i.identifier.value) for i in graph.identifiers] == [("user_id", "u-gone")]
    assert await identity.dead_letters() == 0


async def test_events_that_happened_before_a_deletion_and_arrive_after_it_are_dropped(identity):
    """The connector read a HubSpot edit of the person's contact, made before the deletion, and posted it
    after (its events carry the record's modification time; seen once in the privacy e2e run: the email
    resolved again, to a person made after the deletion). So with an offline device's queue. Happened
    before the deletion: the deleted person's, dropped. Happened after: a new arrival, a new person."""
    await identity.start()
    await identity.send(event("evt-1", user="u-gone", email="gone@example.com", anon="hubspot:1:501"))
    gone = await identity.person("user_id", "u-gone")
    at = now_ms()
    await identity.delete(notice("req-gone", gone, at_ms=at))

    await identity.send(
        event("evt-crm-edit", anon="hubspot:1:501", email="gone@example.com", at_ms=at - 3000, received_ms=at + 500),
        event("evt-offline", user="u-gone", at_ms=at - 60_000, received_ms=at + 900),
    )
    assert await identity.person("email", "gone@example.com") is None
    assert await identity.person("anonymous_id", "hubspot:1:501") is None
    assert await identity.person("user_id", "u-gone") is None
    assert identity.dropped() == {"before_deletion": 2}

    await identity.send(event("evt-returns", user="u-gone", at_ms=at + 1000, received_ms=at + 1000))
    returned = await identity.person("user_id", "u-gone")
    assert returned not in (None, gone)
    assert await identity.dead_letters() == 0


async def test_events_received_before_a_deletion_are_dropped_after_a_restart_too(nats_server, nats_client, tmp_path):
    """Identity purged the person while it lagged behind the collector, and restarted before it reached the
    events received before the deletion: the digests stored with the purge still drop them."""
    identity = Identity(identity_settings(nats_server.url, f"sqlite:///{tmp_path / 'identity.db'}"), nats_client)
    try:
        await identity.start()
        await identity.send(event("evt-1", user="u-gone", email="gone@example.com"))
        gone = await identity.person("user_id", "u-gone")
        at = now_ms()
        await identity.delete(notice("req-gone", gone, at_ms=at))
        await identity.stop()
        await identity.start()
        await identity.send(
            event("evt-lagging", user="u-gone", email="gone@example.com", received_ms=at - 1000),
            event("evt-alive", user="u-alive", received_ms=at - 1000),
        )
        assert await identity.person("user_id", "u-gone") is None
        assert await identity.person("email", "gone@example.com") is None
        assert await identity.person("user_id", "u-alive") is not None
        assert identity.dropped() == {"before_deletion": 1}
        text = (await identity.stored_text()).lower()
        assert [t for t in ("u-gone", "gone@example.com", "evt-lagging", gone.lower()) if t in text] == []
    finally:
        await identity.stop()


async def test_a_restored_store_does_not_bring_a_deleted_person_back(nats_server, nats_client, tmp_path, caplog):
    """architecture.md's recovery: stop, restore identity.db (with its -wal) from a copy taken before a
    deletion, start. The consumer of deletions is past the notice; the start applies it again."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "identity.db"
    identity = Identity(identity_settings(nats_server.url, f"sqlite:///{path}"), nats_client)
    try:
        await identity.start()
        await identity.send(
            event("evt-ada-browser", anon="ada-browser"),
            event("evt-ada", user="ada-1", email="ada@example.com"),
            event("evt-ada-signin", user="ada-1", anon="ada-browser"),  # merges the browser's person into hers
            event("evt-bob", user="bob-1", email="bob@example.com"),
        )
        ada = await identity.person("user_id", "ada-1")
        bob = await identity.person("user_id", "bob-1")
        graph = await identity.stub.GetGraph(identity_pb2.GetGraphRequest(person_id=ada))
        merged = [m.loser for m in graph.merges]
        assert len(merged) == 1
        await identity.stop()
        copy = tmp_path / "copy"
        copy.mkdir()
        for file in tmp_path.glob("identity.db*"):
            shutil.copy2(file, copy / file.name)

        await identity.start()
        await identity.delete(notice("req-ada", ada, at_ms=now_ms(), merged=merged))
        assert await identity.person("user_id", "ada-1") is None
        await identity.stop()
        for file in tmp_path.glob("identity.db*"):
            file.unlink()
        for file in copy.glob("identity.db*"):
            shutil.copy2(file, tmp_path / file.name)

        caplog.clear()
        await identity.start()
        for kind, value in (("user_id", "ada-1"), ("email", "ada@example.com"), ("anonymous_id", "ada-browser")):
            assert await identity.person(kind, value) is None, f"the restored store brought ada's {kind} back"
        for person in (ada, *merged):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await identity.stub.Lookup(identity_pb2.LookupRequest(person_id=person))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert await identity.person("user_id", "bob-1") == bob
        text = (await identity.stored_text()).lower()
        assert [t for t in (ada, *merged, "ada-1", "ada@example.com", "ada-browser", "evt-ada") if t in text] == []
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "req-ada" in r.getMessage()]
        assert len(warnings) == 1 and getattr(warnings[0], "persons", None) == 2
        assert "ada-1" not in caplog.text and "ada@example.com" not in caplog.text
        # Nothing published again: events.resolved holds the events of before, no more.
        before = ("evt-ada-browser", "evt-ada", "evt-ada-signin", "evt-bob")
        assert set(await identity.published_with(*before)) == set(before)

        # And it stays so: a second start finds nothing left to purge.
        await identity.stop()
        caplog.clear()
        await identity.start()
        assert await identity.person("user_id", "ada-1") is None
        assert [r for r in caplog.records if r.levelno == logging.WARNING and "req-ada" in r.getMessage()] == []
    finally:
        await identity.stop()


async def test_identity_reads_privacy_at_start_under_its_own_nats_user(tmp_path, monkeypatch):
    """As `make up` and the chart run it: identity's NATS user reads PRIVACY message by message at start
    (STREAM.INFO, MSG.GET: its role grants both on a stream it consumes), the server refuses nothing, and a
    suppressed person's event is dropped."""
    password = new_password()
    write_credentials(tmp_path / "identity.json", "identity", password)
    operator = new_password()
    server = NatsServer(store_dir=tmp_path / "nats")
    server.config = authorization_config({"identity": password}, operator_password=operator, partitions=1)
    server.start()
    try:
        nc = await nats.connect(server.url, user=OPERATOR, password=operator)
        try:
            await provision(nc.jetstream(), {"CDP_PARTITIONS": "1"})
            at = now_ms()
            suppressed = notice("req-gone", "p_gone", at_ms=at, suppress_keys=["user_id:u-gone"])
            await nc.jetstream().publish(
                "privacy.deleted", suppressed.SerializeToString(), headers={"Nats-Msg-Id": "privacy:req-gone"}
            )
            monkeypatch.setenv("CDP_NATS_CREDENTIALS_FILE", str(tmp_path / "identity.json"))
            identity = Identity(identity_settings(server.url), nc)
            try:
                await identity.start()
                identity.deletions = 1  # the notice above, on its consumer
                await until(lambda: identity.runtime.parts["privacy_runner"].handled >= 1, "privacy consumer")
                await identity.send(event("evt-gone", user="u-gone", received_ms=at + 1000))
                assert await identity.person("user_id", "u-gone") is None
                assert identity.dropped() == {"suppressed": 1}
            finally:
                await identity.stop()
        finally:
            await nc.close()
        refused = [line for line in server.log_path.read_text().splitlines() if "Violation" in line]
        assert refused == []
    finally:
        server.close()


async def test_resolve_and_match_records_do_not_make_a_deleted_person_again(identity):
    """gRPC callers (a CRM sync, a backfill) are held to the rules events are: a suppressed person's
    identifiers are refused by Resolve and MatchRecords, and so is a Resolve dated before a deletion; the
    answer names the rule and the identifier's position and type, never its value. Nothing is stored."""
    await identity.start()
    await identity.send(event("evt-gone", user="u-gone", email="gone@example.com"))
    await identity.send(event("evt-left", user="u-left", email="left@example.com"))
    gone = await identity.person("user_id", "u-gone")
    left = await identity.person("user_id", "u-left")
    at = now_ms()
    await identity.delete(
        notice("req-gone", gone, at_ms=at, suppress_keys=["user_id:u-gone", "email:gone@example.com"])
    )
    await identity.delete(notice("req-left", left, at_ms=at))

    def ident(kind: str, value: str) -> identity_pb2.Identifier:
        return identity_pb2.Identifier(type=kind, value=value)

    async def refused(call, request) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(request)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
        assert "gone@example.com" not in error.value.details() and "u-gone" not in error.value.details()
        return error.value

    error = await refused(
        identity.stub.Resolve,
        identity_pb2.ResolveRequest(
            identifiers=[ident("anonymous_id", "crm-browser"), ident("email", "Gone@Example.com")]
        ),
    )
    assert "identifiers[1] (email)" in error.details() and "suppress" in error.details()
    # Dated before the deletion: what the event path drops as received before it.
    stamp = identity_pb2.ResolveRequest(identifiers=[ident("user_id", "u-left")])
    stamp.at.FromMilliseconds(at - 60_000)
    error = await refused(identity.stub.Resolve, stamp)
    assert "identifiers[0] (user_id)" in error.details() and "before" in error.details()
    record = identity_pb2.MatchRecord(
        id="crm-7", source="crm", identifiers=[ident("salesforce_id", "003x"), ident("email", "gone@example.com")]
    )
    record.fields["first_name"] = "Gone"
    error = await refused(identity.stub.MatchRecords, identity_pb2.MatchRecordsRequest(records=[record]))
    assert "records[0].identifiers[1] (email)" in error.details()

    for kind, value in (("user_id", "u-gone"), ("email", "gone@example.com"), ("user_id", "u-left")):
        assert await identity.person(kind, value) is None, f"{kind} of a deleted person made again over gRPC"
    assert await identity.person("salesforce_id", "003x") is None
    text = (await identity.stored_text()).lower()
    assert [t for t in ("u-gone", "gone@example.com", "crm-7", "crm-browser") if t in text] == []

    # The same calls for a person deleted without suppression, dated now: a new arrival, as on the event path.
    made = await identity.stub.Resolve(identity_pb2.ResolveRequest(identifiers=[ident("user_id", "u-left")]))
    assert made.created and made.person_id != left
