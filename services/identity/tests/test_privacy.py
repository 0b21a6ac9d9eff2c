"""Privacy deletion inside identity, with a real nats-server: the service (its own `setup`, the memory
store) resolves a person's events, a `PrivacyDeleted` arrives on `privacy.deleted`, and afterwards no
collection of the store holds any of the person's identifier values, person ids or event ids, while the
people around them keep what is theirs."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import pytest
from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.privacy.v1 import privacy_pb2
from cdp_identity.__main__ import setup
from cdp_identity.engine import CHECKPOINTS, FORGOTTEN, IDENTIFIERS, MERGES, OUTBOX, PERSONS
from cdp_identity.matching_service import MODEL, RECORDS, REVIEWS
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus import PubResult
from cdp_kit.service import serving
from cdp_kit.storage import Delete

COLLECTIONS = (IDENTIFIERS, PERSONS, MERGES, OUTBOX, CHECKPOINTS, RECORDS, MODEL, REVIEWS, FORGOTTEN)

# Ada's identifiers as sent, and as the graph keys them (normalised).
ADA_USER, ADA_EMAIL, ADA_PHONE = "ada-7731", "Ada.Lovelace@Example.com", "+44 20 7946 0958"
ADA_KEYS = [
    "user_id:ada-7731",
    "email:ada.lovelace@example.com",
    "phone:+442079460958",
    "anonymous_id:ada-phone-anon",
    "anonymous_id:ada-laptop-anon",
    "device_id:ada-laptop",
    "salesforce_id:SF-ADA-1815",
]


def event(message_id: str, *, user: str = "", anon: str = "", device: str = "", **traits: str) -> events_pb2.Event:
    message = events_pb2.Event(
        message_id=message_id, type=events_pb2.EVENT_TYPE_IDENTIFY, user_id=user, anonymous_id=anon
    )
    if device:
        message.context.device.id = device
    if traits:
        message.traits.CopyFrom(struct_pb2.Struct())
        message.traits.update(traits)
    return message


ADA_EVENTS = [
    event("evt-ada-laptop", anon="ada-laptop-anon", device="ada-laptop"),
    event("evt-ada-signup", user=ADA_USER, anon="ada-phone-anon", email=ADA_EMAIL, phone=ADA_PHONE),
    event("evt-ada-signin", user=ADA_USER, anon="ada-laptop-anon"),  # merges the laptop's person into hers
    event("evt-ada-kiosk", user=ADA_USER, anon="kiosk-visitor"),  # a wrong merge, undone below
    event("evt-ada-on-bobs-phone", user=ADA_USER, device="bob-phone"),  # bob's phone: dropped, evidence on it
]
OTHER_EVENTS = [
    event("evt-bob", user="bob-1", device="bob-phone", email="bob@example.com"),
    event("evt-kiosk", anon="kiosk-visitor"),
    event("evt-bob-on-adas-laptop", user="bob-1", device="ada-laptop"),  # a drop on bob naming ada's laptop
]


@pytest.fixture(params=["warm", "cold"])
async def identity(request, nats_server, nats_client, tmp_path):
    """The service; "cold" runs it on SQLite and restarts it before the deletion, so the purge finds the
    records naming the person in the store, not in its cache."""
    settings = IdentitySettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        store_url="memory://" if request.param == "warm" else f"sqlite:///{tmp_path / 'identity.db'}",
        partitions=1,
        batch_size=10,
        shutdown_grace=1.0,
    )
    identity = Identity(settings, nats_client.jetstream(), restart=request.param == "cold")
    try:
        yield identity
    finally:
        await identity.stop()


class Identity:
    def __init__(self, settings: IdentitySettings, js, *, restart: bool) -> None:
        self.settings = settings
        self.js = js
        self.restart = restart
        self._serving = None
        self.sent = 0
        self.deletions = 0

    async def start(self) -> None:
        self._serving = serving(self.settings, setup)
        self.runtime = await self._serving.__aenter__()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.runtime.grpc.port}")
        self.stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.store = self.runtime.parts["store"]
        self.sent = self.deletions = 0  # the runners count from zero again

    async def stop(self) -> None:
        if self._serving is not None:
            await self.channel.close()
            serving_, self._serving = self._serving, None
            await serving_.__aexit__(None, None, None)

    async def cold_start(self) -> None:
        if self.restart:
            await self.stop()
            await self.start()

    async def send(self, *events: events_pb2.Event) -> None:
        for message in events:
            await self.js.publish(
                "events.raw.0", message.SerializeToString(), headers={"Nats-Msg-Id": message.message_id}
            )
        self.sent += len(events)
        await until(lambda: self.runtime.parts["runners"][0].handled >= self.sent, "events resolved")

    async def delete(self, request: privacy_pb2.PrivacyDeleted, msg_id: str) -> None:
        await self.js.publish("privacy.deleted", request.SerializeToString(), headers={"Nats-Msg-Id": msg_id})
        self.deletions += 1
        await until(lambda: self.runtime.parts["privacy_runner"].handled >= self.deletions, "privacy purge")

    async def person(self, kind: str, value: str) -> str:
        request = identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type=kind, value=value))
        return (await self.stub.Lookup(request)).person_id

    async def stored(self) -> dict[str, dict[str, dict]]:
        if not self.restart:
            # The memory store lists its collections only privately: each must be one the test reads.
            assert set(self.store._collections) <= set(COLLECTIONS)
        return {c: {r.key: r.doc async for r in self.store.scan_all(c)} for c in COLLECTIONS}


async def until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def not_found(call) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.NOT_FOUND, error.value.details()


async def test_a_deleted_person_leaves_no_trace_in_any_identity_collection(identity):
    await identity.start()
    stub = identity.stub
    await identity.send(*OTHER_EVENTS[:2], *ADA_EVENTS, OTHER_EVENTS[2])
    ada = await identity.person("user_id", ADA_USER)
    bob = await identity.person("user_id", "bob-1")
    graph = await stub.GetGraph(identity_pb2.GetGraphRequest(person_id=ada))
    merges = {m.cause.event_id: m for m in graph.merges}
    laptop, kiosk = merges["evt-ada-signin"].loser, merges["evt-ada-kiosk"].loser
    await stub.Unmerge(identity_pb2.UnmergeRequest(merge_id=merges["evt-ada-kiosk"].merge_id, reason="wrong"))
    await stub.SetQuarantine(
        identity_pb2.SetQuarantineRequest(
            identifier=identity_pb2.Identifier(type="device_id", value="ada-laptop"), quarantined=True
        )
    )
    # Ada's CRM contact, and another Ada Lovelace close enough to wait for a review.
    matched = await stub.MatchRecords(
        identity_pb2.MatchRecordsRequest(
            apply=True,
            records=[
                identity_pb2.MatchRecord(
                    id="contact-ada",
                    source="crm",
                    identifiers=[
                        identity_pb2.Identifier(type="salesforce_id", value="SF-ADA-1815"),
                        identity_pb2.Identifier(type="email", value=ADA_EMAIL),
                    ],
                    fields={"first_name": "Ada", "last_name": "Lovelace", "zip": "W1", "dob": "1815-12-10"},
                ),
                identity_pb2.MatchRecord(
                    id="contact-other",
                    source="crm",
                    identifiers=[identity_pb2.Identifier(type="salesforce_id", value="SF-OTHER-1990")],
                    fields={"first_name": "Adah", "last_name": "Loveless", "zip": "W1"},
                ),
            ],
        )
    )
    other = matched.persons[1]
    assert matched.persons[0] == ada and len(matched.review_ids) == 1
    before = await identity.stored()
    assert all(name in json.dumps(before) for name in (ada, laptop, "evt-ada-signup", "SF-ADA-1815", "1815-12-10"))
    # Records that stay name ada: bob's phone met her (quarantine evidence), bob's event dropped her
    # laptop, the kiosk visitor was split from her.
    assert ada in json.dumps(before[IDENTIFIERS]["device_id:bob-phone"])
    assert "device_id:ada-laptop" in json.dumps(before[PERSONS][bob]["drops"])
    assert ada in json.dumps(before[PERSONS][kiosk]["apart"])
    await identity.cold_start()
    stub = identity.stub

    # The profile saw bob's phone on one of ada's events, so its hash is listed too: it stays bob's.
    hashes = [hashlib.sha256(k.encode()).hexdigest() for k in [*ADA_KEYS, "device_id:bob-phone"]]
    request = privacy_pb2.PrivacyDeleted(
        request_id="req-1", person_id=ada, identifier_hashes=hashes, suppress=True, merged_person_ids=[laptop]
    )
    await identity.delete(request, "privacy:req-1")

    stored = await identity.stored()
    text = json.dumps(stored).lower()
    traces = [
        ada,
        laptop,
        *(key.split(":", 1)[1] for key in ADA_KEYS),
        *(e.message_id for e in ADA_EVENTS),
        "evt-bob-on-adas-laptop",  # bob's event, but its only record was the drop naming ada's laptop
        "contact-ada",
        "1815-12-10",
    ]
    assert [trace for trace in traces if trace.lower() in text] == []
    for key in ADA_KEYS:
        kind, value = key.split(":", 1)
        await not_found(identity.person(kind, value))
    await not_found(identity.person("email", ADA_EMAIL))
    for person in (ada, laptop):
        await not_found(stub.Lookup(identity_pb2.LookupRequest(person_id=person)))
        await not_found(stub.GetGraph(identity_pb2.GetGraphRequest(person_id=person)))

    # Everyone else keeps what is theirs.
    bobs = await stub.GetGraph(identity_pb2.GetGraphRequest(person_id=bob))
    assert {(i.identifier.type, i.identifier.value) for i in bobs.identifiers} == {
        ("user_id", "bob-1"),
        ("device_id", "bob-phone"),
        ("email", "bob@example.com"),
    }
    assert list(bobs.drops) == []
    assert list((await stub.GetGraph(identity_pb2.GetGraphRequest(person_id=kiosk))).apart) == []
    assert await identity.person("anonymous_id", "kiosk-visitor") == kiosk
    assert await identity.person("salesforce_id", "SF-OTHER-1990") == other
    assert set(stored[RECORDS]) == {"crm:contact-other"}
    assert list((await stub.ListReviews(identity_pb2.ListReviewsRequest())).reviews) == []

    # The same request again (a redelivery, a second notice): nothing changes.
    await identity.delete(request, "privacy:req-1:again")
    assert await identity.stored() == stored

    # Ada's user id seen again on an event the collector let through (it learned of the suppression a moment
    # late): the notice suppresses her, so identity drops the event too and nothing of her comes back. (After
    # a deletion without suppression, a later event makes a new person: test_deleted_stay_deleted.py.)
    await identity.send(event("evt-ada-returns", user=ADA_USER))
    await not_found(identity.person("user_id", ADA_USER))
    assert "evt-ada-returns" not in json.dumps(await identity.stored())


class FailingNotifications:
    """The bus refusing identity.* notifications (JetStream down for that stream): they wait in the outbox."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher

    async def publish_batch(self, messages):
        results = await self.publisher.publish_batch([m for m in messages if not m.subject.startswith("identity.")])
        passed = iter(results)
        return [
            PubResult(error="stream unavailable") if m.subject.startswith("identity.") else next(passed)
            for m in messages
        ]


