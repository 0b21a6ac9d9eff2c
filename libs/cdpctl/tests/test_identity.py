"""`cdpctl identity model` against identity in-process on a real nats-server: the fitted parameters as a
data steward reads them (λ, m/u/weight per level, EM's iterations and convergence, term frequencies
summarised), exported to the file CDP_IDENTITY_MATCHING_FILE loads, and a second identity started with
that file scoring exactly as the first. A refused or unreachable call reads like every cdpctl error."""

from __future__ import annotations

import contextlib
import json

import grpc

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_testing.people import generate_population

from .conftest import Cli, workspace

TF_CONFIG_PATCH = {"term_frequencies": True}


@contextlib.asynccontextmanager
async def identity(nats_server, tmp_path, name: str, **settings):
    from cdp_identity.__main__ import setup
    from cdp_identity.settings import IdentitySettings
    from cdp_kit.service import serving

    config = IdentitySettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        store_url="memory://",
        partitions=1,
        batch_size=10,
        shutdown_grace=1.0,
        **settings,
    )
    async with serving(config, setup) as runtime:
        address = f"127.0.0.1:{runtime.grpc.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            cli = Cli(workspace(tmp_path / name, nats_server.url, {"identity": address}), nats_server.url)
            yield cli, identity_pb2_grpc.IdentityServiceStub(channel)


def records(count: int, seed: int) -> list[identity_pb2.MatchRecord]:
    generated, _ = generate_population(count, duplicates_rate=0.3, seed=seed)
    return [
        identity_pb2.MatchRecord(
            id=str(person["id"]),
            source="crm",
            identifiers=[identity_pb2.Identifier(type="salesforce_id", value=f"SF-{person['id']}")],
            fields={name: str(value) for name, value in person.items() if name != "id" and value},
        )
        for person in generated
    ]


def scores(response: identity_pb2.MatchRecordsResponse, within: set[str]) -> dict[tuple[str, str], float]:
    return {
        (pair.left_record, pair.right_record): pair.probability
        for pair in response.pairs
        if {pair.left_record, pair.right_record} <= within
    }


async def test_a_steward_reads_the_fitted_model_exports_it_and_a_new_identity_scores_the_same(nats_server, tmp_path):
    from cdp_identity.matching import DEFAULT_PERSON_CONFIG

    config = DEFAULT_PERSON_CONFIG.to_dict()
    config["comparisons"][1] |= TF_CONFIG_PATCH  # last_name weighed by how common the surname is
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    pool = records(300, seed=6)
    first_40 = {f"crm:{record.id}" for record in pool[:40]}
    async with identity(nats_server, tmp_path, "first", matching_file=config_file) as (cli, stub):
        await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=pool))
        before = await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=pool[:40], min_probability=1e-9))

        shown = await cli.run("identity", "model", "show", "--json")
        assert shown.exit_code == 0, shown.output
        model = json.loads(shown.output)
        assert model["origin"] == "fitted" and model["fittedOnRecords"] == str(len(pool))
        assert model["emConverged"] and model["emIterations"] > 0
        assert 0 < model["randomMatchProbability"] < 0.01
        levels = {(level["comparison"], level["level"]): level for level in model["levels"]}
        exact_email = levels[("email", "exact")]
        assert exact_email["m"] > exact_email["u"] and exact_email["weight"] > 5
        assert ("first_name", "else") in levels and not any(label == "null" for _, label in levels)
        (surnames,) = model["termFrequencies"]
        with_surname = sum(1 for record in pool if record.fields.get("last_name"))
        assert surnames["comparison"] == "last_name" and int(surnames["records"]) == with_surname
        assert surnames["weightRarest"] > surnames["weightMostCommon"]
        assert "Smith" not in shown.output and "smith" not in shown.output  # counts, never the names

        table = await cli.run("identity", "model", "show")
        assert table.exit_code == 0, table.output
        for text in ("fitted", "converged", "λ", "email", "exact", "last_name", "distinct"):
            assert text in table.output, text

        exported = tmp_path / "matching.json"
        result = await cli.run("identity", "model", "export", str(exported))
        assert result.exit_code == 0, result.output
        assert json.loads(exported.read_text())["format"] == "cdp.identity.matching/v2"

    async with identity(nats_server, tmp_path, "second", matching_file=exported) as (cli, stub):
        loaded = json.loads((await cli.run("identity", "model", "show", "--json")).output)
        assert loaded["origin"] == "file" and loaded["levels"] == model["levels"]
        await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=pool[40:]))  # the same pool
        after = await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=pool[:40], min_probability=1e-9))
    assert scores(before, first_40) and scores(after, first_40) == scores(before, first_40)


async def test_model_errors_read_like_every_cdpctl_error(nats_server, tmp_path):
    async with identity(nats_server, tmp_path, "only") as (cli, _):
        result = await cli.run("identity", "model", "show", "--address", "127.0.0.1:1", "--json")
        assert result.exit_code == 1
        assert json.loads(result.output)["error"]["code"] == "UNAVAILABLE"
        result = await cli.run("identity", "model", "export", str(tmp_path / "no-such-folder" / "m.json"))
        assert result.exit_code != 0 and "no-such-folder" in result.output
        help_text = (await cli.run("identity", "model", "--help")).output
        assert "CDP_IDENTITY_MATCHING_FILE" in help_text and "at start" in help_text
