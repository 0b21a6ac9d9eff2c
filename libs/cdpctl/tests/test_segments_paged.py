"""`cdpctl segments` and `cdpctl export` read every page of ListSegments: a customer's segments pass what
one answer carries (3 MiB a page, under a client's default 4 MiB), and reading page one alone listed part
of them, and exported a document missing the rest (an import of it then deleted nothing, but a platform
built from it lacked them). A real segmentation service on a real nats-server."""

from __future__ import annotations

import json

import grpc
import pytest

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2_grpc
from cdp_kit.service import serving
from cdpctl.definitions_read import Services, read_segments

# 4,096 characters of description (the most a segment may have) and a definition with 7,000 characters of
# text (written twice, as text and as tree): 250 of them are about 4.5 MiB, two pages.
DESCRIPTION = "d" * 4096
LONG = "x" * 7000
COUNT = 250
IDS = [f"s{i:03}" for i in range(COUNT)]


@pytest.fixture
async def segmentation(nats_server):
    from cdp_segmentation.__main__ import setup
    from cdp_segmentation.settings import SegmentationSettings

    settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=1,
        shutdown_grace=1.0, store_url="memory://",
    )  # fmt: skip
    async with serving(settings, setup) as runtime:
        address = f"127.0.0.1:{runtime.grpc.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            for i in range(COUNT):
                definition = pb.Definition(text=f'traits.w contains "{LONG}{i}"')
                await stub.CreateSegment(
                    pb.CreateSegmentRequest(id=IDS[i], description=DESCRIPTION, definition=definition)
                )
            first = await stub.ListSegments(pb.ListSegmentsRequest(page_size=1_000))
            assert 0 < len(first.segments) < COUNT and first.next_page_token  # more than one page
            yield address, stub


async def test_cdpctl_segments_lists_the_segments_of_every_page(segmentation, bus_cli):
    address, _ = segmentation
    listed = await bus_cli.run("segments", "--json", "--address", address)
    assert listed.exit_code == 0, listed.output[-2000:]
    assert [document["id"] for document in json.loads(listed.output)] == IDS


async def test_an_export_reads_the_segments_of_every_page(segmentation):
    _, stub = segmentation
    segments = await read_segments(Services(stubs={"segmentation": stub}, metadata=()))
    assert sorted(segment["id"] for segment in segments) == IDS
    assert all(segment["description"] == DESCRIPTION for segment in segments)
