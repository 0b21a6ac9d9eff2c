"""Every command that names a person takes it the same two ways: PERSON_ID, or TYPE VALUE (an identifier
identity resolves to the person holding it now). Against real collector, identity, profile and
orchestration services."""

from __future__ import annotations

import json

import pytest

WELCOME = {
    "id": "welcome",
    "version": 1,
    "name": "Welcome",
    "entry": {"api": True},
    "nodes": [{"id": "later", "type": "delay", "duration": "1d"}],
}


@pytest.fixture
async def person_cli(people_cli, tmp_path):
    """people_cli with orchestration running too, and one person (user_id ada) known to identity and profile."""
    from cdp_kit.service import serving
    from cdp_orchestration.__main__ import setup
    from cdp_orchestration.settings import OrchestrationSettings

    state = json.loads((people_cli.home / "run.json").read_text())
    settings = OrchestrationSettings(
        nats_url=people_cli.nats_url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2,
        shutdown_grace=1.0, store_url=f"sqlite:///{tmp_path / 'orchestration.db'}", answer_timeout=15.0,
    )  # fmt: skip
    async with serving(settings, setup) as runtime:
        state["services"]["orchestration"] = {"grpc": f"127.0.0.1:{runtime.grpc.port}"}
        (people_cli.home / "run.json").write_text(json.dumps(state))
        await people_cli.send({"type": "identify", "userId": "ada", "messageId": "m-ada", "traits": {"plan": "pro"}})
        known = await people_cli.run("profile", "user_id", "ada", "--wait", "20")  # the profile follows a moment later
        assert known.exit_code == 0, known.output
        yield people_cli


async def test_profile_enroll_and_instances_take_a_person_id_or_type_value_alike(person_cli, tmp_path):
    cli = person_cli
    by_identifier = json.loads((await cli.run("profile", "user_id", "ada")).output)
    person = by_identifier["personId"]
    by_id = await cli.run("profile", person)
    assert by_id.exit_code == 0, by_id.output
    assert json.loads(by_id.output)["personId"] == person
    assert json.loads(by_id.output)["traits"] == by_identifier["traits"]

    journey = tmp_path / "welcome.json"
    journey.write_text(json.dumps(WELCOME))
    created = await cli.run("journey", "create", str(journey), "--publish")
    assert created.exit_code == 0, created.output
    entered = await cli.run("journey", "enroll", "welcome", "user_id", "ada", "--json")
    assert entered.exit_code == 0, entered.output
    instance = json.loads(entered.output)["instanceId"]

    for named in ((person,), ("user_id", "ada")):
        listed = await cli.run("journey", "instances", "--person", *named, "--json")
        assert listed.exit_code == 0, (named, listed.output)
        assert [(i["id"], i["personId"]) for i in json.loads(listed.output)] == [(instance, person)], named

    # The same words, and the same refusal, everywhere.
    for args in (("profile",), ("journey", "enroll", "welcome"), ("decisions",)):
        wrong = await cli.run(*args, "user_id", "ada", "extra")
        assert wrong.exit_code == 2, (args, wrong.output)
        assert "name the person by PERSON_ID or by an identifier: TYPE VALUE" in wrong.output, (args, wrong.output)


async def test_an_identifier_type_alone_is_not_found_with_a_hint_to_give_its_value(person_cli):
    """`cdpctl profile user_id` reads as a person id "user_id": not found, and the answer says how to look
    a person up by an identifier instead of only that no person has that id."""
    alone = await person_cli.run("profile", "user_id")
    assert alone.exit_code == 1
    assert "NOT_FOUND" in alone.output and "cdpctl profile user_id VALUE" in alone.output
    other = await person_cli.run("profile", "p-unknown")
    assert other.exit_code == 1 and "NOT_FOUND" in other.output and "VALUE" not in other.output
