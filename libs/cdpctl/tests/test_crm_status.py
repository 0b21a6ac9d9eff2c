"""`cdpctl crm status` as the CRM-administrator trial read it: the dead letters it shows are those the
connector holds now (what `cdpctl crm dead-letters` lists), a run's running total of dead-lettered records
is labelled as one, ids are shown whole, and a connection's last error carries its time and is marked past
once the connection writes again. The connector runs in-process on a real nats-server with the local
HubSpot and Salesforce (`test_crm.py`'s fixture)."""

from __future__ import annotations

import json

from .test_crm import change, crm_cli, eventually  # noqa: F401 - crm_cli is the fixture

TOKEN = "pat-local-hubspot"


async def test_status_shows_the_dead_letters_held_now_whole_ids_and_a_past_error_as_past(crm_cli):  # noqa: F811
    cli, hubspot, salesforce, bus = crm_cli
    # Both CRMs refuse the address: a dead letter each, held while the person's address is invalid.
    await change(bus, "person-2", email="not-an-email")

    async def letters():
        return json.loads((await cli.run("crm", "dead-letters", "--connection", "hubspot", "--json")).output)

    await eventually(letters)

    async def held_now(n: int):
        status = json.loads((await cli.run("crm", "status", "--json")).output)
        by_id = {c["id"]: c for c in status["connections"]}
        return by_id["hubspot"].get("deadLetters") == n and by_id["salesforce"].get("deadLetters") == n and status

    await eventually(lambda: held_now(1))

    # The address is fixed: the write succeeds and the dead letter is gone; the stream run still counts it.
    await change(bus, "person-2", email="grace@example.com")
    await eventually(lambda: hubspot.find("contacts", "cdp_id", "person-2"))
    await eventually(lambda: salesforce.find("Contact", "CDP_Id__c", "person-2"))
    await eventually(lambda: _empty(letters))
    status = await eventually(lambda: held_now(0))
    stream = next(r for r in status["runs"] if r["runId"] == "stream-hubspot")
    assert stream["deadLettered"] == "1"  # what the run dead-lettered over time, not what is held now
    table = (await cli.run("crm", "status")).output
    assert "dead letters now" in table and "dead-lettered" in table and "(total)" in table

    # Every id whole, however many columns: a backfill's run id, in the status table's latest runs.
    result = await cli.run("crm", "backfill", "hubspot", "--wait", "--json")
    run_id = json.loads(result.output)["runId"]
    table = (await cli.run("crm", "status")).output
    assert run_id in table.replace("\n", "").replace(" ", "").replace("│", "")

    # HubSpot refuses the token: the last error with its time; once HubSpot takes writes again, it is past.
    hubspot.tokens = set()
    await change(bus, "person-3", email="ada@example.com")

    async def connection(cid: str):
        status = json.loads((await cli.run("crm", "status", "--json")).output)
        return next(c for c in status["connections"] if c["id"] == cid)

    failing = await eventually(lambda: _state(connection("hubspot"), "CONNECTION_STATE_AUTH_FAILED"))
    assert failing["lastErrorReason"] == "auth" and failing["lastErrorAt"] and not failing.get("lastErrorPast")
    table = (await cli.run("crm", "status")).output
    assert "auth" in table and "past" not in table
    hubspot.tokens = {TOKEN}
    await eventually(lambda: hubspot.find("contacts", "cdp_id", "person-3"), timeout=60.0)
    recovered = await eventually(lambda: _state(connection("hubspot"), "CONNECTION_STATE_ACTIVE"))
    assert recovered["lastErrorReason"] == "auth" and recovered["lastErrorPast"] is True
    table = (await cli.run("crm", "status")).output
    assert "past: auth" in table


async def _empty(letters) -> bool:
    return await letters() == []


async def _state(connection, state: str):
    found = await connection
    return found.get("state") == state and found
