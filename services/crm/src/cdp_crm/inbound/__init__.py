"""The feedback loop: CRM changes become CDP events, posted to the collector's HTTP API.

`core` holds what every CRM shares (the collector, event ids, the change -> event rule, the polling loop
with its persisted cursors); each CRM's change mechanism is a reader of its own: `hubspot` (search by
modification date, signed webhooks), `salesforce` (SOQL on SystemModstamp), `dynamics` (change tracking
delta links), `zoho` (If-Modified-Since listings). `open_poller` gives a connection its poller.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from cdp_crm.adapters import Adapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import Connection
from cdp_crm.inbound.core import Collector, CollectorRefused, CrmReadFailed, Poller, Reader
from cdp_crm.inbound.dynamics import DynamicsReader
from cdp_crm.inbound.hubspot import HubSpotPoller, HubSpotReader, HubSpotWebhooks, WebhookSweeper
from cdp_crm.inbound.news import event_id
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm.inbound.zoho import ZohoReader
from cdp_kit.storage import Store


def open_poller(
    store: Store,
    connection: Connection,
    adapter: Adapter,
    budget: SharedBudget,
    collector: Collector,
    session: aiohttp.ClientSession,
    secrets: dict[str, str],
    *,
    clock: Callable[[], float] = time.time,
    timeout: float = 30.0,
) -> Poller:
    """The poller of one connection's changes, with its CRM's reader. Salesforce, Dynamics and Zoho read
    through the connection's outbound adapter (its token); HubSpot with the private-app token."""
    reader: Reader
    if connection.kind == "hubspot":
        searches = getattr(adapter, "searches", None)  # the token's searches, the adapter's erasure lookups' too
        reader = HubSpotReader(
            connection, session, secrets["token"], budget, clock=clock, timeout=timeout, searches=searches
        )
    elif connection.kind == "salesforce":
        reader = SalesforceReader(connection, adapter, budget, clock=clock)  # type: ignore[arg-type]
    elif connection.kind == "dynamics":
        reader = DynamicsReader(connection, adapter, budget, clock=clock)  # type: ignore[arg-type]
    else:
        reader = ZohoReader(connection, adapter, budget, clock=clock)  # type: ignore[arg-type]
    return Poller(store, connection, reader, collector, clock=clock)


__all__ = [
    "Collector",
    "CollectorRefused",
    "CrmReadFailed",
    "HubSpotPoller",
    "HubSpotReader",
    "HubSpotWebhooks",
    "Poller",
    "WebhookSweeper",
    "event_id",
    "open_poller",
]
