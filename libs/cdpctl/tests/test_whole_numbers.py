"""Whole numbers read back as sent: `cdpctl profile` and `cdpctl export` showed `age 36` as 36.0 and an
order's `total 42` as 42.0 (a Segment-migration trial). A protobuf Struct holds every number as a double;
JSON does not tell 36 from 36.0, so what cdpctl renders from a Struct shows a double holding a whole number
exactly (within ±2^53) as an integer. Fractions and larger numbers stay as they are."""

from __future__ import annotations

import json
import re

from .test_people import until_ok


async def test_profile_and_export_show_whole_numbers_as_sent(people_cli, tmp_path):
    traits = {"age": 36, "rating": 4.5, "sizes": [38, 39.5], "address": {"floor": 3}, "huge": 2.0**60}
    await people_cli.send({"type": "identify", "userId": "grace", "messageId": "wn-1", "traits": traits})
    await people_cli.send(
        {
            "type": "track",
            "userId": "grace",
            "messageId": "wn-2",
            "event": "Order Completed",
            "properties": {"total": 42},
        }
    )
    result = await until_ok(people_cli, "profile", "user_id", "grace")
    assert result.exit_code == 0, result.output
    shown = {name: trait["value"] for name, trait in json.loads(result.output)["traits"].items()}
    assert shown == traits
    assert [type(shown[name]) for name in ("age", "rating", "huge")] == [int, float, float]
    assert type(shown["sizes"][0]) is int and type(shown["address"]["floor"]) is int

    exported = tmp_path / "grace.json"
    await people_cli.run("export", "user_id", "grace", "--output", str(exported))
    text = exported.read_text()
    profile = json.loads(text)["services"]["profile"]
    [age] = [version["value"] for version in profile["traits"]["age"]["history"]]
    assert age == 36 and type(age) is int
    [order] = [entry for entry in profile["timeline"] if entry["name"] == "Order Completed"]
    assert order["properties"] == {"total": 42} and type(order["properties"]["total"]) is int
    # As JSON values (after a colon, bracket or comma), not inside another number: an export's timestamp
    # such as 1796548342.024823 holds "42.0" by chance.
    assert not re.search(r"[:\[,]\s*(36|42)\.0\b", text), text
