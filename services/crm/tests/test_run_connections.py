"""A run names the connections it covers (`SyncRun.connection_ids`): a backfill or a stream run its one, a
replay of the dead letters of several connections - kept under none of them - each of them, so `cdpctl crm
runs` can say which connections it wrote to."""

from __future__ import annotations

from cdp.crm.v1 import crm_pb2
from cdp_crm.api import run_message
from cdp_crm.runs import new_run


def test_a_replay_over_several_connections_names_each_and_a_backfill_its_one():
    replay = {**new_run("replay", "", "", 1_000.0), "connections": ["hubspot", "salesforce"]}
    message = run_message("replay-1", replay)
    assert message.kind == crm_pb2.RUN_KIND_REPLAY and message.connection_id == ""
    assert list(message.connection_ids) == ["hubspot", "salesforce"]
    backfill = run_message("backfill-1", new_run("backfill", "hubspot", "contacts", 1_000.0))
    assert (backfill.connection_id, list(backfill.connection_ids)) == ("hubspot", ["hubspot"])
