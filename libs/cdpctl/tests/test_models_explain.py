"""`cdpctl models explain MODEL PERSON` against real scoring, profile, identity and collector services (real
nats-server, real onnxruntime): the score, the baseline score, then the features pushing it up and down with
a bar, those without a value marked; a person named by id or by an identifier; --json for the service's
answer; never a value of the person's; errors name what is wrong."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_testing.onnx_models import logistic_model

CITY = "Zanzibar-4471"  # a trait of ann's no model reads, and no answer may show
ORDERS = 17.375  # ann's orders: a value no answer may show
# sigmoid(0.5 orders - 0.25 visits + 0.75 plan_index): orders push the score up, visits down.
FEATURES = (
    {"name": "orders", "path": "traits.orders", "default": 0},
    {"name": "visits", "path": "traits.visits", "default": 0},
    {"name": "plan", "path": "traits.plan", "transform": "category", "categories": ["free", "plus", "pro"],
     "default": -1},
)  # fmt: skip
WEIGHTS = [0.5, -0.25, 0.75]


def model() -> bytes:
    from cdp_scoring.drift import build_reference

    rng = np.random.default_rng(3)
    n = 2001
    X = np.column_stack([rng.gamma(2.0, 1.5, n), rng.normal(6.0, 1.5, n), rng.choice([0.0, 1.0], n, p=[0.8, 0.2])])
    reference = build_reference([f["name"] for f in FEATURES], X, {"churn_risk": rng.uniform(0, 1, n)})
    return logistic_model(features=FEATURES, weights=WEIGHTS, spec_overrides={"training": {"reference": reference}})


@pytest.fixture
async def explain_cli(people_cli, tmp_path):
    """people_cli with scoring running too, a model over traits, and three people it holds."""
    from cdp_kit.service import serving
    from cdp_scoring.__main__ import setup
    from cdp_scoring.settings import ScoringSettings

    state = json.loads((people_cli.home / "run.json").read_text())
    settings = ScoringSettings(
        nats_url=people_cli.nats_url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2,
        shutdown_grace=1.0, store_url=f"sqlite:///{tmp_path / 'scoring.db'}", model_store=str(tmp_path / "models"),
        ship_models=False, profile_address=state["services"]["profile"]["grpc"],
    )  # fmt: skip
    async with serving(settings, setup) as runtime:
        address = f"127.0.0.1:{runtime.grpc.port}"
        state["services"]["scoring"] = {"grpc": address}
        (people_cli.home / "run.json").write_text(json.dumps(state))
        async with grpc.aio.insecure_channel(address) as channel:
            await scoring_pb2_grpc.ScoringServiceStub(channel).DeployModel(scoring_pb2.DeployModelRequest(onnx=model()))
        for user, traits in (
            ("ann", {"orders": ORDERS, "visits": 9.5, "plan": "pro", "city": CITY}),
            ("bob", {"orders": 0, "plan": "free"}),
        ):
            await people_cli.send({"type": "identify", "userId": user, "messageId": f"m-{user}", "traits": traits})
        engine = runtime.parts["engine"]
        deadline = time.monotonic() + 20  # scoring learns of the profiles on profiles.changed
        while sum(1 for fields in engine.fields.values() if "traits.plan" in fields) < 2:
            assert time.monotonic() < deadline, "scoring did not receive the profiles"
            await asyncio.sleep(0.1)
        yield people_cli


async def person_id(cli, user: str) -> str:
    return json.loads((await cli.run("profile", "user_id", user)).output)["personId"]


async def test_the_score_the_baseline_and_the_features_pushing_it_up_and_down(explain_cli):
    ann = await person_id(explain_cli, "ann")
    shown = await explain_cli.run("models", "explain", "churn_risk", "user_id", "ann")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"churn_risk 1.0.0 (live) for {ann}", shown.output
    assert lines[1].startswith("churn_risk: 0."), shown.output
    assert lines[2].startswith("  baseline 0.") and lines[2].endswith("(every feature at its training median)")
    up = lines.index("  pushing it up:")
    down = lines.index("  pushing it down:")
    pushing_up = [line.split()[0] for line in lines[up + 1 : down]]
    assert pushing_up == ["orders", "plan"], shown.output  # orders moves it most: 0.5 x (17.4 - ~2.5)
    assert lines[up + 1].split()[1].startswith("+") and "█" * 24 in lines[up + 1]
    assert [line.split()[0] for line in lines[down + 1 :]] == ["visits"], shown.output
    assert lines[down + 1].split()[1].startswith("-")
    assert "no value" not in shown.output
    assert CITY not in shown.output and "17.375" not in shown.output and "9.5" not in shown.output

    by_id = await explain_cli.run("models", "explain", "churn_risk", ann)
    assert by_id.exit_code == 0 and by_id.output == shown.output, by_id.output


async def test_a_field_without_a_value_is_marked(explain_cli):
    bob = await explain_cli.run("models", "explain", "churn_risk", "user_id", "bob")
    assert bob.exit_code == 0, bob.output
    assert "  no value (default used): visits" in bob.output.splitlines(), bob.output
    marked = [line for line in bob.output.splitlines() if line.strip().startswith("visits")]
    assert marked and marked[0].endswith("(no value: default used)"), bob.output


async def test_json_is_the_services_answer_without_the_persons_values(explain_cli):
    ann = await person_id(explain_cli, "ann")
    raw = await explain_cli.run("models", "explain", "churn_risk", ann, "--json", "--version", "1.0.0")
    assert raw.exit_code == 0, raw.output
    document = json.loads(raw.output)
    assert (document["model"], document["version"], document["role"], document["personId"]) == (
        "churn_risk",
        "1.0.0",
        "ROLE_LIVE",
        ann,
    )
    [score] = document["scores"]
    assert score["score"] == "churn_risk" and 0 < score["value"] < 1 and 0 < score["baselineValue"] < 1
    assert [f["name"] for f in score["features"]] == ["orders", "plan", "visits"]
    assert {f["baseline"] for f in score["features"]} == {"training_median"}
    assert all(set(f) == {"name", "path", "missing", "contribution", "baseline"} for f in score["features"])
    assert CITY not in raw.output and "17.375" not in raw.output


async def test_errors_name_the_model_the_version_or_the_person(explain_cli):
    unknown = await explain_cli.run("models", "explain", "nope", "user_id", "ann")
    assert unknown.exit_code == 1 and "NOT_FOUND" in unknown.output and "model" in unknown.output, unknown.output
    version = await explain_cli.run("models", "explain", "churn_risk", "user_id", "ann", "--version", "9.9.9")
    assert version.exit_code == 1 and "NOT_FOUND" in version.output and "version" in version.output, version.output
    ghost = await explain_cli.run("models", "explain", "churn_risk", "p_ghost")
    assert ghost.exit_code == 1 and "NOT_FOUND" in ghost.output and "person_id" in ghost.output, ghost.output
    usage = await explain_cli.run("models", "explain", "churn_risk", "a", "b", "c")
    assert usage.exit_code == 2, usage.output
