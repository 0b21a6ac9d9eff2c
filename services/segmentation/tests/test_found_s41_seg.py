"""Defects found by trying the segmentation API as an operator and an attacker would (session 41).

A segment's name and description had no limit: CreateSegment and UpdateSegment took whatever the gRPC
server receives (16 MiB), stored it, and sent it back in every GetSegment and ListSegments answer. A few
segments named with megabytes made ListSegments larger than a client receives (gRPC's default 4 MiB:
RESOURCE_EXHAUSTED) and, past 16 MiB in all, larger than the server sends: the listing failed for every
caller until the segments were deleted. Now both are refused over a limit, naming the field, and nothing
is stored.

A profile change naming a person id the store cannot key (over 1,024 characters, a NUL: no service of the
platform sends one, any NATS publisher can) was applied: the person was held and evaluated (and their
transitions published), and from then on every snapshot of the process failed on their record ("snapshot
failed ...; the next one writes what it did not"), so each restart replayed from further back. Such a
change is now left out where changes are applied (stream, replay and tools alike) and dead-lettered alone
by the stream's decode (`invalid_person_id`).

In-process on a real nats-server and the memory store, with test_api.py's harness."""

from __future__ import annotations

import grpc

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import subjects
from cdp_testing.fakes import Delivery

from .test_api import change, pb, profile, service, text, violations

__all__ = ["profile", "service"]  # test_api.py's fixtures

MAX_NAME, MAX_DESCRIPTION = 256, 4096  # characters, as the API documents them


async def test_a_name_or_description_over_the_limit_is_refused_naming_it_and_the_listing_stays_readable(service):
    await service.feed(change("p1", traits={"plan": "pro"}))
    huge = "n" * (3 * 1024 * 1024)  # each request well under the 16 MiB the server receives
    refused = []
    for i, (name, description) in enumerate(
        [(huge, ""), ("", huge), ("x" * (MAX_NAME + 1), ""), ("", "d" * (MAX_DESCRIPTION + 1))]
    ):
        request = pb.CreateSegmentRequest(
            id=f"s{i}", name=name, description=description, definition=text('traits.plan = "pro"'), wait=True
        )
        try:
            await service.stub.CreateSegment(request)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            refused.append([field for field, _ in violations(error)])
    assert refused == [["name"], ["description"], ["name"], ["description"]]

    # The limits themselves are accepted, and an update over them is refused and changes nothing.
    at_limit = await service.create(
        "pro", 'traits.plan = "pro"', name="é" * MAX_NAME, description="d" * MAX_DESCRIPTION
    )
    assert at_limit.state == pb.SEGMENT_STATE_LIVE and at_limit.name == "é" * MAX_NAME
    for name, description, field in [(huge, "", "name"), ("", huge, "description")]:
        try:
            await service.stub.UpdateSegment(pb.UpdateSegmentRequest(id="pro", name=name, description=description))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations(error)] == [field]
        else:
            raise AssertionError(f"an update with a {field} of {len(huge)} characters was accepted")

    listing = await service.stub.ListSegments(pb.ListSegmentsRequest())
    assert [(s.id, s.name, s.description) for s in listing.segments] == [("pro", "é" * MAX_NAME, "d" * MAX_DESCRIPTION)]


async def test_a_change_naming_a_person_id_the_store_cannot_key_is_left_out_and_snapshots_go_on(service):
    odd = ["x" * 1025, "a\x00b"]
    changes = [change(p, traits={"plan": "pro"}) for p in ("p1", *odd, "p2")]
    delivery = Delivery(
        profile_pb2.ProfileChangedBatch(changes=changes), subjects.profiles_changed(0), 1, allow_reject=True
    )
    await service.engine.handle([delivery])
    assert delivery.outcome == "ack" and sorted(delivery.parts or {}) == [1, 2]
    assert {reason for _, reason, _ in delivery.parts.values()} == {"invalid_person_id"}

    segment = await service.create("pro", 'traits.plan = "pro"')
    assert segment.size == 2
    members = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="pro"))
    assert [m.person_id for m in members.members] == ["p1", "p2"]
    await service.engine.snapshot()  # raised InvalidArgument (ops[0].key: a NUL) before, at every snapshot
