"""`cdpctl journey …` against the real orchestration service, in-process on a real nats-server: the
service's own refusal names the node and field, and a journey goes from file to archived with a person
enrolled, listed and exited on the way."""

from __future__ import annotations

import json

SLOW = """\
id: slow-welcome
version: 1
name: Slow welcome
priority: 5
category: reminder
timezone: UTC
entry: {api: true}
reentry: always
max_concurrent: 2
nodes:
  - {id: later, type: delay, duration: 1h}
"""


async def test_a_journey_from_yaml_file_to_archived_against_the_service(orchestration_cli, tmp_path):
    cli = orchestration_cli
    broken = tmp_path / "broken.yaml"
    broken.write_text(SLOW.replace("duration: 1h", "duration: soon"))
    result = await cli.run("journey", "validate", str(broken), "--json")
    assert result.exit_code == 1
    assert {"node": "later", "field": "duration"}.items() <= json.loads(result.output)["problems"][0].items()
    result = await cli.run("journey", "create", str(broken))
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output and "later" in result.output

    good = tmp_path / "slow.yaml"
    good.write_text(SLOW)
    result = await cli.run("journey", "create", str(good), "--publish")
    assert result.exit_code == 0, result.output
    assert "journey slow-welcome (Slow welcome): active, live v1" in result.output

    # an identifier is not a person id: refused naming the field and how to find the person's id
    result = await cli.run("journey", "enroll", "slow-welcome", "user_id:ada")
    assert result.exit_code == 1 and "person_id" in result.output, result.output
    assert "cdpctl profile TYPE VALUE" in result.output
    result = await cli.run("journey", "enroll", "slow-welcome", "p_1", "--json")
    assert result.exit_code == 0, result.output
    instance = json.loads(result.output)["instanceId"]
    listed = json.loads((await cli.run("journey", "instances", "--journey", "slow-welcome", "--json")).output)
    assert [(i["id"], i["personId"]) for i in listed] == [(instance, "p_1")]
    result = await cli.run("journey", "exit", instance, "--reason", "test")
    assert result.exit_code == 0 and "api:test" in result.output, result.output

    result = await cli.run("journey", "archive", "slow-welcome")
    assert result.exit_code == 0 and "archived" in result.output, result.output
    stats = json.loads((await cli.run("journey", "stats", "slow-welcome", "--json")).output)
    assert stats["entered"] == "1"


async def test_a_draft_is_shown_and_discarded_and_discarding_again_says_there_is_none(orchestration_cli, tmp_path):
    cli = orchestration_cli
    first = tmp_path / "slow.yaml"
    first.write_text(SLOW)
    result = await cli.run("journey", "discard-draft", "slow-welcome")
    assert result.exit_code == 1 and "NOT_FOUND" in result.output and "slow-welcome" in result.output
    assert (await cli.run("journey", "create", str(first))).exit_code == 0
    # Never published: the draft is all it holds; the refusal says what to do instead.
    result = await cli.run("journey", "discard-draft", "slow-welcome")
    assert result.exit_code == 1 and "FAILED_PRECONDITION" in result.output, result.output
    assert "cdpctl journey archive slow-welcome" in result.output
    assert (await cli.run("journey", "publish", "slow-welcome")).exit_code == 0

    edit = tmp_path / "slow-v2.yaml"
    edit.write_text(SLOW.replace("version: 1", "version: 2").replace("duration: 1h", "duration: 2h"))
    assert (await cli.run("journey", "update", str(edit))).exit_code == 0
    draft = json.loads((await cli.run("journey", "get", "slow-welcome", "--draft", "--json")).output)
    assert draft["definition"]["nodes"][0]["duration"] == "2h"

    result = await cli.run("journey", "discard-draft", "slow-welcome")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "journey slow-welcome (Slow welcome): active, live v1 (draft v2 discarded)"
    result = await cli.run("journey", "discard-draft", "slow-welcome")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "journey slow-welcome (Slow welcome): active, live v1 (no draft to discard)"
    answer = json.loads((await cli.run("journey", "discard-draft", "slow-welcome", "--json")).output)
    assert (answer["discarded"], answer["discardedVersion"], answer["journey"]["version"]) == (False, "0", "1")
    result = await cli.run("journey", "get", "slow-welcome", "--draft")
    assert result.exit_code == 1 and "slow-welcome has no draft (live v1)" in result.output
