"""The definitions document and the import's decisions that need no service: a document cdpctl cannot
use is refused naming the definition and field; segments come after what they refer to; YAML reads
back as written; a model's live version is never switched without --replace, and what no RPC can do
is reported as manual with what to do. (Against two real platforms: test_definitions_platform.py.)"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cdpctl.cli import main
from cdpctl.definitions_apply import CONFLICTING, CREATED, FAILED, MANUAL, REPLACED, UNCHANGED, Apply
from cdpctl.definitions_document import (
    DocumentError,
    check,
    differences,
    document,
    dumps,
    loads,
    ordered_segments,
    plain,
)
from cdpctl.definitions_read import Services

JOURNEY = {"id": "welcome", "version": 1, "name": "Welcome", "entry": {"segment": "no", "on": "entered"}}


def a_document(**sections) -> dict:
    empty = {"computed_traits": [], "segments": [], "models": [], "journeys": [], "identity": {}, "crm": []}
    return document({**empty, **sections}, [])


def refusal(doc: dict) -> str:
    with pytest.raises(DocumentError) as refused:
        check(doc, "defs.json")
    return str(refused.value)


def test_a_document_cdpctl_cannot_use_is_refused_naming_the_definition_and_field():
    assert "field `format`" in refusal({"format": "something else", "version": 1})
    assert "field `version` is 2" in refusal({**a_document(), "version": 2})

    journey = {"id": "welcome", "state": "active", "versions": [JOURNEY, {**JOURNEY, "version": 3}], "draft": None}
    message = refusal(a_document(journeys=[journey]))
    assert "journeys[0] (welcome)" in message and "versions[1]" in message

    segment = {"id": "vip"}
    assert "segments[0] (vip): field `definition` is missing" in refusal(a_document(segments=[segment]))

    twice = [{"id": "vip", "definition": "traits.plan = 'vip'"}] * 2
    assert "appears twice" in refusal(a_document(segments=twice))

    # A secret pasted in where the variable's name belongs is refused, never sent anywhere.
    connection = {"id": "hubspot", "kind": "hubspot", "credentials": {"token": "pat-na1-secret"}, "mappings": []}
    message = refusal(a_document(crm=[connection]))
    assert "crm[0] (hubspot): field `credentials.token`" in message and "pat-na1-secret" not in message

    model = {"name": "churn", "versions": [{"version": "1", "sha256": "ab", "role": "boss"}]}
    assert "models[0] (churn): field `versions[0].role`" in refusal(a_document(models=[model]))


def test_the_import_command_names_the_field_of_a_broken_document(tmp_path):
    broken = a_document(segments=[{"id": "vip", "definition": 42}])
    file = tmp_path / "defs.json"
    file.write_text(json.dumps(broken))
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "definitions", "import", str(file)])
    assert result.exit_code == 1
    assert "segments[0] (vip): field `definition` must be the segment's text" in result.output


def test_segments_come_after_the_segments_they_refer_to_then_by_id():
    segments = [{"id": i, "definition": "x"} for i in ("a-vip", "b-base", "c-other", "d-buyers")]
    depends_on = {"a-vip": ["d-buyers"], "d-buyers": ["b-base"]}
    ordered = [s["id"] for s in ordered_segments(segments, depends_on)]
    assert ordered == ["b-base", "d-buyers", "a-vip", "c-other"]


def test_yaml_reads_back_as_the_json_document_words_and_numbers_as_written():
    journey = {"id": "welcome", "state": "active", "versions": [plain({**JOURNEY, "version": 1.0})], "draft": None}
    doc = a_document(journeys=[journey])
    assert doc["journeys"][0]["versions"][0]["version"] == 1  # Struct's 1.0 is the journey's version 1
    for name in ("defs.yaml", "defs.json"):
        assert loads(dumps(doc, Path(name)), name) == doc  # `on`, `no` stay words (YAML 1.2)


def test_differences_name_the_fields_that_differ():
    a = {"id": "vip", "definition": "x", "nodes": [{"id": "n", "duration": "1h"}]}
    b = copy.deepcopy(a)
    b["nodes"][0]["duration"] = "2h"
    b["name"] = "VIP"
    assert differences(a, b) == ["name", "nodes[0].duration"]
    assert differences(a, copy.deepcopy(a)) == []


MODEL = {
    "name": "churn_risk",
    "live_version": "1.2.0",
    "versions": [
        {"version": "1.1.0", "sha256": "aa", "role": "inactive"},
        {"version": "1.2.0", "sha256": "bb", "role": "live"},
    ],
}


def plan(model: dict, present: dict | None, *, replace: bool) -> tuple[str, str]:
    apply = Apply(Services({}, ()), dry_run=True, replace=replace)
    [outcome] = asyncio.run(apply.models([model], [present] if present else []))
    return outcome.status, outcome.detail


def test_a_models_live_version_changes_only_with_replace_and_what_no_rpc_can_do_is_manual():
    here = copy.deepcopy(MODEL)
    assert plan(MODEL, here, replace=False) == (UNCHANGED, "")

    here["live_version"] = "1.1.0"
    here["versions"][0]["role"], here["versions"][1]["role"] = "live", "inactive"
    status, detail = plan(MODEL, here, replace=False)
    assert status == CONFLICTING and "live_version" in detail and "--replace promotes 1.2.0" in detail
    assert plan(MODEL, here, replace=True) == (REPLACED, "would promote 1.2.0 to live")

    # A version whose file this platform lacks cannot be deployed through any API: manual, named.
    status, detail = plan(MODEL, {**MODEL, "versions": MODEL["versions"][:1]}, replace=True)
    assert status == MANUAL and "version 1.2.0 is not deployed here" in detail

    # The same file under the same version with other contents is a conflict, never replaced.
    other = copy.deepcopy(MODEL)
    other["versions"][1]["sha256"] = "cc"
    status, detail = plan(MODEL, other, replace=True)
    assert status == CONFLICTING and "versions[1.2.0].sha256" in detail

    shadowed = copy.deepcopy(MODEL)
    shadowed["versions"][0]["role"] = "shadow"
    status, detail = plan(shadowed, MODEL, replace=True)
    assert status == MANUAL and "no RPC to give a deployed version that role" in detail

    status, detail = plan(MODEL, None, replace=True)
    assert status == MANUAL and "deploy its ONNX files" in detail


def test_export_without_a_running_platform_names_the_services_it_needs(bus_cli):
    result = CliRunner().invoke(main, ["--home", str(bus_cli.home), "definitions", "export"])
    assert result.exit_code == 1
    assert "no running platform with profile, segmentation, scoring, orchestration, identity, crm" in result.output


def test_a_computed_trait_a_model_here_reads_is_never_redefined_and_a_broken_one_names_its_field():
    services = Services({}, (), model_traits={"orders_90d"})
    trait = {"name": "orders_90d", "op": "count", "event_names": ["Order Completed"], "window": "90d"}
    apply = Apply(services, dry_run=False, replace=True)
    [outcome] = asyncio.run(apply.computed_traits([trait], []))
    assert outcome.status == CONFLICTING and "scoring defines it at every start" in outcome.detail

    broken = {"name": "big_orders", "op": "count", "windw": "90d"}
    [outcome] = asyncio.run(apply.computed_traits([broken], []))
    assert outcome.status == "failed" and "windw" in outcome.detail


def journeys_plan(wanted: dict, present: dict) -> tuple[str, str]:
    apply = Apply(Services({}, ()), dry_run=True, replace=False)
    [outcome] = asyncio.run(apply.journeys([wanted], [present]))
    return outcome.status, outcome.detail


def test_a_draft_only_one_side_has_is_named_and_a_document_without_one_never_discards_the_platforms():
    live = {"id": "welcome", "state": "active", "versions": [JOURNEY]}
    draft = {**JOURNEY, "version": 2, "name": "Welcome again"}
    here = {**live, "draft": draft}
    # An older document (no `draft` field) and one saying `draft: null` both lack it: named, not discarded.
    for lacking in (live, {**live, "draft": None}):
        status, detail = journeys_plan(lacking, here)
        assert status == CONFLICTING
        assert detail.startswith("draft v2 on the platform, not in the document: import leaves it")
        assert "cdpctl journey discard-draft welcome" in detail
    status, detail = journeys_plan({**live, "state": "paused"}, here)
    assert status == CONFLICTING and "differs in state" in detail and "draft v2 on the platform" in detail

    status, detail = journeys_plan({**live, "draft": draft}, {**live, "draft": None})
    assert status == CONFLICTING and detail.startswith("draft v2 in the document, not on the platform; ")
    assert journeys_plan({**live, "draft": draft}, here) == (UNCHANGED, "")
    status, detail = journeys_plan({**live, "draft": {**draft, "priority": 9}}, here)
    assert status == CONFLICTING and "draft.priority" in detail


def segments_plan(wanted: list[dict], **known) -> dict[str, tuple[str, str]]:
    apply = Apply(Services({}, ()), dry_run=True, replace=False, **known)
    return {o.name: (o.status, o.detail) for o in asyncio.run(apply.segments(wanted, []))}


def test_the_dry_run_fails_a_segment_that_does_not_parse_or_reads_what_exists_nowhere():
    """What segmentation would refuse is found before anything is created: the text, the computed traits
    and the segments it reads (on the platform or in the document)."""
    said = segments_plan(
        [
            {"id": "paid", "definition": 'traits.plan = "paid"'},
            {"id": "broken", "definition": "traits.plan = "},
            {"id": "spenders", "definition": "computed.spend_90d > 100"},
            {"id": "paid-spenders", "definition": 'in_segment("paid") and computed.orders_90d >= 1'},
            {"id": "lost", "definition": 'in_segment("nowhere")'},
        ],
        traits=frozenset({"orders_90d"}),
        segment_ids=frozenset({"paid", "paid-spenders"}),
    )
    assert said["paid"] == (CREATED, "would be created")
    assert said["paid-spenders"] == (CREATED, "would be created")
    assert said["broken"][0] == FAILED and "expected a value" in said["broken"][1]
    assert said["spenders"][0] == FAILED
    assert "reads computed.spend_90d, which is neither on the platform nor in the document" in said["spenders"][1]
    assert said["lost"][0] == FAILED and 'in_segment("nowhere")' in said["lost"][1]


def test_a_changed_published_version_is_never_said_to_change_with_replace():
    live = {"id": "welcome", "state": "active", "versions": [JOURNEY], "draft": None}
    changed = {**live, "versions": [{**JOURNEY, "name": "Welcome, changed"}]}
    status, detail = journeys_plan(changed, live)
    assert status == CONFLICTING and "published versions never change" in detail
    assert "--replace changes it" not in detail
    status, detail = journeys_plan({**live, "state": "paused"}, {**live, "state": "archived"})
    assert status == CONFLICTING and "archived here, which is final" in detail
    assert "--replace changes it" not in detail
    # What --replace can change still says so.
    status, detail = journeys_plan({**live, "state": "paused"}, live)
    assert status == CONFLICTING and detail.endswith("--replace changes it")
