"""`cdpctl definitions export/import` between two real platforms, each as `make up` runs it.

On the first, people defined a computed trait, two segments (one reading the other), journeys in every
state (one with two published versions, one paused, one archived, one draft never published). It is
exported; the second, fresh platform takes the document: a dry run changes nothing, the import creates
every definition, and the second platform's own export is then the same document. Importing again
changes nothing. A definition changed on the second platform is conflicting and left alone until
--replace. What no RPC can restore (CRM connections come from a file) is reported, not hidden.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_testing.onnx_models import logistic_model
from cdp_testing.platform_run import RunningPlatform
from cdpctl.cli import main

pytestmark = pytest.mark.timeout(600)

SPEND = {
    "name": "big_orders_90d",
    "op": "count",
    "event_names": ["Order Completed"],
    "where": {"total": {"$gt": 20}},
    "window": "90d",
}

WELCOME_V1 = {
    "id": "welcome",
    "version": 1,
    "name": "Welcome",
    "priority": 5,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"event": "Signed Up"},
    "reentry": "never",
    "nodes": [{"id": "later", "type": "delay", "duration": "1h"}],
}
WELCOME_V2 = {**WELCOME_V1, "version": 2, "nodes": [{"id": "later", "type": "delay", "duration": "2h"}]}
VIP = {
    **WELCOME_V1,
    "id": "vip-care",
    "name": "VIP care",
    "entry": {"segment": "vip-buyers", "on": "entered"},
    "nodes": [{"id": "later", "type": "delay", "duration": "1d"}],
}
OLD = {**WELCOME_V1, "id": "old-promo", "name": "Old promo", "entry": {"api": True}}
IDEA = {**WELCOME_V1, "id": "idea", "name": "An idea", "entry": {"api": True}}


def cdpctl(platform: RunningPlatform, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`cdpctl --home <the platform's home> *args`, as conftest's `Cli` runs it: in this process. A command
    here is a few gRPC calls; its own interpreter (Python, grpc, the protobufs, rich: ~0.35 s of CPU) cost
    more than the command, sixty times over in this module. The platforms stay real processes."""
    result = CliRunner().invoke(main, ["--home", str(platform.home), *args], catch_exceptions=False)
    done = subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def journey(platform: RunningPlatform, tmp_path: Path, verb: str, definition: dict, *more: str) -> None:
    file = tmp_path / f"{definition['id']}-v{definition['version']}.json"
    file.write_text(json.dumps(definition))
    cdpctl(platform, "journey", verb, str(file), *more)


def define_everything(platform: RunningPlatform, tmp_path: Path) -> None:
    with grpc.insecure_channel(platform.grpc_address("profile")) as channel:
        definition = profile_pb2.ComputedTraitDefinition()
        from google.protobuf import json_format

        json_format.ParseDict(SPEND, definition)
        profile_pb2_grpc.ProfileServiceStub(channel).DefineComputedTrait(
            profile_pb2.DefineComputedTraitRequest(definition=definition), metadata=platform.admin_metadata, timeout=30
        )
    cdpctl(platform, "segment", "create", "buyers", "computed.big_orders_90d >= 1", "--name", "Buyers")
    cdpctl(platform, "segment", "create", "vip-buyers", 'in_segment("buyers") and traits.plan = "vip"')
    journey(platform, tmp_path, "create", WELCOME_V1, "--publish")
    journey(platform, tmp_path, "update", WELCOME_V2)
    cdpctl(platform, "journey", "publish", "welcome")
    journey(platform, tmp_path, "create", VIP, "--publish")
    cdpctl(platform, "journey", "pause", "vip-care")
    journey(platform, tmp_path, "create", OLD, "--publish")
    cdpctl(platform, "journey", "archive", "old-promo")
    journey(platform, tmp_path, "create", IDEA)