async def test_a_deletion_while_notifications_naming_the_person_wait_in_the_outbox(identity):
    await identity.start()
    engine = identity.runtime.parts["engine"]
    engine.publisher = FailingNotifications(engine.publisher)
    await identity.send(
        event("evt-ada-laptop", anon="ada-laptop-anon"), event("evt-ada", user=ADA_USER, email=ADA_EMAIL)
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:  # merged and stored; its notification is not published
        await identity.stub.Resolve(
            identity_pb2.ResolveRequest(
                identifiers=[
                    identity_pb2.Identifier(type="user_id", value=ADA_USER),
                    identity_pb2.Identifier(type="anonymous_id", value="ada-laptop-anon"),
                ]
            )
        )
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    ada = await identity.person("user_id", ADA_USER)
    assert (await identity.stored())[OUTBOX], "the merge notification waits in the outbox"

    await identity.delete(privacy_pb2.PrivacyDeleted(request_id="req-1", person_id=ada), "privacy:req-1")

    for kind, value in (("user_id", ADA_USER), ("email", ADA_EMAIL), ("anonymous_id", "ada-laptop-anon")):
        await not_found(identity.person(kind, value))
    assert (await identity.stored())[OUTBOX] == {}


class HeldPurge:
    """The store with the purge's write (the one deleting persons) held until released."""

    def __init__(self, store) -> None:
        self._store = store
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def bulk_write(self, ops):
        if any(isinstance(op, Delete) and op.collection == PERSONS for op in ops):
            self.holding.set()
            await self.release.wait()
        return await self._store.bulk_write(ops)


async def test_lookups_while_and_after_a_deletion_is_written_find_nobody(identity):
    await identity.start()
    await identity.send(*ADA_EVENTS[:3])
    ada = await identity.person("user_id", ADA_USER)
    engine = identity.runtime.parts["engine"]
    held = engine.store = HeldPurge(engine.store)
    request = privacy_pb2.PrivacyDeleted(request_id="req-1", person_id=ada)
    await identity.js.publish("privacy.deleted", request.SerializeToString(), headers={"Nats-Msg-Id": "privacy:req-1"})
    await asyncio.wait_for(held.holding.wait(), 15)

    # The purge is decided but its write has not landed: the store still holds her records.
    await not_found(identity.person("user_id", ADA_USER))
    await not_found(identity.person("email", ADA_EMAIL))
    held.release.set()
    identity.deletions += 1
    await until(lambda: identity.runtime.parts["privacy_runner"].handled >= 1, "privacy purge")

    for kind, value in (("user_id", ADA_USER), ("email", ADA_EMAIL), ("anonymous_id", "ada-laptop-anon")):
        await not_found(identity.person(kind, value))
    await not_found(identity.stub.Lookup(identity_pb2.LookupRequest(person_id=ada)))


async def test_an_identifier_whose_person_is_gone_is_not_found(identity):
    """What a purge on another replica can leave in the store for a while: the identifier's record,
    naming a person that no longer exists."""
    await identity.start()
    await identity.store.put(
        IDENTIFIERS, "user_id:ghost", {"person": "p_purged", "first_seen": 1, "event_id": "e1", "conflicts": []}
    )
    for _ in range(2):  # and stays so (nothing stale is cached)
        await not_found(identity.person("user_id", "ghost"))
    await identity.send(event("evt-ghost-returns", user="ghost"))  # seen again: a person of its own
    returned = await identity.person("user_id", "ghost")
    assert returned != "p_purged"
