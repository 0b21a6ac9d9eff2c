"""Where a new connection starts reading its CRM's changes (`inbound.start`): by default `now` - a CRM's
existing records are not news, only what changes from the connection's first start - or `all`, an initial
import of every existing record once, its progress in the `import-<connection>` run. A cursor already
stored is kept whatever the setting. A bad value stops start-up naming the field."""

from __future__ import annotations

import pytest

from cdp.crm.v1 import crm_pb2
from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.adapters.zoho import ZohoAdapter
from cdp_crm.api import run_message
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import MappingInvalid, parse_connections
from cdp_crm.inbound import Poller
from cdp_crm.inbound.dynamics import DynamicsReader
from cdp_crm.inbound.zoho import ZohoReader
from cdp_crm.state import RUNS
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.zoho import ZohoEmulator

HOUR = 3600.0


def _connection(kind: str, url: str, inbound: dict | None):
    credentials = (
        {"tenant_id": "T", "client_id": "C", "client_secret": "S"}
        if kind == "dynamics"
        else {"client_id": "Z_ID", "client_secret": "Z_SECRET", "refresh_token": "Z_REFRESH"}
    )
    obj, match, email = (
        ("contacts", {"cdp_id": "person.id"}, "emailaddress1")
        if kind == "dynamics"
        else ("Contacts", {"CDP_Id": "person.id"}, "Email")
    )
    raw = {"id": kind, "kind": kind, "account": f"org-{kind}", "url": url, "credentials": credentials,
           "mappings": [{"id": "contacts", "object": obj, "match": match, "fields": {email: "traits.email"}}]}  # fmt: skip
    if inbound is not None:
        raw["inbound"] = inbound
    (connection,) = parse_connections({"connections": [raw]})
    return connection


def _dynamics(store, session, dv, collector, inbound=None) -> Poller:
    connection = _connection("dynamics", dv.base_url, inbound)
    adapter = DynamicsAdapter(
        session, url=dv.base_url, authority=dv.base_url, tenant_id=dv.tenant,
        client_id=dv.client_id, client_secret=dv.client_secret,
    )  # fmt: skip
    reader = DynamicsReader(connection, adapter, SharedBudget(store, connection), clock=dv.clock)
    return Poller(store, connection, reader, collector.client(session), objects=("incidents",), clock=dv.clock)


def _zoho(store, session, zoho, collector, inbound=None) -> Poller:
    connection = _connection("zoho", zoho.base_url, inbound)
    adapter = ZohoAdapter(
        session, client_id=zoho.client_id, client_secret=zoho.client_secret,
        refresh_token="1000.local-refresh-token", accounts_url=zoho.base_url,
    )  # fmt: skip
    reader = ZohoReader(connection, adapter, SharedBudget(store, connection), clock=zoho.clock)
    return Poller(store, connection, reader, collector.client(session), objects=("Cases",), clock=zoho.clock)


@pytest.mark.parametrize("value", ["everything", 1])
def test_an_unknown_start_names_the_field(value):
    with pytest.raises(MappingInvalid) as refused:
        _connection("zoho", "http://127.0.0.1:1", {"start": value})
    assert refused.value.field == "zoho.inbound.start"
    with pytest.raises(MappingInvalid) as refused:
        _connection("zoho", "http://127.0.0.1:1", {"begin": "now"})
    assert refused.value.field == "zoho.inbound.begin"


async def test_by_default_a_new_connection_reads_what_changes_from_now_not_the_crms_history(store, session, collector):
    async with DynamicsEmulator() as dv, ZohoEmulator() as zoho:
        old_case = dv.user_create("incidents", {"title": "Last year"})
        zoho.user_create("Cases", {"Subject": "Last year", "Status": "New"})
        dv.clock.advance(HOUR)
        zoho.clock.advance(HOUR)
        pollers = [_dynamics(store, session, dv, collector), _zoho(store, session, zoho, collector)]
        for poller in pollers:
            assert await poller.poll() == 0
        dv.clock.advance(1)
        zoho.clock.advance(1)
        dv.user_create("incidents", {"title": "Today"})
        dv.user_update("incidents", old_case["incidentid"], {"statecode": 1, "statuscode": 5})
        zoho.user_create("Cases", {"Subject": "Today", "Status": "New"})
        for poller in pollers:
            await poller.poll()
        titles = sorted(e["properties"].get("title") or e["properties"].get("Subject") for e in collector.events())
        # An old record's change is news; the old record itself was not.
        assert titles == ["Last year", "Today", "Today"]
        assert sorted(collector.names()) == ["CRM Case Closed", "CRM Case Opened", "CRM Case Opened"]
        assert await store.get(RUNS, "import-dynamics") is None


async def test_start_all_imports_every_existing_record_once_with_its_progress_in_a_run(store, session, collector):
    async with ZohoEmulator() as zoho:
        for i in range(5):
            zoho.user_create("Cases", {"Subject": f"Case {i}", "Status": "New"})
        zoho.clock.advance(HOUR)
        poller = _zoho(store, session, zoho, collector, inbound={"start": "all"})
        await poller.poll()
        assert len(collector.events("CRM Case Opened")) == 5
        run = (await store.get(RUNS, "import-zoho")).doc
        assert (run["state"], run["processed"], run["created"]) == ("succeeded", 5, 5)
        message = run_message("import-zoho", run)
        assert (message.kind, message.state, message.processed) == (
            crm_pb2.RUN_KIND_BACKFILL,
            crm_pb2.RUN_STATE_SUCCEEDED,
            5,
        )
        # Imported once: the next reads go on from the cursor, and a restart does not import again.
        assert await _zoho(store, session, zoho, collector, inbound={"start": "all"}).poll() == 0
        assert collector.duplicates == 0


async def test_a_stored_cursor_is_kept_whatever_the_setting(store, session, collector):
    async with ZohoEmulator() as zoho:
        await _zoho(store, session, zoho, collector, inbound={"start": "all"}).poll()  # the cursor is stored
        zoho.clock.advance(HOUR)
        zoho.user_create("Cases", {"Subject": "Meanwhile", "Status": "New"})
        zoho.clock.advance(HOUR)
        await _zoho(store, session, zoho, collector).poll()  # now `now`: the cursor still says where it was
        assert [e["properties"]["Subject"] for e in collector.events()] == ["Meanwhile"]