def deploy_toy_model(platform: RunningPlatform) -> None:
    """The same two files on both platforms (a model's files are not in the document: no RPC gives them),
    version 2.0.0 live."""
    features = [{"name": "x", "path": "traits.toy_x", "default": 0}]
    with grpc.insecure_channel(platform.grpc_address("scoring")) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for version in ("1.0.0", "2.0.0"):
            onnx = logistic_model("toy", version, features=features, score="toy_score")
            request = scoring_pb2.DeployModelRequest(onnx=onnx, role=scoring_pb2.ROLE_LIVE)
            stub.DeployModel(request, metadata=platform.admin_metadata, timeout=60)


def roll_back_toy_model(platform: RunningPlatform) -> None:
    with grpc.insecure_channel(platform.grpc_address("scoring")) as channel:
        scoring_pb2_grpc.ScoringServiceStub(channel).Rollback(
            scoring_pb2.RollbackRequest(name="toy"), metadata=platform.admin_metadata, timeout=60
        )


def without_crm_urls(document: dict) -> dict:
    """Both platforms run on one machine, so their local CRMs listen on different ports: the one field of
    the document that differs because of where a platform runs, not what people defined."""
    return {**document, "crm": [{**c, "url": "(local)"} for c in document["crm"]]}


def start_both(tmp_path_factory) -> tuple[RunningPlatform, RunningPlatform]:
    platforms = [RunningPlatform(tmp_path_factory.mktemp(name)) for name in ("old", "fresh")]
    failures: list[BaseException] = []

    def start(platform: RunningPlatform) -> None:
        try:
            platform.start()
        except BaseException as exc:  # reported below, after both tried
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(p,)) for p in platforms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        for platform in platforms:
            platform.stop()
        raise failures[0]
    return platforms[0], platforms[1]


@pytest.fixture(scope="module")
def platforms(tmp_path_factory):
    old, fresh = start_both(tmp_path_factory)
    try:
        yield old, fresh
    finally:
        old.stop()
        fresh.stop()


def outcomes(done: subprocess.CompletedProcess) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["name"]): o for o in json.loads(done.stdout)["definitions"]}


