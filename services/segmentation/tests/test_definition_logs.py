"""A definition's literal values are customer data (`traits.email = "lin@example.com"`): the service's logs
name the segment, its version and the fields it reads, never the definition's text or tree. Checked on the
log lines as the service writes them (the kit's JSON formatter, every extra field included), for a create,
an update and a build the profile service refuses with a message quoting the definition."""

from __future__ import annotations

import logging

import pytest

from cdp_kit.bus import Bus, profiles_stream, segments_stream
from cdp_kit.errors import InvalidArgument
from cdp_kit.logging import JsonFormatter
from cdp_kit.storage import open_store
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import FAILED, LIVE, SegmentationEngine
from cdp_testing.fakes import T0, Clock

SECRET = "lin@example.com"


class Profile:
    """The profile service as the engine sees it; `refuse_quoting`: refuse every definition with a
    message that quotes it, as a profile service's validation error may."""

    def __init__(self) -> None:
        self.defined: list[dict] = []
        self.refuse_quoting = False

    async def define(self, definitions) -> None:
        for definition in definitions:
            if self.refuse_quoting:
                raise InvalidArgument("definition", f"a computed trait the profile service refuses: {definition}")
            self.defined.append(dict(definition))

    async def ready(self, names) -> None:
        assert set(names) <= {d["name"] for d in self.defined}

    async def undefine(self, names) -> None:
        return None


@pytest.fixture
async def engine(nats_server):
    profile = Profile()
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="segmentation-test") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = SegmentationEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            telemetry=bus.telemetry,
            define_traits=profile.define,
            traits_ready=profile.ready,
            undefine_traits=profile.undefine,
            snapshot_interval=3600,
            timer_resolution=3600,
            clock=Clock(T0),
        )
        await engine.start()
        engine.fake_profile = profile
        try:
            yield engine
        finally:
            await engine.stop()


def written(caplog) -> list[str]:
    formatter = JsonFormatter("segmentation")
    return [formatter.format(record) for record in caplog.records if record.name.startswith("cdp.")]


async def test_a_create_and_an_update_log_ids_versions_and_fields_never_the_literals(engine, caplog):
    caplog.set_level(logging.DEBUG)
    segment = await engine.create("just_lin", parse(f'traits.email = "{SECRET}"'))
    assert (await engine.wait_live(segment.id)).state == LIVE
    await engine.update("just_lin", parse(f'traits.email = "{SECRET}" or traits.plan in ["pro", "s3cr3t-plan"]'))
    assert (await engine.wait_live("just_lin")).state == LIVE
    lines = written(caplog)
    assert [line for line in lines if SECRET in line or "s3cr3t-plan" in line] == []
    # What an operator needs instead: which segment, which version, what it reads.
    created = [r for r in caplog.records if r.getMessage() == "segment created"]
    assert [(r.segment, r.version, r.fields) for r in created] == [("just_lin", 1, ["traits.email"])]
    updated = [r for r in caplog.records if r.getMessage() == "segment updated"]
    assert [(r.segment, r.version, r.fields) for r in updated] == [("just_lin", 2, ["traits.email", "traits.plan"])]


async def test_a_build_refused_with_a_message_quoting_the_definition_logs_no_literal(engine, caplog):
    caplog.set_level(logging.DEBUG)
    engine.fake_profile.refuse_quoting = True
    text = f'count(event = "Order Completed" and properties.email = "{SECRET}", within 30d) >= 1'
    segment = await engine.create("buyers", parse(text))
    assert (await engine.wait_live(segment.id)).state == FAILED
    assert SECRET in segment.error  # the caller's own answer may quote what the caller wrote
    assert [line for line in written(caplog) if SECRET in line] == []
    [failed] = [r for r in caplog.records if r.levelname == "ERROR" and getattr(r, "segment", None) == "buyers"]
    assert failed.error == "InvalidArgument (field definition)"
