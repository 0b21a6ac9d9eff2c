"""`cdpctl segment` against real segmentation, profile, identity and collector services: a live segment
is changed with `segment update` (who entered and exited), and `segment create` on an existing id names it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest


@pytest.fixture
async def segments_cli(people_cli, tmp_path):
    """people_cli with segmentation running too, and three people: two on plan pro, one on free."""
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
        for user, plan in (("ann", "pro"), ("bob", "pro"), ("cid", "free")):
            await people_cli.send(
                {"type": "identify", "userId": user, "messageId": f"m-{user}", "traits": {"plan": plan}}
            )
        deadline = time.monotonic() + 20  # segmentation learns of the profiles on profiles.changed
        while True:
            document = json.loads((await people_cli.run("segment", "estimate", 'traits.plan = "pro"', "--json")).output)
            if int(document.get("population", 0)) == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert int(document["population"]) == 3, document
        yield people_cli


async def test_segment_update_changes_a_live_segment_and_says_who_entered_and_exited(segments_cli):
    created = await segments_cli.run("segment", "create", "paid", 'traits.plan = "pro"')
    assert created.exit_code == 0 and "segment paid live: 2 members" in created.output, created.output

    again = await segments_cli.run("segment", "create", "paid", 'traits.plan = "free"')
    assert again.exit_code == 1
    assert "cdpctl segment update paid DEFINITION" in again.output, again.output
    assert "UpdateSegment" not in again.output

    updated = await segments_cli.run("segment", "update", "paid", 'traits.plan = "free"')
    assert updated.exit_code == 0, updated.output
    assert 'segment paid live: 1 member (traits.plan = "free"); 1 entered, 2 exited' in updated.output

    refused = await segments_cli.run("segment", "update", "paid", "traits.plan = ")
    assert refused.exit_code == 1 and "INVALID_ARGUMENT" in refused.output, refused.output
    missing = await segments_cli.run("segment", "update", "nobody", 'traits.plan = "pro"')
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output, missing.output


async def test_segment_members_is_a_table_of_person_ids_and_a_total_with_json_for_the_raw_answer(segments_cli):
    created = await segments_cli.run("segment", "create", "pros", 'traits.plan = "pro"')
    assert created.exit_code == 0, created.output
    persons = []
    for user in ("ann", "bob"):
        profile = json.loads((await segments_cli.run("profile", "user_id", user)).output)
        persons.append(profile["personId"])

    shown = await segments_cli.run("segment", "members", "pros")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    for person in persons:
        assert [line for line in lines if person in line], shown.output  # a row each
    assert lines[-1] == "2 members", shown.output
    assert "{" not in shown.output

    cut = await segments_cli.run("segment", "members", "pros", "--limit", "1")
    assert cut.output.splitlines()[-1] == "2 members (1 shown; --limit shows more)", cut.output

    raw = json.loads((await segments_cli.run("segment", "members", "pros", "--json")).output)
    assert sorted(m["personId"] for m in raw["members"]) == sorted(persons) and raw["total"] == "2", raw


async def test_create_update_and_estimate_show_the_services_warnings_about_the_profiles(segments_cli):
    # A marketer trial: a trait compared with the wrong type, or misspelt, gave an empty audience silently.
    created = await segments_cli.run("segment", "create", "numbered", "traits.plan = 1")
    assert created.exit_code == 0, created.output  # a warning, not an error: traits are open-ended
    assert "segment numbered live: 0 members" in created.output, created.output
    assert "warning: traits.plan is compared with a number, but the profiles hold text there" in created.output

    updated = await segments_cli.run("segment", "update", "numbered", 'traits.plna = "pro"')
    assert updated.exit_code == 0, updated.output
    assert "warning: traits.plna: no profile has this trait; did you mean traits.plan?" in updated.output

    estimated = await segments_cli.run("segment", "estimate", "consent.purpose:Marketing = true")
    assert estimated.exit_code == 0 and "0 of 3 people" in estimated.output, estimated.output
    assert "warning: consent.purpose:Marketing: no profile has this consent key" in estimated.output
    document = json.loads((await segments_cli.run("segment", "estimate", "traits.plan = 1", "--json")).output)
    assert document["warnings"] == ["traits.plan is compared with a number, but the profiles hold text there"]

    fine = await segments_cli.run("segment", "estimate", 'traits.plan = "pro"')
    assert fine.exit_code == 0 and "warning" not in fine.output, fine.output


async def test_segment_delete_shows_why_it_was_refused_and_force_deletes_it(people_cli, tmp_path):
    """Segmentation asks orchestration whether a live journey uses a segment before deleting it; when it
    cannot ask, nothing is deleted and the operator reads why and the way past it."""
    from cdp_kit.natsserver import free_port
    from cdp_kit.service import serving
    from cdp_segmentation.__main__ import setup
    from cdp_segmentation.settings import SegmentationSettings

    state = json.loads((people_cli.home / "run.json").read_text())
    settings = SegmentationSettings(
        nats_url=people_cli.nats_url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2,
        shutdown_grace=1.0, store_url=f"sqlite:///{tmp_path / 'segmentation.db'}",
        profile_address=state["services"]["profile"]["grpc"],
        orchestration_address=f"127.0.0.1:{free_port()}",  # nobody listens there
    )  # fmt: skip
    async with serving(settings, setup) as runtime:
        state["services"]["segmentation"] = {"grpc": f"127.0.0.1:{runtime.grpc.port}"}
        (people_cli.home / "run.json").write_text(json.dumps(state))
        created = await people_cli.run("segment", "create", "paid", 'traits.plan = "pro"')
        assert created.exit_code == 0, created.output

        refused = await people_cli.run("segment", "delete", "paid")
        assert refused.exit_code == 1 and "UNAVAILABLE" in refused.output, refused.output
        assert "orchestration service could not be asked" in refused.output, refused.output
        assert "force the deletion" in refused.output, refused.output
        listed = await people_cli.run("segments")
        assert "paid" in listed.output, listed.output

        forced = await people_cli.run("segment", "delete", "paid", "--force")
        assert forced.exit_code == 0, forced.output
        listed = await people_cli.run("segments")
        assert "paid" not in listed.output, listed.output
