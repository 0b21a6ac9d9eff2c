"""`cdpctl segment explain SEGMENT PERSON` against real segmentation, profile, identity and collector services:
each condition of the live definition marked ✓ / ✗ / ?, then whether the person is a member and whether
the definition holds now; a person named by id or by an identifier; --json for the service's answer; never
a value of the person's; errors name what is wrong."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

CITY = "Zanzibar-4471"  # a value of ann's that no answer may show


@pytest.fixture
async def explain_cli(people_cli, tmp_path):
    """people_cli with segmentation running too, three people and a live segment over them."""
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
        for user, traits in (
            ("ann", {"plan": "pro", "city": CITY}),
            ("bob", {"plan": "free", "city": "Oslo"}),
            ("cid", {"city": "Lima"}),
        ):
            await people_cli.send({"type": "identify", "userId": user, "messageId": f"m-{user}", "traits": traits})
        deadline = time.monotonic() + 20  # segmentation learns of the profiles on profiles.changed
        while True:
            document = json.loads((await people_cli.run("segment", "estimate", "traits.city exists", "--json")).output)
            if int(document.get("population", 0)) == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert int(document["population"]) == 3, document
        for segment_id, definition in (
            ("blocked", 'traits.city = "Oslo"'),
            ("paying", 'traits.plan = "pro" and not in_segment("blocked")'),
        ):
            created = await people_cli.run("segment", "create", segment_id, definition)
            assert created.exit_code == 0, created.output
        yield people_cli


async def person_id(cli, user: str) -> str:
    return json.loads((await cli.run("profile", "user_id", user)).output)["personId"]


async def test_a_member_is_shown_every_condition_that_held(explain_cli):
    ann = await person_id(explain_cli, "ann")
    shown = await explain_cli.run("segment", "explain", "paying", "user_id", "ann")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[:4] == [
        "✓ and",
        '  ✓ traits.plan = "pro"',
        "  ✓ not",
        '    ✗ in_segment("blocked")',
    ], shown.output
    assert lines[4].startswith(f"{ann} is a member of paying (since "), shown.output
    assert lines[4].endswith("its definition (version 1) holds for them now"), shown.output
    assert CITY not in shown.output and "note:" not in shown.output

    by_id = await explain_cli.run("segment", "explain", "paying", ann)
    assert by_id.exit_code == 0 and by_id.output == shown.output, by_id.output


async def test_a_non_member_is_shown_the_condition_that_failed_and_the_field_without_a_value(explain_cli):
    bob = await explain_cli.run("segment", "explain", "paying", "user_id", "bob")
    assert bob.exit_code == 0, bob.output
    assert '  ✗ traits.plan = "pro"' in bob.output.splitlines(), bob.output
    assert '    ✓ in_segment("blocked")' in bob.output.splitlines(), bob.output
    assert "is not a member of paying; its definition (version 1) does not hold for them now" in bob.output

    cid = await explain_cli.run("segment", "explain", "paying", "user_id", "cid")
    assert cid.exit_code == 0, cid.output
    assert '  ? traits.plan = "pro"  (no value: traits.plan)' in cid.output.splitlines(), cid.output


async def test_json_is_the_services_answer_without_the_persons_values(explain_cli):
    ann = await person_id(explain_cli, "ann")
    raw = await explain_cli.run("segment", "explain", "paying", ann, "--json")
    assert raw.exit_code == 0, raw.output
    document = json.loads(raw.output)
    assert (document["segmentId"], document["personId"], document["member"], document["matches"]) == (
        "paying",
        ann,
        True,
        True,
    )
    assert document["tree"]["kind"] == "and" and document["tree"]["result"] == "CONDITION_RESULT_TRUE"
    plan, negated = document["tree"]["operands"]
    assert (plan["text"], plan["fields"], plan["result"]) == (
        'traits.plan = "pro"',
        ["traits.plan"],
        "CONDITION_RESULT_TRUE",
    )
    assert negated["operands"][0]["segmentId"] == "blocked"
    assert CITY not in raw.output


async def test_errors_name_the_segment_or_the_person(explain_cli):
    unknown = await explain_cli.run("segment", "explain", "nope", "user_id", "ann")
    assert unknown.exit_code == 1 and "NOT_FOUND" in unknown.output and "segment_id" in unknown.output
    ghost = await explain_cli.run("segment", "explain", "paying", "p_ghost")
    assert ghost.exit_code == 1 and "NOT_FOUND" in ghost.output and "person_id" in ghost.output, ghost.output
    usage = await explain_cli.run("segment", "explain", "paying", "a", "b", "c")
    assert usage.exit_code == 2, usage.output
