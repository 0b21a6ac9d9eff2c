"""Collector → events.raw → identity → events.resolved / identity.*, with a real nats-server.

The SDK-shaped payloads go through the collector's Segment HTTP API; what identity publishes is read
back from JetStream, and the graph is checked through IdentityService over gRPC.
"""

from __future__ import annotations

import asyncio

import grpc
import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_kit.bus import partition_for, subjects

from .conftest import PARTITIONS


@pytest.fixture
async def platform(edge):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{edge.identity.grpc.port}")
    try:
        yield Platform(edge, identity=identity_pb2_grpc.IdentityServiceStub(channel))
    finally:
        await channel.close()


class Platform:
    def __init__(self, edge, identity) -> None:
        self.edge = edge
        self.nats_url = edge.nats_url
        self.identity = identity

    async def send(self, *events: dict) -> None:
        await self.edge.send(*events)

    async def messages(self, stream: str, expected: int, timeout: float = 15.0) -> list:
        """Every message of `stream` once there are at least `expected`, in stream order."""
        nc = await nats.connect(self.nats_url)
        try:
            js = nc.jetstream()
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                info = await js.stream_info(stream)
                if info.state.messages >= expected:
                    break
                assert asyncio.get_running_loop().time() < deadline, (
                    f"{stream} has {info.state.messages} messages, expected {expected}"
                )
                await asyncio.sleep(0.05)
            if not info.state.messages:
                return []
            return [await js.get_msg(stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
        finally:
            await nc.close()

    async def resolved(self, expected: int, timeout: float = 15.0) -> dict[str, events_pb2.ResolvedEvent]:
        """Every resolved event by message id, once there are at least `expected` of them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            out = {}
            for msg in await self.messages("EVENTS_RESOLVED", 0):
                assert msg.subject.startswith("events.resolved.")
                for resolved in events_pb2.ResolvedEventBatch.FromString(msg.data).events:
                    out[resolved.event.message_id] = resolved
            if len(out) >= expected:
                return out
            assert asyncio.get_running_loop().time() < deadline, f"{len(out)} resolved events, expected {expected}"
            await asyncio.sleep(0.05)


def track(message_id: str, **fields) -> dict:
    return {"type": "track", "event": "Product Viewed", "messageId": message_id, **fields}


async def test_anonymous_activity_joins_the_person_who_signs_in(platform):
    await platform.send(
        {"type": "page", "name": "Home", "messageId": "m1", "anonymousId": "anon-phone-1"},
        {
            "type": "identify",
            "messageId": "m2",
            "anonymousId": "anon-phone-1",
            "userId": "user-1",
            "traits": {"email": " Ada@Example.COM "},
        },
        track("m3", anonymousId="anon-laptop-1", userId="user-1"),
    )
    resolved = await platform.resolved(3)
    persons = {resolved[m].person_id for m in ("m1", "m2", "m3")}
    assert len(persons) == 1, "anonymous browsing, sign-in and the second device are one person"
    (person,) = persons
    found = await platform.identity.Lookup(
        identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="email", value="ada@example.com"))
    )
    assert found.person_id == person
    assert {(i.type, i.value) for i in found.identifiers} == {
        ("anonymous_id", "anon-phone-1"),
        ("anonymous_id", "anon-laptop-1"),
        ("user_id", "user-1"),
        ("email", "ada@example.com"),
    }
    # The event is carried as the collector accepted it.
    assert resolved["m2"].event.traits.fields["email"].string_value == " Ada@Example.COM "
    # ...with its normalised identifiers, strongest first, for services downstream.
    assert list(resolved["m2"].identifiers) == ["user_id:user-1", "email:ada@example.com", "anonymous_id:anon-phone-1"]


async def test_cross_device_merge_is_published_recorded_and_reversible(platform):
    await platform.send(
        track("p1", anonymousId="phone-2", context={"device": {"id": "device-phone-2"}}),
        track("l1", anonymousId="laptop-2"),
    )
    before = await platform.resolved(2)
    phone_person, laptop_person = before["p1"].person_id, before["l1"].person_id
    assert phone_person != laptop_person

    await platform.send(
        {"type": "identify", "messageId": "i1", "anonymousId": "phone-2", "userId": "user-2"},
        {"type": "identify", "messageId": "i2", "anonymousId": "laptop-2", "userId": "user-2"},
    )
    after = await platform.resolved(4)
    assert after["i1"].person_id == after["i2"].person_id == phone_person

    (merged_msg,) = await platform.messages("IDENTITY", 1)
    # On the survivor's partition, where profile's owner of that person reads it.
    assert merged_msg.subject == subjects.identity_merged(partition_for(phone_person, PARTITIONS))
    merged = identity_pb2.IdentityMerged.FromString(merged_msg.data)
    assert (merged.winner, merged.loser) == (phone_person, laptop_person)
    assert merged.cause.rule == "event" and merged.cause.event_id == "web:i2"

    graph = await platform.identity.GetGraph(identity_pb2.GetGraphRequest(person_id=laptop_person))
    assert graph.person_id == phone_person, "a merged-away person id leads to the survivor"
    assert [m.merge_id for m in graph.merges] == [merged.merge_id]

    split = await platform.identity.Unmerge(identity_pb2.UnmergeRequest(merge_id=merged.merge_id, reason="test"))
    assert (split.winner, split.loser) == (phone_person, laptop_person)
    assert {(i.type, i.value) for i in split.loser_identifiers} == {("anonymous_id", "laptop-2")}
    messages = await platform.messages("IDENTITY", 2)
    assert messages[1].subject == subjects.identity_unmerged(partition_for(phone_person, PARTITIONS))
    assert identity_pb2.IdentityUnmerged.FromString(messages[1].data).loser == laptop_person

    back = await platform.identity.Lookup(identity_pb2.LookupRequest(person_id=laptop_person))
    assert back.person_id == laptop_person
    # Separated persons are not glued again by the next event that links them.
    await platform.send({"type": "identify", "messageId": "i3", "anonymousId": "laptop-2", "userId": "user-2"})
    again = await platform.resolved(5)
    assert again["i3"].person_id == phone_person
    assert [(d.type, d.reason) for d in again["i3"].dropped] == [("anonymous_id", "separated")]
    assert (
        await platform.identity.Lookup(identity_pb2.LookupRequest(person_id=laptop_person))
    ).person_id == laptop_person


async def test_a_shared_tablet_never_glues_two_users_together(platform):
    tablet = {"device": {"id": "family-tablet"}}
    await platform.send(
        track("t1", userId="parent", context=tablet),
        track("t2", userId="child", context=tablet),
    )
    resolved = await platform.resolved(2)
    assert resolved["t1"].person_id != resolved["t2"].person_id
    assert [(d.type, d.value, d.reason) for d in resolved["t2"].dropped] == [
        ("device_id", "family-tablet", "limit:user_id")
    ]
    graph = await platform.identity.GetGraph(identity_pb2.GetGraphRequest(person_id=resolved["t2"].person_id))
    assert [(d.dropped.identifier.value, d.dropped.reason) for d in graph.drops] == [("family-tablet", "limit:user_id")]


async def test_resolve_is_synchronous_idempotent_and_names_bad_fields(platform):
    request = identity_pb2.ResolveRequest(
        identifiers=[identity_pb2.Identifier(type="email", value="grace@example.com")], request_id="crm-import-7"
    )
    first = await platform.identity.Resolve(request)
    assert first.created and first.person_id
    second = await platform.identity.Resolve(request)
    assert second.person_id == first.person_id and not second.created

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await platform.identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[identity_pb2.Identifier(type="fax", value="123")])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "identifiers[0]" in caught.value.details() and "fax" in caught.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await platform.identity.Lookup(
            identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="email", value="nobody@example.com"))
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def contact(record_id: str, crm_id: str, **fields: str) -> identity_pb2.MatchRecord:
    return identity_pb2.MatchRecord(
        id=record_id,
        source="crm",
        fields=fields,
        identifiers=[identity_pb2.Identifier(type="salesforce_id", value=crm_id)],
    )


async def test_match_records_merges_confident_pairs_and_queues_the_doubtful(platform):
    from cdp_testing.people import generate_population

    records, truth = generate_population(300, duplicates_rate=0.3, seed=3)
    request = identity_pb2.MatchRecordsRequest(apply=True)
    for record in records:
        fields = {k: str(v) for k, v in record.items() if k != "id" and v not in (None, "")}
        request.records.append(contact(str(record["id"]), f"sf-{record['id']}", **fields))
    response = await platform.identity.MatchRecords(request)
    assert len(response.persons) == len(records)
    assert response.merges, "duplicates in the population must merge"
    for merge in response.merges:
        assert merge.cause.rule == "match" and merge.cause.detail.startswith("p=")
    # Merged records now resolve to one person; records of different people stay apart.
    person_of = {}
    for record in records:
        found = await platform.identity.Lookup(
            identity_pb2.LookupRequest(
                identifier=identity_pb2.Identifier(type="salesforce_id", value=f"sf-{record['id']}")
            )
        )
        person_of[str(record["id"])] = found.person_id
    same_person = {(a, b) for a in person_of for b in person_of if a < b and person_of[a] == person_of[b]}
    truly_same = {
        (str(a["id"]), str(b["id"]))
        for a in records
        for b in records
        if str(a["id"]) < str(b["id"]) and truth[a["id"]] == truth[b["id"]]
    }
    precision = len(same_person & truly_same) / len(same_person)
    recall = len(same_person & truly_same) / len(truly_same)
    assert precision >= 0.95 and recall >= 0.8, (precision, recall)

    reviews = await platform.identity.ListReviews(identity_pb2.ListReviewsRequest(page_size=1000))
    assert {r.review_id for r in reviews.reviews} == set(response.review_ids)
    for review in reviews.reviews:
        assert 0.6 <= review.pair.probability < 0.95 or review.pair.decision == "match"


async def test_reviews_are_decided_by_a_person(platform):
    # Same name and city, different e-mail and no birth date: probable, not certain.
    request = identity_pb2.MatchRecordsRequest(
        apply=True,
        records=[
            contact("r1", "sf-r1", first_name="Katherine", last_name="Oduya", city="Leeds", zip="LS1 4AP"),
            contact("r2", "sf-r2", first_name="Kate", last_name="Oduya", city="Leeds", zip="LS1 4AP"),
        ],
    )
    response = await platform.identity.MatchRecords(request)
    (pair,) = response.pairs
    assert pair.levels["first_name"] != "else", "the nickname must count as agreement"
    if pair.decision == "review":
        (review_id,) = response.review_ids
        decided = await platform.identity.ResolveReview(
            identity_pb2.ResolveReviewRequest(
                review_id=review_id, decision=identity_pb2.ResolveReviewRequest.DECISION_MERGE, reviewer="ops@shop"
            )
        )
        assert decided.merge.cause.rule == "review" and decided.merge.cause.detail == "ops@shop"
        left = await platform.identity.Lookup(identity_pb2.LookupRequest(person_id=pair.left_person))
        right = await platform.identity.Lookup(identity_pb2.LookupRequest(person_id=pair.right_person))
        assert left.person_id == right.person_id
        assert not (await platform.identity.ListReviews(identity_pb2.ListReviewsRequest())).reviews
    else:
        assert pair.decision == "match" and response.merges


async def test_match_records_names_the_bad_field(platform):
    cases = {
        "records[0].identifiers": identity_pb2.MatchRecord(id="x", fields={"first_name": "A"}),
        "records[0].id": identity_pb2.MatchRecord(identifiers=[identity_pb2.Identifier(type="email", value="a@b.co")]),
        "records[0].fields.shoe_size": contact("x", "sf-x", shoe_size="44"),
    }
    for field, record in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await platform.identity.MatchRecords(identity_pb2.MatchRecordsRequest(records=[record]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details(), caught.value.details()