def test_definitions_exported_from_one_platform_are_the_same_on_a_fresh_one_after_import(platforms, tmp_path):
    old, fresh = platforms
    define_everything(old, tmp_path)
    deploy_toy_model(old)
    deploy_toy_model(fresh)
    exported = tmp_path / "definitions.yaml"
    done = cdpctl(old, "definitions", "export", "--out", str(exported))
    for line in ("computed traits: 1 exported", "segments: 2 exported", "journeys: 4 exported"):
        assert line in done.stderr
    assert exported.stat().st_mode & 0o777 == 0o600
    document = json.loads(cdpctl(old, "definitions", "export").stdout)
    # Two exports of the same definitions are the same bytes; YAML and JSON say the same.
    assert cdpctl(old, "definitions", "export").stdout == json.dumps(document, indent=2) + "\n"
    from cdp_kit.yamltext import load_yaml

    assert load_yaml(exported.read_text()) == document

    assert [t["name"] for t in document["computed_traits"]] == ["big_orders_90d"]
    assert [s["id"] for s in document["segments"]] == ["buyers", "vip-buyers"]  # what it reads first
    journeys = {j["id"]: j for j in document["journeys"]}
    assert {i: (j["state"], len(j["versions"]), j["draft"] is not None) for i, j in journeys.items()} == {
        "idea": ("draft", 0, True),
        "old-promo": ("archived", 1, False),
        "vip-care": ("paused", 1, False),
        "welcome": ("active", 2, False),
    }
    assert journeys["welcome"]["versions"][1]["nodes"][0]["duration"] == "2h"
    # No secret: a CRM credential is the variable holding it.
    for connection in document["crm"]:
        assert all(set(source) == {"env"} for source in connection["credentials"].values())
    token = Path(old.run["admin_token_file"]).read_text().strip()
    assert token not in exported.read_text()

    before = json.loads(cdpctl(fresh, "definitions", "export").stdout)
    dry = cdpctl(fresh, "definitions", "import", str(exported), "--dry-run", "--json", check=False)
    assert {k: o["status"] for k, o in outcomes(dry).items() if k[0] in ("segments", "journeys")} == {
        ("segments", "buyers"): "created",
        ("segments", "vip-buyers"): "created",
        ("journeys", "idea"): "created",
        ("journeys", "old-promo"): "created",
        ("journeys", "vip-care"): "created",
        ("journeys", "welcome"): "created",
    }
    assert json.loads(cdpctl(fresh, "definitions", "export").stdout) == before  # a dry run changed nothing

    first = cdpctl(fresh, "definitions", "import", str(exported), "--json", check=False)
    statuses = {k: o["status"] for k, o in outcomes(first).items()}
    assert statuses[("computed_traits", "big_orders_90d")] == "created"
    assert statuses[("journeys", "welcome")] == "created"
    assert all(statuses[("models", m["name"])] == "unchanged" for m in document["models"])  # the shipped ones
    # The connector reads its connections from a file: the local CRMs' other ports are named, not changed.
    for connection in document["crm"]:
        crm = outcomes(first)[("crm", connection["id"])]
        assert crm["status"] == "conflicting" and "url" in crm["detail"], crm
    assert first.returncode == 1  # something needs a person: the report says what

    again = json.loads(cdpctl(fresh, "definitions", "export").stdout)
    assert without_crm_urls(again) == without_crm_urls(document)

    second = cdpctl(fresh, "definitions", "import", str(exported), "--json", check=False)
    assert {k: o["status"] for k, o in outcomes(second).items() if k[0] != "crm"} == {
        k: "unchanged" for k in outcomes(second) if k[0] != "crm"
    }
    assert json.loads(cdpctl(fresh, "definitions", "export").stdout) == again  # importing twice changed nothing

    # Changed on the fresh platform: conflicting, and left as it is until --replace.
    cdpctl(fresh, "journey", "resume", "vip-care")
    roll_back_toy_model(fresh)
    changed = tmp_path / "changed.json"
    edited = json.loads(json.dumps(document))
    edited["segments"][0]["definition"] = "computed.big_orders_90d >= 2"
    # A journey the service refuses is named with its version, node and field, and nothing of it is stored.
    broken = json.loads(json.dumps(journeys["welcome"]))
    for version in broken["versions"]:
        version["id"] = "broken"
    broken["id"], broken["versions"][1]["nodes"][0]["duration"] = "broken", "soon"
    edited["journeys"].append(broken)
    changed.write_text(json.dumps(edited))
    third = outcomes(cdpctl(fresh, "definitions", "import", str(changed), "--json", check=False))
    assert third[("segments", "buyers")]["status"] == "conflicting"
    assert "definition" in third[("segments", "buyers")]["detail"]
    assert third[("journeys", "vip-care")]["status"] == "conflicting"
    assert "state" in third[("journeys", "vip-care")]["detail"]
    assert third[("models", "toy")]["status"] == "conflicting"
    assert "--replace promotes 2.0.0" in third[("models", "toy")]["detail"]
    assert third[("journeys", "broken")]["status"] == "failed"
    assert third[("journeys", "broken")]["detail"].startswith("v2: nodes.later.duration: ")
    kept = json.loads(cdpctl(fresh, "definitions", "export").stdout)
    assert kept["segments"][0]["definition"] == "computed.big_orders_90d >= 1"
    assert "broken" not in {j["id"] for j in kept["journeys"]}
    assert {m["name"]: m["live_version"] for m in kept["models"]}["toy"] == "1.0.0"

    # One failing definition applies nothing, --replace or not: without it, --replace changes the rest.
    stopped = cdpctl(fresh, "definitions", "import", str(changed), "--replace", "--json", check=False)
    assert json.loads(stopped.stdout)["applied"] is False
    assert json.loads(cdpctl(fresh, "definitions", "export").stdout) == kept
    edited["journeys"].remove(broken)
    changed.write_text(json.dumps(edited))
    replaced = outcomes(cdpctl(fresh, "definitions", "import", str(changed), "--replace", "--json", check=False))
    assert replaced[("segments", "buyers")]["status"] == "replaced"
    assert replaced[("journeys", "vip-care")]["status"] == "replaced"
    assert replaced[("models", "toy")] == {
        "kind": "models", "name": "toy", "status": "replaced", "detail": "promoted 2.0.0 to live"
    }  # fmt: skip
    now = json.loads(cdpctl(fresh, "definitions", "export").stdout)
    assert now["segments"][0]["definition"] == "computed.big_orders_90d >= 2"
    assert {j["id"]: j["state"] for j in now["journeys"]}["vip-care"] == "paused"
    assert {m["name"]: m["live_version"] for m in now["models"]}["toy"] == "2.0.0"


