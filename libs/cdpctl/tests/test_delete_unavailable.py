"""`cdpctl delete` while the bus does not take the deletion: the error names the request and how to see it
through. A privacy trial paused nats-server and deleted a person: profile answered UNAVAILABLE ("retry the
request"), the request id had been made by profile and was never shown, and asking again by person id
answered NOT_FOUND (the person was already gone from profile). cdpctl now makes the request id itself."""

from __future__ import annotations

import asyncio
import json
import re

from .test_people import until_ok


async def test_a_deletion_answered_unavailable_names_its_request_and_the_same_request_sees_it_through(
    people_cli, nats_server
):
    await people_cli.send({"type": "identify", "userId": "iris", "traits": {"plan": "pro"}, "messageId": "i1"})
    assert (await until_ok(people_cli, "profile", "user_id", "iris")).exit_code == 0
    person_id = json.loads((await people_cli.run("graph", "user_id", "iris")).output)["personId"]

    with nats_server.paused():  # stopped for certain (a thread may answer for a moment after SIGSTOP)
        # A hang guard only, not a speed goal.
        result = await asyncio.wait_for(people_cli.run("delete", person_id, "--yes"), timeout=120)
    assert result.exit_code == 1, result.output
    assert "is not complete" in result.output and "Traceback" not in result.output, result.output
    check = re.search(rf"`cdpctl delete {person_id} --request-id (\w+) --yes`", result.output.replace("\n", ""))
    assert check, result.output

    again = await people_cli.run("delete", person_id, "--request-id", check[1], "--yes", "--wait", "--timeout", "60")
    assert again.exit_code == 0, again.output
    confirmed = json.loads(again.output)
    assert confirmed["requestId"] == check[1]
    assert all(confirmed["acknowledged"].values()), confirmed
    assert (await people_cli.run("profile", "user_id", "iris")).exit_code != 0
