"""ListSegments in pages (AIP-158): a customer's segments pass the 4 MiB a gRPC client receives by default
when answered in one message, and every caller failed. A real client (default limits) reads them all a page
at a time; a page stays under the limit whatever page_size asks; the listing is stable while segments are
created and deleted between pages; a token ListSegments did not give is INVALID_ARGUMENT naming page_token."""

from __future__ import annotations

import grpc
import pytest

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_segmentation.api import DEFAULT_SEGMENTS_PAGE, MAX_SEGMENTS_PAGE, SEGMENTS_PAGE_BYTES, segments_token

from .test_api import Profile, running, violations
from .test_engine import create


@pytest.fixture
async def service(nats_server):
    async with running(nats_server.url, Profile()) as started:
        yield started


# 4,096 characters of description (the most a segment may have) and a definition with 7,000 characters of
# text (written twice: as text and as tree): 300 of them encode to about 5 MiB, past what a client receives
# in one message by default.
DESCRIPTION = "d" * 4096
LONG = "x" * 7000


async def all_pages(stub, page_size: int = 0) -> tuple[list[pb.Segment], int]:
    listed, token, pages = [], "", 0
    while True:
        page = await stub.ListSegments(pb.ListSegmentsRequest(page_size=page_size, page_token=token))
        pages += 1
        listed.extend(page.segments)
        token = page.next_page_token
        if not token:
            return listed, pages


async def test_segments_past_a_clients_message_limit_are_read_a_page_at_a_time(service):
    engine = service.engine
    for i in range(300):
        segment = await engine.create(
            f"s{i:03}", _parse(f'traits.w{i % 7} contains "{LONG}{i}"'), description=DESCRIPTION
        )
        await engine.wait_live(segment.id)
    first = await service.stub.ListSegments(pb.ListSegmentsRequest())
    assert len(first.segments) == DEFAULT_SEGMENTS_PAGE and first.next_page_token
    assert first.ByteSize() < 4 * 1024 * 1024
    listed, pages = await all_pages(service.stub)
    assert [s.id for s in listed] == [f"s{i:03}" for i in range(300)]
    assert all(s.description == DESCRIPTION for s in listed)
    assert sum(s.ByteSize() for s in listed) > 4 * 1024 * 1024  # one message could not have carried them
    assert pages == 3
    # The largest page asked for still ends before the byte budget, so a default client reads each one.
    biggest = await service.stub.ListSegments(pb.ListSegmentsRequest(page_size=MAX_SEGMENTS_PAGE))
    assert 0 < len(biggest.segments) < 300 and biggest.next_page_token
    assert biggest.ByteSize() <= SEGMENTS_PAGE_BYTES
    listed, _ = await all_pages(service.stub, MAX_SEGMENTS_PAGE)
    assert [s.id for s in listed] == [f"s{i:03}" for i in range(300)]


async def test_the_last_page_has_no_token_and_an_exact_fit_asks_for_no_empty_page(service):
    for i in range(4):
        await create(service.engine, f"s{i}", f"scores.x > {i}")
    page = await service.stub.ListSegments(pb.ListSegmentsRequest(page_size=2))
    assert [s.id for s in page.segments] == ["s0", "s1"] and page.next_page_token
    page = await service.stub.ListSegments(pb.ListSegmentsRequest(page_size=2, page_token=page.next_page_token))
    assert [s.id for s in page.segments] == ["s2", "s3"] and page.next_page_token == ""
    whole = await service.stub.ListSegments(pb.ListSegmentsRequest())
    assert len(whole.segments) == 4 and whole.next_page_token == ""


async def test_segments_created_and_deleted_between_pages_move_no_other_across_a_page(service):
    engine = service.engine
    for i in range(0, 20, 2):  # b00, b02, ... b18
        await create(engine, f"b{i:02}", f"scores.x > {i}")
    page = await service.stub.ListSegments(pb.ListSegmentsRequest(page_size=4))
    seen = [s.id for s in page.segments]
    assert seen == ["b00", "b02", "b04", "b06"]
    # Between pages: one created before the boundary, one after it, one listed deleted, one not yet listed
    # deleted. An offset would now list b06 again (one more before it) or skip b08 (one fewer).
    await create(engine, "a99", "scores.x > 99")
    await create(engine, "b01", "scores.x > 1")
    await create(engine, "b09", "scores.x > 9")
    await engine.delete("b02")
    await engine.delete("b12")
    token = page.next_page_token
    while token:
        page = await service.stub.ListSegments(pb.ListSegmentsRequest(page_size=4, page_token=token))
        seen += [s.id for s in page.segments]
        token = page.next_page_token
    assert seen == ["b00", "b02", "b04", "b06", "b08", "b09", "b10", "b14", "b16", "b18"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListSegmentsRequest(page_token="!!"), "page_token"),
        (pb.ListSegmentsRequest(page_token="czAx"), "page_token"),  # base64 of "s01": no mark of ListSegments
        (pb.ListSegmentsRequest(page_size=-1), "page_size"),
        (pb.ListSegmentsRequest(page_size=MAX_SEGMENTS_PAGE + 1), "page_size"),
    ],
)
async def test_a_token_or_size_listsegments_did_not_give_is_refused_naming_the_field(service, request_, field):
    await create(service.engine, "s01", "scores.x > 1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.ListSegments(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(caught.value)] == [field]


async def test_a_list_members_token_is_not_a_list_segments_token(service):
    await service.feed(*(_change(f"p{i}") for i in range(3)))
    await create(service.engine, "pro", 'traits.plan = "pro"')
    members = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="pro", page_size=1))
    assert members.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.ListSegments(pb.ListSegmentsRequest(page_token=members.next_page_token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(caught.value)] == ["page_token"]
    # And a ListSegments token still continues after its segment.
    page = await service.stub.ListSegments(pb.ListSegmentsRequest(page_token=segments_token("pn")))
    assert [s.id for s in page.segments] == ["pro"]


def _parse(text: str):
    from cdp_segmentation.domain import parse

    return parse(text)


def _change(person: str):
    from .test_api import change

    return change(person, traits={"plan": "pro"})