SPRING = {**WELCOME_V1, "id": "spring-sale", "name": "Spring sale", "entry": {"api": True}}
SPRING_DRAFT = {**SPRING, "version": 2, "nodes": [{"id": "later", "type": "delay", "duration": "3h"}]}


def test_a_journeys_draft_goes_with_the_export_and_a_draft_the_document_lacks_is_named_never_discarded(
    platforms, tmp_path
):
    """A draft saved after publishing (unpublished edits) is in the export beside the live version, comes
    back on a fresh platform, and a platform's own draft the document lacks is named by the dry run and
    left as it is by the import (a document without a draft says nothing about one); `journey
    discard-draft` removes it."""
    old, fresh = platforms
    journey(old, tmp_path, "create", SPRING, "--publish")
    journey(old, tmp_path, "update", SPRING_DRAFT)
    exported = tmp_path / "with-draft.yaml"
    done = cdpctl(old, "definitions", "export", "--out", str(exported))
    assert "spring-sale" not in done.stderr  # nothing about it left out
    from cdp_kit.yamltext import load_yaml

    document = load_yaml(exported.read_text())
    [spring] = [j for j in document["journeys"] if j["id"] == "spring-sale"]
    assert [v["version"] for v in spring["versions"]] == [1]
    assert spring["draft"] == SPRING_DRAFT
    assert not [gap for gap in document["not_included"] if gap.get("name") == "spring-sale"]

    dry = outcomes(cdpctl(fresh, "definitions", "import", str(exported), "--dry-run", "--json", check=False))
    assert dry[("journeys", "spring-sale")]["status"] == "created"
    cdpctl(fresh, "definitions", "import", str(exported), "--json", check=False)
    on_fresh = json.loads(cdpctl(fresh, "journey", "get", "spring-sale", "--json").stdout)
    assert (on_fresh["version"], on_fresh["draftVersion"]) == ("1", "2")
    assert on_fresh["definition"]["nodes"][0]["duration"] == "1h"  # the live version is v1
    again = load_yaml(cdpctl(fresh, "definitions", "export").stdout)
    assert [j for j in again["journeys"] if j["id"] == "spring-sale"] == [spring]

    # A document without the draft (an older export, or one taken before the edit) never discards it.
    before_edit = json.loads(json.dumps(document))
    for entry in before_edit["journeys"]:
        if entry["id"] == "spring-sale":
            del entry["draft"]
    lacking = tmp_path / "without-draft.json"
    lacking.write_text(json.dumps(before_edit))
    dry = cdpctl(fresh, "definitions", "import", str(lacking), "--dry-run", "--json", check=False)
    said = outcomes(dry)[("journeys", "spring-sale")]
    assert said["status"] == "conflicting", said
    assert "draft v2 on the platform, not in the document" in said["detail"]
    assert "discard-draft spring-sale" in said["detail"]
    assert dry.returncode == 1
    for extra in ((), ("--replace",)):
        cdpctl(fresh, "definitions", "import", str(lacking), *extra, "--json", check=False)
        kept = json.loads(cdpctl(fresh, "journey", "get", "spring-sale", "--json").stdout)
        assert kept["draftVersion"] == "2", extra

    # Both ways: a draft in the document that the platform lacks is named too.
    done = cdpctl(fresh, "journey", "discard-draft", "spring-sale")
    assert done.stdout.strip() == "journey spring-sale (Spring sale): active, live v1 (draft v2 discarded)"
    now = outcomes(cdpctl(fresh, "definitions", "import", str(lacking), "--dry-run", "--json", check=False))
    assert now[("journeys", "spring-sale")]["status"] == "unchanged"
    missing = outcomes(cdpctl(fresh, "definitions", "import", str(exported), "--dry-run", "--json", check=False))
    said = missing[("journeys", "spring-sale")]
    assert said["status"] == "conflicting" and "draft v2 in the document, not on the platform" in said["detail"]
    replaced = outcomes(cdpctl(fresh, "definitions", "import", str(exported), "--replace", "--json", check=False))
    assert replaced[("journeys", "spring-sale")]["status"] == "replaced"
    back = json.loads(cdpctl(fresh, "journey", "get", "spring-sale", "--draft", "--json").stdout)
    assert back["definition"] == SPRING_DRAFT

    # A document whose next published version is the platform's draft number publishes over it, saying so.
    published = json.loads(json.dumps(before_edit))
    for entry in published["journeys"]:
        if entry["id"] == "spring-sale":
            entry["versions"].append({**SPRING_DRAFT, "nodes": [{"id": "later", "type": "delay", "duration": "4h"}]})
    newer = tmp_path / "published.json"
    newer.write_text(json.dumps(published))
    said = outcomes(cdpctl(fresh, "definitions", "import", str(newer), "--replace", "--json", check=False))
    assert said[("journeys", "spring-sale")]["status"] == "replaced"
    assert (
        "the draft v2 here was replaced by the document's published v2" in said[("journeys", "spring-sale")]["detail"]
    )
    live = json.loads(cdpctl(fresh, "journey", "get", "spring-sale", "--json").stdout)
    assert (live["version"], live.get("draftVersion", "0")) == ("2", "0")
    assert live["definition"]["nodes"][0]["duration"] == "4h"


