"""The segment catalogue reads every page of ListSegments: a customer's segments pass what one answer
carries (3 MiB a page, under a client's default 4 MiB), and a journey naming a segment of a later page was
refused as naming a segment that does not exist (or, before segmentation paged, every listing failed).
A real segmentation service on a real nats-server."""

from __future__ import annotations

import grpc
import pytest

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2_grpc
from cdp_kit.service import serving
from cdp_orchestration.catalogue import Catalogues, live_segments

# 4,096 characters of description (the most a segment may have) and a definition with 7,000 characters of
# text (written twice, as text and as tree): 250 of them are about 4.5 MiB, two pages.
DESCRIPTION = "d" * 4096
LONG = "x" * 7000
COUNT = 250


@pytest.fixture
async def segmentation(nats_server, tmp_path):
    from cdp_segmentation.__main__ import setup
    from cdp_segmentation.settings import SegmentationSettings

    settings = SegmentationSettings(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=1,
        shutdown_grace=1.0, store_url="memory://",
    )  # fmt: skip
    async with serving(settings, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            for i in range(COUNT):
                definition = pb.Definition(text=f'traits.w contains "{LONG}{i}"')
                await stub.CreateSegment(
                    pb.CreateSegmentRequest(id=f"s{i:03}", description=DESCRIPTION, definition=definition)
                )
            yield channel


async def test_the_segment_catalogue_holds_the_segments_of_every_page(segmentation):
    first = await segmentation_pb2_grpc.SegmentationServiceStub(segmentation).ListSegments(
        pb.ListSegmentsRequest(page_size=1_000)
    )
    assert 0 < len(first.segments) < COUNT and first.next_page_token  # more than one page
    known = await live_segments(segmentation, "")()
    assert known == frozenset(f"s{i:03}" for i in range(COUNT))
    catalogue = await Catalogues(segments=live_segments(segmentation, "")).current(required=frozenset({"segmentation"}))
    assert catalogue is not None and f"s{COUNT - 1:03}" in catalogue.segments
