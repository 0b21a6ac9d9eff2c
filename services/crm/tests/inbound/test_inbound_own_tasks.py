"""The tasks the connector creates come back from HubSpot's search at the next poll. Their creation is the
CDP's own action, not news, so the poller does not spend a request per task of the account's budget
(which the writes share) asking HubSpot which contact each is about; a later change of one is news and
carries its contact."""

from __future__ import annotations

from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotPoller
from cdp_crm_emulators.hubspot import HubSpotEmulator

TOKEN = "pat-local-hubspot"
ASSOCIATIONS = "/crm/v4/objects/tasks/"


async def test_tasks_the_connector_created_are_read_back_without_asking_whom_each_is_about(store, session, collector):
    async with HubSpotEmulator() as hubspot:
        document = {"connections": [{"id": "hs", "kind": "hubspot", "account": "62515", "url": hubspot.base_url,
                                     "credentials": {"token": "HUBSPOT_TOKEN"},
                                     "mappings": [{"id": "contacts", "object": "contacts",
                                                   "match": {"cdp_id": "person.id"}, "fields": {"email": "traits.email"}}]}]}  # fmt: skip
        (connection,) = parse_connections(document)
        poller = HubSpotPoller(
            store, connection, session, TOKEN, SharedBudget(store, connection), collector.client(session),
            objects=("tasks",),
        )  # fmt: skip
        ada = hubspot.user_create("contacts", {"email": "ada@example.com", "cdp_id": "person-1"})
        # As the connector writes orchestration's tasks: upserted by their idempotency keys, about Ada.
        tasks = [
            hubspot.user_create(
                "tasks",
                {
                    "hs_task_subject": f"Call Ada {n}",
                    "hs_task_status": "NOT_STARTED",
                    "cdp_idempotency_key": f"cdp-{n}",
                },
                links=[("contacts", ada["id"], [])],
            )
            for n in range(3)
        ]
        assert await poller.poll() == 0  # the CDP's own actions are not news
        assert not [r for r in hubspot.requests if r.path.startswith(ASSOCIATIONS)]

        hubspot.clock.advance(5)
        hubspot.user_update("tasks", tasks[0]["id"], {"hs_task_status": "COMPLETED"})
        assert await poller.poll() == 1
        (event,) = collector.events("CRM Task Completed")
        assert event["properties"]["cdp_idempotency_key"] == "cdp-0"
        assert event["properties"]["cdp_person_id"] == "person-1"  # its contact, looked up for the news
        assert event["context"]["traits"] == {"email": "ada@example.com"}
