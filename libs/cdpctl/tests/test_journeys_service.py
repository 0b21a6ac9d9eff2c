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
