"""Defects found by trying the segmentation API as an operator and an attacker would (session 41).

A segment's name and description had no limit: CreateSegment and UpdateSegment took whatever the gRPC
server receives (16 MiB), stored it, and sent it back in every GetSegment and ListSegments answer. A few
segments named with megabytes made ListSegments larger than a client receives (gRPC's default 4 MiB:
RESOURCE_EXHAUSTED) and, past 16 MiB in all, larger than the server sends: the listing failed for every
caller until the segments were deleted. Now both are refused over a limit, naming the field, and nothing
is stored.

In-process on a real nats-server and the memory store, with test_api.py's harness."""

from __future__ import annotations

import grpc

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