def test_one_definition_that_fails_its_check_applies_nothing_and_the_dry_run_names_the_same(platforms, tmp_path):
    """Every definition is checked before any is applied: a document with a valid new segment and one bad
    definition creates nothing, and the dry run names the same failure the import does."""
    _, fresh = platforms
    document = json.loads(cdpctl(fresh, "definitions", "export").stdout)
    paid = {"id": "paid", "name": "Paid", "description": "", "definition": 'traits.plan = "paid"'}
    rush = {**WELCOME_V1, "id": "rush", "name": "Rush", "entry": {"api": True}, "priority": "high"}
    bad = {
        "broken": {"segments": [paid, {**paid, "id": "broken", "definition": "traits.plan = "}]},
        "spenders": {"segments": [paid, {**paid, "id": "spenders", "definition": "computed.spend_90d > 100"}]},
        "rush": {
            "segments": [paid],
            "journeys": [{"id": "rush", "state": "active", "versions": [rush], "draft": None}],
        },
    }
    for name, sections in bad.items():
        edited = json.loads(json.dumps(document))
        for kind, entries in sections.items():
            edited[kind] += entries
        file = tmp_path / f"with-{name}.json"
        file.write_text(json.dumps(edited))
        dry = cdpctl(fresh, "definitions", "import", str(file), "--dry-run", "--json", check=False)
        real = cdpctl(fresh, "definitions", "import", str(file), "--json", check=False)
        for done in (dry, real):
            assert done.returncode == 1, done.stdout + done.stderr
            failed = {k: o["detail"] for k, o in outcomes(done).items() if o["status"] == "failed"}
            assert [k[1] for k in failed] == [name], (name, failed)
            assert outcomes(done)[("segments", "paid")]["status"] == "created"
        assert failed == {k: o["detail"] for k, o in outcomes(dry).items() if o["status"] == "failed"}
        assert json.loads(real.stdout)["applied"] is False
        assert json.loads(cdpctl(fresh, "definitions", "export").stdout) == document, name  # nothing changed
        table = cdpctl(fresh, "definitions", "import", str(file), check=False)
        assert "nothing changed: 1 definition failed the check" in " ".join((table.stdout + table.stderr).split())
