"""Every field shows, false and 0 included: `cdpctl models` (a version that scored 0 rows, a canary at 0 %),
`cdpctl graph` (an identifier not quarantined) and `segments`/`segment members` (a segment of 0 members)
once hid them, as `cdpctl profile` did a score of 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import grpc
from click.testing import CliRunner

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdpctl.cli import main
from cdpctl.platform import Workspace


class Listing(scoring_pb2_grpc.ScoringServiceServicer):
    """A scoring service whose ListModels answers with the models it was given."""

    def __init__(self, models: list[scoring_pb2.Model]) -> None:
        self.models = models

    async def ListModels(self, request, context) -> scoring_pb2.ListModelsResponse:
        return scoring_pb2.ListModelsResponse(models=self.models)


@contextlib.asynccontextmanager
async def scoring_platform(tmp_path, servicer):
    server = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        ws = Workspace(tmp_path / "home")
        ws.prepare(())
        ws.write_run({"pid": os.getpid(), "services": {"scoring": {"grpc": f"127.0.0.1:{port}"}}})
        yield ws
    finally:
        await server.stop(None)


async def test_models_json_shows_a_version_that_scored_nothing_yet(tmp_path):
    live = scoring_pb2.ModelVersion(
        spec=scoring_pb2.ModelSpec(name="churn_risk", version="1.0.0"),
        role=scoring_pb2.ROLE_LIVE,
        rows_scored=1200,
        size_bytes=4096,
    )
    # Just deployed as a shadow: nothing scored, no difference to live measured yet.
    shadow = scoring_pb2.ModelVersion(
        spec=scoring_pb2.ModelSpec(name="churn_risk", version="1.1.0"), role=scoring_pb2.ROLE_SHADOW
    )
    model = scoring_pb2.Model(name="churn_risk", live_version="1.0.0", versions=[shadow, live])
    async with scoring_platform(tmp_path, Listing([model])) as ws:
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["--home", str(ws.root), "models", "--json"], catch_exceptions=False
        )
    assert result.exit_code == 0, result.output
    [shown] = json.loads(result.output)
    by_version = {v["spec"]["version"]: v for v in shown["versions"]}
    assert by_version["1.1.0"]["rowsScored"] == "0"
    assert by_version["1.1.0"]["meanAbsDiffToLive"] == 0
    assert by_version["1.1.0"]["canaryPercent"] == 0
    assert by_version["1.1.0"]["sizeBytes"] == "0"
    assert by_version["1.0.0"]["rowsScored"] == "1200"


async def test_models_table_still_reads_the_same(tmp_path):
    live = scoring_pb2.ModelVersion(
        spec=scoring_pb2.ModelSpec(name="churn_risk", version="1.0.0", outputs=[scoring_pb2.Output(score="churn")]),
        role=scoring_pb2.ROLE_LIVE,
    )
    model = scoring_pb2.Model(name="churn_risk", live_version="1.0.0", versions=[live])
    async with scoring_platform(tmp_path, Listing([model])) as ws:
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["--home", str(ws.root), "models"], catch_exceptions=False
        )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "churn_risk" in line)
    assert "1.0.0 live" in row and "churn" in row


async def test_graph_shows_that_an_identifier_is_not_quarantined(people_cli):
    await people_cli.send({"type": "identify", "userId": "bo", "messageId": "m-bo", "traits": {"plan": "pro"}})
    for _ in range(300):
        shown = await people_cli.run("graph", "user_id", "bo")
        if shown.exit_code == 0:
            break
        await asyncio.sleep(0.05)
    graph = json.loads(shown.output)
    [identifier] = graph["identifiers"]
    assert identifier["quarantined"] is False
    # A person never merged or split: the lists are there, empty, rather than missing.
    assert graph["merges"] == [] and graph["apart"] == [] and graph["drops"] == []

    assert (await people_cli.run("quarantine", "user_id", "bo")).exit_code == 0
    [identifier] = json.loads((await people_cli.run("graph", "user_id", "bo")).output)["identifiers"]
    assert identifier["quarantined"] is True


async def test_an_empty_segment_shows_its_size_and_members_as_zero(people_cli, tmp_path):
    from cdp_kit.service import serving
    from cdp_segmentation.__main__ import setup
    from cdp_segmentation.settings import SegmentationSettings

    state = json.loads((people_cli.home / "run.json").read_text())
    settings = SegmentationSettings(
        nats_url=people_cli.nats_url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2,
        shutdown_grace=1.0, store_url=f"sqlite:///{tmp_path / 'segmentation.db'}",
        profile_address=state["services"]["profile"]["grpc"],
    )  # fmt: skip
    async with serving(settings, setup) as runtime:
        state["services"]["segmentation"] = {"grpc": f"127.0.0.1:{runtime.grpc.port}"}
        (people_cli.home / "run.json").write_text(json.dumps(state))
        created = await people_cli.run("segment", "create", "nobody", 'traits.plan = "enterprise"')
        assert created.exit_code == 0 and "0 members" in created.output, created.output

        [listed] = json.loads((await people_cli.run("segments", "--json")).output)
        assert listed["id"] == "nobody" and listed["size"] == "0", listed
        members = json.loads((await people_cli.run("segment", "members", "nobody", "--json")).output)
        assert members["members"] == [] and members["total"] == "0", members
        shown = await people_cli.run("segment", "members", "nobody")
        assert shown.exit_code == 0 and shown.output.splitlines()[-1] == "0 members", shown.output
