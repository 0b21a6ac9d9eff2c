"""`cdpctl definitions import` against documents written to break it: every one is refused whole, before
any platform is asked anything, with a message naming the definition and field (or the line) and how to
fix it; never a traceback after half the document was applied. (No platform runs here: a document that
got past the checks would end in "no running platform", which these tests tell apart.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cdpctl.cli import main
from cdpctl.definitions_document import MAX_DOCUMENT_BYTES, check, dumps, loads

from .test_definitions import a_document, refusal

HEAD = "format: cdp-definitions\nversion: 1\n"
NO_PLATFORM = "no running platform"

# A computed trait and a segment that are fine, then a segment whose description YAML reads as a date:
# the import created the first two, then crashed with a TypeError and no report.
HALF_APPLIED = HEAD + (
    "computed_traits:\n"
    "  - {event_names: [Probe], event_type: track, name: half_applied_trait, op: count, window: 30d}\n"
    "segments:\n"
    "  - id: ok_segment_first\n"
    "    definition: 'traits.plan = \"pro\"'\n"
    "  - id: dated\n"
    "    definition: 'traits.plan = \"pro\"'\n"
    "    description: 2024-01-01\n"
)
LAUGHS = HEAD + "\n".join(
    ["a0: &a0 [x,x,x,x,x,x,x,x,x,x]"]
    + [f"a{n}: &a{n} [{','.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 9)]
    + [
        "segments: []",
        "journeys:",
        "  - {id: lol, state: draft, versions: [], draft: {id: lol, version: 1, bomb: *a8}}",
    ]
)


def run_import(tmp_path: Path, text: str, *options: str, name: str = "defs.yaml"):
    file = tmp_path / name
    file.write_text(text)
    home = str(tmp_path / "home")
    return CliRunner().invoke(main, ["--home", home, "definitions", "import", str(file), *options])


def refused(tmp_path: Path, text: str, *options: str) -> str:
    result = run_import(tmp_path, text, *options)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert NO_PLATFORM not in result.output  # refused before any service was asked anything
    return " ".join(result.output.split())


@pytest.mark.parametrize("options", [(), ("--dry-run",)])
def test_a_date_where_text_belongs_refuses_the_whole_document_naming_the_segment_and_field(tmp_path, options):
    message = refused(tmp_path, HALF_APPLIED, *options)
    assert "segments[1] (dated): field `description` must be a string" in message
    assert "2024-01-01" in message and "quote it" in message


def test_a_crm_connections_credentials_as_a_list_is_refused_naming_the_field(tmp_path):
    message = refused(tmp_path, HEAD + "crm:\n  - id: x\n    kind: hubspot\n    credentials: [a, b]\n")
    assert "crm[0] (x): field `credentials` must be a mapping" in message


def test_nesting_fifty_thousand_deep_is_refused_naming_the_line(tmp_path):
    message = refused(tmp_path, HEAD + "identity: " + "[" * 50_000 + "\n")
    assert "nested deeper than" in message and "line 3" in message


def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path):
    text = HEAD + "segments:\n  - {id: dup_a, definition: 'traits.plan = \"pro\"'}\nsegments: []\n"
    assert "key 'segments' appears twice, on lines 3 and 5" in refused(tmp_path, text)


def test_a_json_document_with_a_key_written_twice_is_refused_too(tmp_path):
    text = '{"format": "cdp-definitions", "version": 1, "segments": [{"id": "a", "definition": "x"}], "segments": []}'
    result = run_import(tmp_path, text, name="defs.json")
    assert result.exit_code == 1 and "key 'segments' appears twice" in result.output


def test_an_alias_bomb_is_refused_at_once_naming_the_alias(tmp_path):
    file = tmp_path / "laughs.yaml"
    file.write_text(LAUGHS)
    # A subprocess with a generous timeout: it only catches a hang (the bomb took minutes and 2 GB before).
    command = [sys.executable, "-m", "cdpctl.cli", "--home", str(tmp_path / "home"), "definitions", "import"]
    done = subprocess.run([*command, "--dry-run", str(file)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    output = " ".join((done.stdout + done.stderr).split())
    assert "alias *a0 on line 4" in output and "Traceback" not in output and NO_PLATFORM not in output


def test_an_endless_file_is_read_up_to_the_bound_and_refused_naming_it(tmp_path):
    command = [sys.executable, "-m", "cdpctl.cli", "--home", str(tmp_path / "home"), "definitions", "import"]
    done = subprocess.run([*command, "--dry-run", "/dev/zero"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    output = " ".join((done.stdout + done.stderr).split())
    assert "/dev/zero" in output and f"{MAX_DOCUMENT_BYTES // 2**20} MB" in output and "Traceback" not in output


def test_a_file_over_the_bound_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr("cdpctl.definitions_document.MAX_DOCUMENT_BYTES", 100)
    text = HEAD + "segments:\n" + "".join(f"  - {{id: s{n}, definition: x}}\n" for n in range(10))
    message = refused(tmp_path, text)
    assert "defs.yaml" in message and "larger than" in message


def test_text_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    file = tmp_path / "defs.yaml"
    file.write_bytes(HEAD.encode() + b"segments: [\xff\xfe]\n")
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "definitions", "import", str(file)])
    assert result.exit_code != 0 and "UTF-8" in result.output and NO_PLATFORM not in result.output


JOURNEY = {"id": "j", "version": 1, "name": "J", "entry": {"event": "A"}}
CONNECTION = {"id": "x", "kind": "hubspot", "credentials": {}, "mappings": []}
MODEL = {"name": "m", "live_version": "1", "versions": [{"version": "1", "sha256": "ab", "role": "live"}]}


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"segments": [{"id": "s", "definition": "x", "name": 7}]}, "segments[0] (s): field `name` must be a string"),
        (
            {"segments": [{"id": "s", "definition": "x", "tags": {"a": {1: "one"}}}]},
            "segments[0] (s): field `tags.a` has the key 1",
        ),
        (
            {"computed_traits": [{"name": "t", "op": "count", "window": 30}]},
            "computed_traits[0] (t): field `window`",
        ),
        ({"models": [{**MODEL, "live_version": 1}]}, "models[0] (m): field `live_version` must be a string"),
        (
            {"models": [{**MODEL, "versions": [{**MODEL["versions"][0], "canary_percent": "5"}]}]},
            "models[0] (m): field `versions[0].canary_percent` must be a number",
        ),
        ({"journeys": [{"id": "j", "state": "draft", "versions": [], "draft": [JOURNEY]}]}, "field `draft` must be"),
        ({"journeys": [{"id": "j", "state": ["active"], "versions": []}]}, "journeys[0] (j): field `state`"),
        ({"identity": {"matching_model": ["x"]}}, "field `identity.matching_model` must be a mapping or null"),
        ({"crm": [{**CONNECTION, "mappings": {"a": 1}}]}, "crm[0] (x): field `mappings` must be a list"),
        ({"crm": [{**CONNECTION, "url": 443}]}, "crm[0] (x): field `url` must be a string"),
        ({"crm": [{**CONNECTION, "credentials": {"token": {"env": 1}}}]}, "field `credentials.token` must name"),
    ],
)
def test_every_field_of_the_wrong_type_is_refused_naming_the_definition_and_field(sections, expected):
    assert expected in refusal(a_document(**sections))


def test_a_value_that_is_not_plain_data_is_refused_naming_where_it_is():
    doc = a_document(journeys=[{"id": "j", "state": "draft", "versions": [], "draft": {**JOURNEY, "seen": {1, 2}}}])
    assert "journeys[0] (j): field `draft.seen` must be" in refusal(doc)


def test_nesting_past_the_bound_is_refused_in_a_document_built_without_yaml():
    deep: list = []
    inner = deep
    for _ in range(2000):
        inner.append([])
        inner = inner[0]
    assert "nested deeper than" in refusal(a_document(identity={"matching_model": {"model": {"deep": deep}}}))


def test_an_unknown_field_of_a_computed_trait_is_left_to_the_import_to_report():
    check(a_document(computed_traits=[{"name": "t", "op": "count", "windw": "30d"}]), "defs.json")


def test_export_never_writes_an_alias_even_for_shared_values():
    shared = {"event": "Cart Abandoned"}
    versions = [{**JOURNEY, "entry": shared}, {**JOURNEY, "version": 2, "entry": shared}]
    doc = a_document(journeys=[{"id": "j", "state": "active", "versions": versions, "draft": None}])
    text = dumps(doc, Path("defs.yaml"))
    assert "&" not in text and "*" not in text
    assert loads(text, "defs.yaml") == json.loads(json.dumps(doc))


def test_a_value_that_slips_past_the_checks_fails_its_definition_and_the_import_goes_on():
    import asyncio
    import datetime

    from cdpctl.definitions_apply import FAILED, Apply
    from cdpctl.definitions_read import Services

    # check() refuses this document; Apply given it anyway reports the one definition, never a traceback.
    dated = {"id": "dated", "definition": 'traits.plan = "pro"', "description": datetime.date(2024, 1, 1)}
    apply = Apply(Services({}, ()), dry_run=False, replace=False)
    [outcome] = asyncio.run(apply.segments([dated], []))
    assert outcome.status == FAILED and "could not send it" in outcome.detail
