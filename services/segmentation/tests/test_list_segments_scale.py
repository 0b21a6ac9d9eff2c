"""ListSegments at a customer's scale of segments: a definition's text and tree as sent are written once per
definition, not on every listing (counted: the trees written, spied on in the API module)."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

import cdp_segmentation.api as api_module
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Bus, profiles_stream, segments_stream
from cdp_kit.storage import open_store
from cdp_segmentation.domain import parse
from cdp_testing.fakes import T0, Clock

from .test_engine import Profile, create, make_engine


@pytest.fixture
async def many(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="segmentation-test") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = await make_engine(store, bus, Clock(T0), Profile())
        try:
            yield engine, store
        finally:
            await engine.stop()


async def test_listing_the_segments_again_writes_no_definition_twice(many, monkeypatch):
    # A definition's text and tree as sent depend on it alone; writing them and checking they decode inside a
    # response was about 60 µs of CPU a segment, on the event loop: 0.18 s of stream held per ListSegments of 3,000.
    engine, *_ = many
    for i in range(30):
        await create(engine, f"s{i}", f"scores.s{i} > 0.5")
    written: list[object] = []
    original = api_module.to_json

    def counting(node):
        written.append(node)
        return original(node)

    monkeypatch.setattr(api_module, "to_json", counting)
    api = api_module.SegmentationApi(engine)
    first = await api.ListSegments(segmentation_pb2.ListSegmentsRequest(), None)
    assert len(written) == 30
    written.clear()
    again = await api.ListSegments(segmentation_pb2.ListSegmentsRequest(), None)
    assert written == [] and again == first
    await engine.update("s7", parse("scores.s7 > 0.9"))
    await engine.wait_live("s7")
    after = await api.ListSegments(segmentation_pb2.ListSegmentsRequest(), None)
    assert len(written) == 1
    [s7] = [segment for segment in after.segments if segment.id == "s7"]
    assert s7.text == "scores.s7 > 0.9" and s7.version == 2
    assert json_format.MessageToDict(s7.tree) == {"field": "scores.s7", "op": ">", "value": 0.9}
