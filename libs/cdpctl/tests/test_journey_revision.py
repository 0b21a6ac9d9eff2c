"""`cdpctl journey get` shows a journey's revision, and `update` / `publish` / `discard-draft` with
`--if-revision N` change it only while it is still at the revision the operator read, against the real
orchestration service (in-process, on a real nats-server).

Two operators work on one journey: Al reads it, Bea saves a new draft, and Al's update, publish or discard
made on what he read is refused (ABORTED: read it again), changing nothing; made with the revision he reads
then, it goes through. Without --if-revision a command does what it always did.
"""

from __future__ import annotations

import json

WELCOME = """\
id: welcome
version: {version}
name: {name}
priority: 5
category: reminder
timezone: UTC
entry: {{api: true}}
reentry: always
nodes:
  - {{id: later, type: delay, duration: {duration}}}
"""


def document(tmp_path, version: int, name: str, duration: str) -> str:
    path = tmp_path / f"welcome-{name.replace(' ', '-').replace(chr(39), '')}.yaml"
    path.write_text(WELCOME.format(version=version, name=name, duration=duration))
    return str(path)


async def revision(cli) -> int:
    result = await cli.run("journey", "get", "welcome", "--json")
    assert result.exit_code == 0, result.output
    return int(json.loads(result.output)["revision"])


async def draft_name(cli) -> str:
    return json.loads((await cli.run("journey", "get", "welcome", "--draft", "--json")).output)["name"]


def refused_as_stale(result) -> None:
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "ABORTED" in output and "journey welcome" in output and "read it again" in output, output
    assert "cdpctl journey get welcome" in output, output


async def test_get_shows_the_revision_and_each_change_saved_moves_it_on(orchestration_cli, tmp_path):
    cli = orchestration_cli
    assert (await cli.run("journey", "create", document(tmp_path, 1, "Welcome", "1h"))).exit_code == 0
    result = await cli.run("journey", "get", "welcome")
    assert result.exit_code == 0, result.output
    assert "revision 1" in result.output.splitlines()[0], result.output
    assert (await cli.run("journey", "publish", "welcome")).exit_code == 0
    assert (await cli.run("journey", "update", document(tmp_path, 2, "Next", "2h"))).exit_code == 0
    assert await revision(cli) == 3
    assert "revision 3" in (await cli.run("journey", "get", "welcome", "--draft")).output.splitlines()[0]


async def test_an_update_on_a_stale_read_is_refused_and_on_a_fresh_one_goes_through(orchestration_cli, tmp_path):
    cli = orchestration_cli
    assert (await cli.run("journey", "create", document(tmp_path, 1, "Welcome", "1h"), "--publish")).exit_code == 0
    read = await revision(cli)  # Al reads it
    assert (await cli.run("journey", "update", document(tmp_path, 2, "Bea's edit", "2h"))).exit_code == 0

    result = await cli.run("journey", "update", document(tmp_path, 2, "Al's edit", "3h"), "--if-revision", str(read))
    refused_as_stale(result)
    assert await draft_name(cli) == "Bea's edit"

    result = await cli.run(
        "journey", "update", document(tmp_path, 2, "Al's edit", "3h"), "--if-revision", str(await revision(cli))
    )
    assert result.exit_code == 0, result.output
    assert await draft_name(cli) == "Al's edit"


async def test_publish_and_discard_draft_on_a_stale_read_are_refused_and_change_nothing(orchestration_cli, tmp_path):
    cli = orchestration_cli
    assert (await cli.run("journey", "create", document(tmp_path, 1, "Welcome", "1h"), "--publish")).exit_code == 0
    assert (await cli.run("journey", "update", document(tmp_path, 2, "Reviewed", "2h"))).exit_code == 0
    read = await revision(cli)  # Al reviews the draft ...
    assert (await cli.run("journey", "update", document(tmp_path, 2, "Not reviewed", "9h"))).exit_code == 0  # Bea

    refused_as_stale(await cli.run("journey", "publish", "welcome", "--if-revision", str(read)))
    refused_as_stale(await cli.run("journey", "discard-draft", "welcome", "--if-revision", str(read)))
    got = json.loads((await cli.run("journey", "get", "welcome", "--json")).output)
    assert (got["version"], got["draftVersion"]) == ("1", "2") and await draft_name(cli) == "Not reviewed"

    now = str(await revision(cli))
    result = await cli.run("journey", "discard-draft", "welcome", "--if-revision", now, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["discarded"] is True
    assert (await cli.run("journey", "update", document(tmp_path, 2, "Reviewed", "2h"))).exit_code == 0
    result = await cli.run("journey", "publish", "welcome", "--if-revision", str(await revision(cli)))
    assert result.exit_code == 0 and "live v2" in result.output, result.output


async def test_an_if_revision_that_is_no_revision_is_refused_before_anything_is_sent(orchestration_cli, tmp_path):
    cli = orchestration_cli
    result = await cli.run("journey", "publish", "welcome", "--if-revision", "0")
    assert result.exit_code == 2 and "--if-revision" in result.output, result.output
    assert "0 is not in the range" in result.output, result.output
