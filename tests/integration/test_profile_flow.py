"""Collector → identity → profile with a real nats-server: profiles built from Segment-shaped events.

Events enter through the collector's Segment HTTP API; identity resolves them; the profile service is
read through ProfileService over gRPC and its change feed is read back from JetStream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import nats
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.service import serving
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings


@pytest.fixture
async def platform(edge, tmp_path):
    profile = ProfileSettings(
        **edge.common,
        store_url=f"sqlite:///{tmp_path / 'profile.db'}",
        identity_address=f"127.0.0.1:{edge.identity.grpc.port}",
    )
    async with serving(profile, profile_setup) as p:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc.port}") for r in (edge.identity, p)]
        try:
            yield Platform(
                edge,
                identity=identity_pb2_grpc.IdentityServiceStub(channels[0]),
                profile=profile_pb2_grpc.ProfileServiceStub(channels[1]),
                runtime=p,
            )
        finally:
            for channel in channels:
                await channel.close()


class Platform:
    def __init__(self, edge, identity, profile, runtime) -> None:
        self.edge = edge
        self.nats_url = edge.nats_url
        self.identity = identity
        self.profile = profile
        self.runtime = runtime

    async def send(self, *events: dict) -> dict:
        return await self.edge.send(*events)

    async def person_of(self, kind: str, value: str, timeout: float = 15.0) -> str:
        for _ in range(int(timeout / 0.05)):
            try:
                found = await self.identity.Lookup(
                    identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type=kind, value=value))
                )
                return found.person_id
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            await asyncio.sleep(0.05)
        raise AssertionError(f"no person for {kind}:{value}")

    async def merged_person(self, *identifiers: tuple[str, str], timeout: float = 15.0) -> str:
        """The person every one of `identifiers` resolves to, once identity has merged them into one."""
        for _ in range(int(timeout / 0.05)):
            persons = {await self.person_of(kind, value) for kind, value in identifiers}
            if len(persons) == 1:
                return persons.pop()
            await asyncio.sleep(0.05)
        raise AssertionError(f"{len(identifiers)} identifiers never resolved to one person")

    async def profile_when(self, person_id: str, ready, timeout: float = 15.0) -> profile_pb2.Profile:
        """GetProfile once `ready(profile)` holds (the pipeline is asynchronous)."""
        last = None
        for _ in range(int(timeout / 0.05)):
            try:
                last = await self.profile.GetProfile(
                    profile_pb2.GetProfileRequest(person_id=person_id, include_history=True)
                )
                if ready(last):
                    return last
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            await asyncio.sleep(0.05)
        raise AssertionError(f"profile of {person_id} never got ready; last seen:\n{last}")

    async def messages(self, stream: str) -> list:
        nc = await nats.connect(self.nats_url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            if not info.state.messages:
                return []
            return [await js.get_msg(stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
        finally:
            await nc.close()

    async def changes_when(self, person_id: str, ready, timeout: float = 15.0) -> bool:
        """Whether the person's published changes satisfy `ready` within `timeout` (they are published
        after the write that a read from memory may not wait for)."""
        for _ in range(int(timeout / 0.05)):
            if ready(await self.changes(person_id)):
                return True
            await asyncio.sleep(0.05)
        return False

    async def changes(self, person_id: str) -> list[profile_pb2.ProfileChanged]:
        out = []
        for msg in await self.messages("PROFILES"):
            assert msg.subject.startswith("profiles.changed.")
            out.extend(
                c for c in profile_pb2.ProfileChangedBatch.FromString(msg.data).changes if c.person_id == person_id
            )
        return out


def ts(text: str) -> str:
    return f"2026-{text}Z"


def stamp(text: str) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromJsonString(ts(text))
    return out


async def define(platform: Platform, **fields) -> profile_pb2.ComputedTraitStatus:
    where = fields.pop("where", None)
    definition = profile_pb2.ComputedTraitDefinition(**fields)
    if where:
        definition.where.update(where)
    return await platform.profile.DefineComputedTrait(profile_pb2.DefineComputedTraitRequest(definition=definition))


async def test_a_profile_is_built_from_sdk_events(platform):
    await define(platform, name="orders", op="count", event_names=["Order Completed"])
    await define(platform, name="revenue", op="sum", event_names=["Order Completed"], property="revenue")
    await define(platform, name="favourite_category", op="most_frequent", property="category")
    await platform.send(
        {"type": "page", "name": "Home", "messageId": "m1", "anonymousId": "anon-1", "timestamp": ts("11-01T10:00:00")},
        {
            "type": "identify",
            "messageId": "m2",
            "anonymousId": "anon-1",
            "userId": "user-1",
            "traits": {"email": "ada@example.com", "plan": "free"},
            "timestamp": ts("11-01T10:01:00"),
            "context": {"consent": {"categoryPreferences": {"Advertising": False, "Analytics": True}}},
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "m3",
            "userId": "user-1",
            "properties": {"revenue": 30, "category": "books"},
            "timestamp": ts("11-02T09:00:00"),
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "m4",
            "userId": "user-1",
            "properties": {"revenue": 12.5, "category": "books"},
            "timestamp": ts("11-03T09:00:00"),
        },
        {
            "type": "identify",
            "messageId": "m5",
            "userId": "user-1",
            "traits": {"plan": "pro"},
            "timestamp": ts("11-04T09:00:00"),
        },
    )
    person = await platform.person_of("user_id", "user-1")
    profile = await platform.profile_when(person, lambda p: p.event_count >= 5)
    assert profile.traits["plan"].value.string_value == "pro"
    assert profile.traits["email"].value.string_value == "ada@example.com"
    provenance = profile.traits["plan"].provenance
    assert (provenance.source, provenance.event_id) == ("web", "web:m5")
    assert provenance.at == stamp("11-04T09:00:00")
    assert [v.value.string_value for v in profile.traits["plan"].history] == ["free", "pro"]
    assert profile.computed["orders"].number_value == 2
    assert profile.computed["revenue"].number_value == pytest.approx(42.5)
    assert profile.computed["favourite_category"].string_value == "books"
    assert profile.consent["purpose:Advertising"].granted is False
    assert profile.consent["purpose:Analytics"].granted is True
    assert {"user_id:user-1", "email:ada@example.com", "anonymous_id:anon-1"} <= set(profile.identifiers)

    # "What did we know on 2 November?"
    then = await platform.profile.GetProfile(
        profile_pb2.GetProfileRequest(person_id=person, as_of=stamp("11-02T00:00:00"))
    )
    assert then.traits["plan"].value.string_value == "free"

    # The same profile through any identifier (identity answers who holds it).
    by_email = await platform.profile.LookupProfile(
        profile_pb2.LookupProfileRequest(identifier_type="email", identifier_value="ada@example.com")
    )
    assert by_email.person_id == person

    # The timeline, newest first, in pages.
    first = await platform.profile.ListEvents(profile_pb2.ListEventsRequest(person_id=person, page_size=2))
    assert [e.event_id for e in first.events] == ["web:m5", "web:m4"]
    second = await platform.profile.ListEvents(
        profile_pb2.ListEventsRequest(person_id=person, page_size=10, page_token=first.next_page_token)
    )
    assert [e.event_id for e in second.events] == ["web:m3", "web:m2", "web:m1"]
    assert not second.next_page_token
    orders = await platform.profile.ListEvents(
        profile_pb2.ListEventsRequest(person_id=person, names=["Order Completed"])
    )
    assert [e.properties["revenue"] for e in orders.events] == [12.5, 30]

    # The change feed says what changed, compactly.
    changes = await platform.changes(person)
    assert any(c.traits["plan"].string_value == "pro" for c in changes if "plan" in c.traits)
    assert any(c.computed["orders"].number_value == 2 for c in changes if "orders" in c.computed)
    assert any(c.consent.get("purpose:Advertising") is False for c in changes if c.consent)


async def test_a_late_older_trait_does_not_overwrite_a_newer_one(platform):
    await platform.send(
        {
            "type": "identify",
            "messageId": "n2",
            "userId": "u-late",
            "traits": {"city": "Berlin"},
            "timestamp": ts("10-02T00:00:00"),
        }
    )
    person = await platform.person_of("user_id", "u-late")
    await platform.profile_when(person, lambda p: "city" in p.traits)
    await platform.send(
        {
            "type": "identify",
            "messageId": "n1",
            "userId": "u-late",
            "traits": {"city": "Paris"},
            "timestamp": ts("10-01T00:00:00"),
        }
    )
    profile = await platform.profile_when(person, lambda p: len(p.traits["city"].history) == 2)
    assert profile.traits["city"].value.string_value == "Berlin"
    assert [v.value.string_value for v in profile.traits["city"].history] == ["Paris", "Berlin"]


async def test_merges_combine_profiles_and_unmerges_split_them_back(platform):
    await define(platform, name="spend", op="sum", event_names=["Order Completed"], property="revenue")
    await platform.send(
        {
            "type": "identify",
            "messageId": "a1",
            "userId": "phone-user",
            "anonymousId": "anon-phone",
            "traits": {"device": "phone"},
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "a2",
            "anonymousId": "anon-phone",
            "properties": {"revenue": 10},
        },
        {"type": "identify", "messageId": "b1", "anonymousId": "anon-laptop", "traits": {"email": "sam@example.com"}},
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "b2",
            "anonymousId": "anon-laptop",
            "properties": {"revenue": 5},
        },
    )
    phone = await platform.person_of("user_id", "phone-user")
    laptop = await platform.person_of("anonymous_id", "anon-laptop")
    assert phone != laptop
    await platform.profile_when(laptop, lambda p: p.computed["spend"].number_value == 5)
    await platform.profile_when(phone, lambda p: p.computed["spend"].number_value == 10)
    # Signing in on the laptop links the two devices: identity merges, the profiles combine.
    await platform.send({"type": "identify", "messageId": "c1", "userId": "phone-user", "anonymousId": "anon-laptop"})
    # The collector's answer does not wait for identity: until c1 is resolved, anon-laptop still names
    # the laptop's own person, which may be the one merged away. The merge is done once both ids name one.
    survivor = await platform.merged_person(("user_id", "phone-user"), ("anonymous_id", "anon-laptop"))
    absorbed = laptop if survivor == phone else phone
    merged = await platform.profile_when(survivor, lambda p: p.computed["spend"].number_value == 15)
    assert merged.traits["device"].value.string_value == "phone"
    assert merged.traits["email"].value.string_value == "sam@example.com"
    assert absorbed in merged.merged_from
    # The absorbed id answers with the survivor's profile.
    again = await platform.profile.GetProfile(profile_pb2.GetProfileRequest(person_id=absorbed))
    assert again.person_id == survivor
    # A read answers from memory as soon as the merge is applied; its changes are published once it is
    # written, a moment later.
    assert await platform.changes_when(survivor, lambda changes: any(absorbed in c.merged for c in changes))
    assert await platform.changes_when(absorbed, lambda changes: any(c.removed for c in changes))

    graph = await platform.identity.GetGraph(identity_pb2.GetGraphRequest(person_id=survivor))
    (merge,) = [m for m in graph.merges if m.loser == absorbed]
    await platform.identity.Unmerge(identity_pb2.UnmergeRequest(merge_id=merge.merge_id, reason="test"))
    restored = await platform.profile_when(absorbed, lambda p: p.person_id == absorbed)
    remaining = await platform.profile_when(survivor, lambda p: p.computed["spend"].number_value != 15)
    spends = {restored.computed["spend"].number_value, remaining.computed["spend"].number_value}
    assert spends == {10, 5}
    assert absorbed not in remaining.merged_from


async def test_back_office_writes_and_consent_reach_the_profile_and_the_feed(platform):
    await platform.send({"type": "identify", "messageId": "w1", "userId": "u-crm", "traits": {"tier": "silver"}})
    person = await platform.person_of("user_id", "u-crm")
    await platform.profile_when(person, lambda p: "tier" in p.traits)
    traits = struct_pb2.Struct()
    traits.update({"tier": "gold", "account_manager": "Lin"})
    response = await platform.profile.UpdateTraits(
        profile_pb2.UpdateTraitsRequest(
            person_id=person,
            traits=traits,
            source="salesforce",
            request_id="sf-1",
            consent={"channel:email": False},
        )
    )
    assert sorted(response.changed) == ["account_manager", "tier"]
    assert response.profile.traits["tier"].provenance.source == "salesforce"
    assert response.profile.consent["channel:email"].granted is False
    feed = [c for c in await platform.changes(person) if c.cause == "api"]
    assert feed and feed[-1].traits["tier"].string_value == "gold"
    assert feed[-1].consent["channel:email"] is False

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await platform.profile.UpdateTraits(
            profile_pb2.UpdateTraitsRequest(person_id=person, consent={"marketing": True})
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "consent" in bad.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await platform.profile.GetProfile(profile_pb2.GetProfileRequest(person_id="p_nobody"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_new_computed_trait_is_backfilled_with_progress(platform):
    events = []
    for user in range(5):
        for order in range(user + 1):
            events.append(
                {
                    "type": "track",
                    "event": "Order Completed",
                    "messageId": f"o{user}-{order}",
                    "userId": f"buyer-{user}",
                    "properties": {"revenue": 10 * (order + 1)},
                }
            )
    await platform.send(*events)
    persons = [await platform.person_of("user_id", f"buyer-{u}") for u in range(5)]
    for user, person in enumerate(persons):
        await platform.profile_when(person, lambda p, n=user + 1: p.event_count == n)
    status = await define(platform, name="max_order", op="max", event_names=["Order Completed"], property="revenue")
    assert status.state in ("backfilling", "ready")
    for _ in range(200):
        listed = await platform.profile.ListComputedTraits(profile_pb2.ListComputedTraitsRequest())
        (status,) = [t for t in listed.traits if t.definition.name == "max_order"]
        if status.state == "ready":
            break
        await asyncio.sleep(0.05)
    assert status.state == "ready"
    assert status.profiles_done == status.profiles_total >= 5
    for user, person in enumerate(persons):
        profile = await platform.profile.GetProfile(profile_pb2.GetProfileRequest(person_id=person))
        assert profile.computed["max_order"].number_value == 10 * (user + 1)

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await define(platform, name="avg_order", op="avg", event_names=["Order Completed"])
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "property" in bad.value.details()


async def test_delete_with_suppression_leaves_no_trace_and_is_announced(platform, tmp_path):
    await platform.send(
        {
            "type": "identify",
            "messageId": "d1",
            "userId": "u-gone",
            "anonymousId": "anon-gone",
            "traits": {"email": "gone@example.com", "name": "Grace Gone"},
        },
        {"type": "track", "event": "Viewed", "messageId": "d2", "userId": "u-gone", "properties": {"sku": "sku-gone"}},
    )
    person = await platform.person_of("user_id", "u-gone")
    await platform.profile_when(person, lambda p: p.event_count == 2)
    exported = json_format.MessageToDict(
        (await platform.profile.Export(profile_pb2.ExportRequest(person_id=person))).document
    )
    assert "Grace Gone" in json.dumps(exported) and "sku-gone" in json.dumps(exported)
    result = await platform.profile.Delete(
        profile_pb2.DeleteRequest(person_id=person, mode=profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE, request_id="r1")
    )
    assert result.suppressed and result.timeline_events == 2 and result.identifiers >= 3
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await platform.profile.GetProfile(profile_pb2.GetProfileRequest(person_id=person))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND

    (notice,) = [privacy_pb2.PrivacyDeleted.FromString(m.data) for m in await platform.messages("PRIVACY")]
    assert notice.person_id == person and notice.suppress and notice.request_id == "r1"
    # Keyed hashes (the platform here runs without auth: the published development key), not plain SHA-256.
    key = IdentifierHashKeys.for_development().current
    assert notice.identifier_hash_key_id == key.id
    assert key.hash("user_id:u-gone") in notice.identifier_hashes
    assert key.hash("email:gone@example.com") in notice.identifier_hashes
    assert hashlib.sha256(b"user_id:u-gone").hexdigest() not in notice.identifier_hashes
    assert any(c.removed and c.cause == "delete" for c in await platform.changes(person))

    # The collector now drops the person's new events, with the reason, by any of their identifiers.
    for attempt in range(100):
        answer = await platform.send(
            {"type": "track", "event": "Viewed", "messageId": f"d3-{attempt}", "userId": "u-gone"},
            {
                "type": "identify",
                "messageId": f"d4-{attempt}",
                "anonymousId": "x-1",
                "traits": {"email": "GONE@example.com"},
            },
            {"type": "track", "event": "Viewed", "messageId": f"d5-{attempt}", "userId": "u-other"},
        )
        if answer.get("suppressed") == 2:
            break
        await asyncio.sleep(0.05)
    assert (answer["suppressed"], answer["accepted"]) == (2, 1), answer

    # Repeating the request changes nothing and answers the same.
    again = await platform.profile.Delete(
        profile_pb2.DeleteRequest(person_id=person, mode=profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE, request_id="r1")
    )
    assert again.timeline_events == result.timeline_events

    # Nothing about the person is left in this service's store: no identifier, trait or property value.
    store = platform.runtime.parts["store"]
    await platform.runtime.parts["engine"].flush()
    dump = []
    for collection in (
        "profiles",
        "profile_timeline",
        "profile_checkpoints",
        "profile_computed_traits",
        "profile_deletions",
    ):
        async for record in store.scan_all(collection):
            dump.append(json.dumps([record.key, record.doc]))
            for change in record.doc.get("changes", []):  # change messages kept until published
                dump.append(bytes.fromhex(change["payload"]).decode("latin-1"))
    text = "\n".join(dump).lower()
    for secret in ("u-gone", "anon-gone", "gone@example.com", "grace gone", "sku-gone"):
        assert secret not in text, f"{secret!r} is still in the profile store"
    for key in ("user_id:u-gone", "email:gone@example.com", "anonymous_id:anon-gone"):
        assert hashlib.sha256(key.encode()).hexdigest() not in text
