"""Each adapter's public `read`, the one way the change readers reach a CRM: an authenticated GET taken
from the account's shared budget, with the adapter's own error mapping. Nothing outside `adapters/`
reaches into an adapter's private state."""

from __future__ import annotations

import re
from pathlib import Path

from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.isolation import REJECTED, THROTTLED
from cdp_crm.domain.mapping import parse_connections
from cdp_crm_emulators.dynamics import DynamicsEmulator

SOURCE = Path(__file__).resolve().parents[2] / "src" / "cdp_crm"


def test_nothing_outside_the_adapters_uses_an_adapters_private_members():
    private = re.compile(r"\badapters?(\[[^\]]*\])?\._[a-z]")
    offenders = [
        f"{path.relative_to(SOURCE)}:{n}"
        for path in SOURCE.rglob("*.py")
        if "adapters" not in path.relative_to(SOURCE).parts
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if private.search(line)
    ]
    assert offenders == []


def _dynamics(store, session, dv, limits=None):
    document = {"connections": [{
        "id": "dyn", "kind": "dynamics", "account": "org-dyn", "url": dv.base_url,
        "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
        **({"limits": limits} if limits else {}),
        "mappings": [{"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"},
                      "fields": {"emailaddress1": "traits.email"}}],
    }]}  # fmt: skip
    (connection,) = parse_connections(document)
    adapter = DynamicsAdapter(
        session, url=dv.base_url, authority=dv.base_url, tenant_id=dv.tenant,
        client_id=dv.client_id, client_secret=dv.client_secret,
    )  # fmt: skip
    return adapter, SharedBudget(store, connection)


async def test_a_read_is_taken_from_the_shared_budget_and_a_throttle_is_recorded_on_it(store, session):
    async with DynamicsEmulator(window_limit=2, window_seconds=300) as dv:
        adapter, budget = _dynamics(store, session, dv, limits={"burst": 100, "window_seconds": 300})
        first = await adapter.read("contacts", budget, dv.clock, what="contacts")
        assert first.error is None and first.body["value"] == []
        await adapter.read("contacts", budget, dv.clock)
        throttled = await adapter.read("contacts", budget, dv.clock)
        assert throttled.error is not None and throttled.error.reason == THROTTLED
        status = await budget.status(dv.clock())
        assert status["burst_remaining"] == 100 - 3
        assert status["blocked_until"] > dv.clock()  # Retry-After honoured by every sync of the account


async def test_a_link_outside_the_environment_is_refused_without_sending_the_token(store, session):
    async with DynamicsEmulator() as dv:
        adapter, budget = _dynamics(store, session, dv)
        refused = await adapter.read("https://elsewhere.example/api/data/v9.2/contacts", budget, dv.clock)
        assert refused.error is not None and (refused.error.reason, refused.error.code) == (REJECTED, "FOREIGN_LINK")
