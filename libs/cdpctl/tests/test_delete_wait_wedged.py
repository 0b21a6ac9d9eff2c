"""`cdpctl delete --wait` against a nats-server that accepts connections and never answers (stopped with
SIGSTOP: the kernel still accepts on its port). The deletion itself is asked of profile over gRPC and
done; only the wait for every service's acknowledgement needs the bus. That wait used to hang (nats.py
retrying its connect for as long as the server stayed wedged); now it ends with an error that names the
server, says the deletion was requested and only its confirmation failed, and how to check it later."""

from __future__ import annotations

import asyncio
import json

from .test_bus_wedged import wedged  # noqa: F401  (the fixture: a port that accepts and never answers)
from .test_people import until_ok


async def test_delete_wait_on_a_wedged_nats_server_says_the_deletion_was_requested_and_how_to_check(
    people_cli,
    wedged,  # noqa: F811
    capfd,
):
    await people_cli.send({"type": "identify", "userId": "grace", "traits": {"plan": "pro"}, "messageId": "g1"})
    assert (await until_ok(people_cli, "profile", "user_id", "grace")).exit_code == 0
    person_id = json.loads((await people_cli.run("graph", "user_id", "grace")).output)["personId"]

    # A NATS URL may carry a user and password (run.json's does): the error shows the server without them.
    with_password = wedged.replace("nats://", "nats://cdpctl:s3cret-pw@")
    # A hang guard only (the command's own bound is a few seconds), not a speed goal.
    result = await asyncio.wait_for(
        people_cli.run("delete", "user_id", "grace", "--yes", "--wait", "--nats", with_password), timeout=120
    )
    assert result.exit_code == 1, result.output
    # profile's answer comes first (the record of the request), then the error.
    answer = json.loads(result.output[: result.output.rindex("}") + 1])
    request_id = answer["requestId"]
    error = result.output[result.output.rindex("}") + 1 :]
    assert "deletion" in error and "requested" in error, error
    assert "not answering" in error and wedged in error and "cdpctl status" in error, error
    # How to check later: the same request again (answered from its record, nothing deleted twice).
    assert f"cdpctl delete {person_id} --request-id {request_id} --yes --wait` and the same --nats" in error, error
    assert "s3cret-pw" not in result.output
    captured = capfd.readouterr()
    assert "Traceback" not in result.output + captured.out + captured.err

    # The deletion was done: profile no longer has her, and the check the error names confirms it.
    assert (await people_cli.run("profile", "user_id", "grace")).exit_code != 0
    again = await people_cli.run("delete", person_id, "--request-id", request_id, "--yes", "--wait", "--timeout", "30")
    assert again.exit_code == 0, again.output
    confirmed = json.loads(again.output)
    assert confirmed["requestId"] == request_id and confirmed["acknowledged"] == {"identity-privacy-0": True}
