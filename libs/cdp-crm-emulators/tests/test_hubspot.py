"""The HubSpot emulator against hubspot-api-client (unchanged, host pointed here) and plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

import aiohttp
import orjson
import pytest
from aiohttp import web
from hubspot import HubSpot
from hubspot.crm.contacts import BatchInputSimplePublicObjectBatchInputUpsert, PublicObjectSearchRequest
from hubspot.crm.contacts.exceptions import ApiException
from hubspot.crm.lists import ListCreateRequest

from cdp_crm_emulators.hubspot import HubSpotEmulator

TOKEN = "pat-local-hubspot"


def _client(emulator: HubSpotEmulator, token: str = TOKEN) -> HubSpot:
    return HubSpot(access_token=token, host=emulator.base_url)


async def _post(emulator, path, body, token=TOKEN):
    async with aiohttp.ClientSession() as session:
        async with session.post(emulator.base_url + path, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
            body = await r.read()
            return r.status, dict(r.headers), (orjson.loads(body) if r.content_type == "application/json" else body)


def _upsert_inputs(n, start=0):
    return [
        {
            "idProperty": "email",
            "id": f"p{i}@example.com",
            "properties": {"firstname": f"P{i}", "cdp_churn_risk": "0.9"},
        }
        for i in range(start, start + n)
    ]


async def test_official_client_upserts_by_email_without_duplicates_and_reads_back():
    async with HubSpotEmulator() as hs:
        client = _client(hs)
        batch = BatchInputSimplePublicObjectBatchInputUpsert(inputs=_upsert_inputs(3))
        first = await asyncio.to_thread(client.crm.contacts.batch_api.upsert, batch)
        assert [r.new for r in first.results] == [True, True, True]
        again = await asyncio.to_thread(client.crm.contacts.batch_api.upsert, batch)
        assert [r.new for r in again.results] == [False, False, False]
        assert {r.id for r in again.results} == {r.id for r in first.results}
        assert len(hs.records("contacts")) == 3
        search = PublicObjectSearchRequest(
            filter_groups=[{"filters": [{"propertyName": "email", "operator": "EQ", "value": "p1@example.com"}]}],
            properties=["firstname", "email"],
        )
        found = await asyncio.to_thread(client.crm.contacts.search_api.do_search, search)
        assert found.total == 1 and found.results[0].properties["firstname"] == "P1"


async def test_official_client_sees_a_bad_token_as_401():
    async with HubSpotEmulator() as hs:
        client = _client(hs, token="pat-wrong")
        with pytest.raises(ApiException) as caught:
            await asyncio.to_thread(client.crm.contacts.basic_api.get_page)
        assert caught.value.status == 401
        assert "INVALID_AUTHENTICATION" in caught.value.body


async def test_official_client_manages_list_membership():
    async with HubSpotEmulator() as hs:
        client = _client(hs)
        ids = [
            r["id"]
            for r in (await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(2)}))[2][
                "results"
            ]
        ]
        created = await asyncio.to_thread(
            client.crm.lists.lists_api.create,
            ListCreateRequest(name="high value", object_type_id="0-1", processing_type="MANUAL"),
        )
        list_id = created.list.list_id
        added = await asyncio.to_thread(client.crm.lists.memberships_api.add, list_id, [*ids, "999999"])
        assert added.records_ids_added == ids and added.record_ids_missing == ["999999"]
        removed = await asyncio.to_thread(client.crm.lists.memberships_api.remove, list_id, [ids[0]])
        assert removed.record_ids_removed == [ids[0]]
        assert hs.members(list_id) == [ids[1]]


async def test_batch_of_more_than_100_inputs_is_refused_whole():
    async with HubSpotEmulator() as hs:
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(101)})
        assert status == 400 and body["category"] == "VALIDATION_ERROR"
        assert hs.records("contacts") == []


async def test_unknown_property_fails_the_batch_naming_the_property():
    async with HubSpotEmulator() as hs:
        inputs = [{"idProperty": "email", "id": "a@example.com", "properties": {"favourite_colour": "blue"}}]
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": inputs})
        assert status == 400 and "PROPERTY_DOESNT_EXIST" in body["message"] and "favourite_colour" in body["message"]


async def test_rejected_records_come_back_as_207_errors_while_the_rest_is_written():
    async with HubSpotEmulator() as hs:
        hs.faults.reject(lambda obj, record: record.get("email") == "p1@example.com", message="blocked domain")
        inputs = [*_upsert_inputs(3), {"idProperty": "email", "id": "not-an-email", "properties": {}}]
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": inputs})
        assert status == 207 and body["numErrors"] == 2
        assert sorted(e["context"]["ids"][0] for e in body["errors"]) == ["not-an-email", "p1@example.com"]
        assert sorted(r["properties"]["email"] for r in hs.records("contacts")) == ["p0@example.com", "p2@example.com"]


async def test_burst_window_throttles_with_policy_name_and_recovers_when_the_window_rolls():
    async with HubSpotEmulator(burst_limit=5) as hs:
        for i in range(5):
            status, headers, _ = await _post(hs, "/crm/v3/objects/contacts/search", {"limit": 1})
            assert status == 200
            assert headers["X-HubSpot-RateLimit-Remaining"] == str(4 - i)
            assert headers["X-HubSpot-RateLimit-Max"] == "5"
            assert headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)})
        assert status == 429 and body["policyName"] == "TEN_SECONDLY_ROLLING" and body["errorType"] == "RATE_LIMIT"
        assert hs.records("contacts") == []
        assert hs.budget()["over_budget"] == 1
        hs.clock.advance(10.01)
        status, _, _ = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)})
        assert status == 200


async def test_a_request_that_meets_an_injected_fault_was_counted_like_any_other():
    # HubSpot counts a request when it arrives: a 503, a 429 or a connection dropped after the write
    # happen inside it, so the request took a unit of the window all the same.
    async with HubSpotEmulator(burst_limit=4) as hs:
        hs.faults.fail_next(status=503)
        hs.faults.throttle_next()
        hs.faults.drop_after_commit_next()
        statuses = []
        for i in range(3):
            try:
                statuses.append(
                    (await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1, i)}))[0]
                )
            except aiohttp.ClientError:
                statuses.append("dropped")
        assert statuses == [503, 429, "dropped"] and hs.budget()["burst_used"] == 3
        status, headers, _ = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1, 3)})
        assert status == 200 and headers["X-HubSpot-RateLimit-Remaining"] == "0"
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1, 4)})
        assert status == 429 and body["policyName"] == "TEN_SECONDLY_ROLLING"
        assert hs.budget()["over_budget"] == 1
        assert [r.status for r in hs.requests][-1] == 429  # a request refused for the limit is in the log too


async def test_daily_limit_throttles_with_daily_policy_until_the_next_day():
    async with HubSpotEmulator(daily_limit=2) as hs:
        for _ in range(2):
            status, headers, _ = await _post(hs, "/crm/v3/objects/contacts/search", {})
        assert headers["X-HubSpot-RateLimit-Daily-Remaining"] == "0"
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/search", {})
        assert status == 429 and body["policyName"] == "DAILY"
        hs.clock.advance(86400)
        status, _, _ = await _post(hs, "/crm/v3/objects/contacts/search", {})
        assert status == 200


async def test_injected_faults_429_5xx_and_timeout_change_nothing():
    async with HubSpotEmulator() as hs:
        hs.faults.throttle_next(1)
        hs.faults.fail_next(1, status=502)
        hs.faults.timeout_next(1, seconds=0.05)
        statuses = [
            (await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)}))[0]
            for _ in range(3)
        ]
        assert statuses == [429, 502, 504]
        assert hs.records("contacts") == []
        status, _, _ = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)})
        assert status == 200 and len(hs.records("contacts")) == 1


async def test_dropped_connection_after_commit_keeps_the_write_and_a_retry_does_not_duplicate():
    async with HubSpotEmulator() as hs:
        hs.faults.drop_after_commit_next(1)
        with pytest.raises(aiohttp.ClientError):
            await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)})
        assert len(hs.records("contacts")) == 1
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)})
        assert status == 200 and body["results"][0]["new"] is False
        assert len(hs.records("contacts")) == 1


async def test_user_edits_reach_the_webhook_signed_v3():
    received: list[tuple[dict, bytes, list]] = []
    secret = "app-secret"

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((dict(request.headers), body, await request.json()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hubspot", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hubspot"
    try:
        async with HubSpotEmulator(webhook_url=url, client_secret=secret) as hs:
            contact = hs.user_create("contacts", {"email": "a@example.com"})
            ticket = hs.user_create("tickets", {"subject": "Refund please", "hs_pipeline_stage": "1"})
            hs.user_update("contacts", contact["id"], {"lifecyclestage": "customer"})
            await hs.drain_webhooks()
    finally:
        await runner.cleanup()
    events = [event for _, _, batch in received for event in batch]
    assert {(e["subscriptionType"], e["objectId"]) for e in events} == {
        ("contact.creation", int(contact["id"])),
        ("ticket.creation", int(ticket["id"])),
        ("contact.propertyChange", int(contact["id"])),
    }
    for headers, body, _ in received:
        expected = hmac.new(
            secret.encode(),
            b"POST" + url.encode() + body + headers["X-HubSpot-Request-Timestamp"].encode(),
            hashlib.sha256,
        )
        assert headers["X-HubSpot-Signature-v3"] == base64.b64encode(expected.digest()).decode()


async def test_a_ticket_a_user_opens_over_http_is_linked_to_the_contact_it_names():
    """README's "open one as a user would": the body the API create takes, associations included, so the
    connector finds the ticket's contact (it used to land on an anonymous person of its own)."""
    async with HubSpotEmulator() as hs:
        contact = hs.user_create("contacts", {"email": "a@example.com"})
        association = {"to": {"id": contact["id"]}, "types": [{"associationCategory": "HUBSPOT_DEFINED"}]}
        body = {"properties": {"subject": "Refund please"}, "associations": [association]}
        async with aiohttp.ClientSession() as session:
            async with session.post(hs.base_url + "/_emulator/user/tickets", json=body) as r:
                assert r.status == 201
                ticket = await r.json()
            missing = {**body, "associations": [{"to": {"id": "999999"}}]}
            async with session.post(hs.base_url + "/_emulator/user/tickets", json=missing) as r:
                assert r.status == 400 and "999999" in (await r.json())["message"]
        assert hs.associations("tickets", ticket["id"]) == [("contacts", contact["id"])]
        assert len(hs.records("tickets")) == 1  # the refused one made nothing


async def test_inspection_over_http_and_snapshot_survive_a_restart(tmp_path):
    snapshot = tmp_path / "hubspot.json"
    async with HubSpotEmulator(snapshot=snapshot) as hs:
        await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(2)})
        async with aiohttp.ClientSession() as session:
            async with session.get(hs.base_url + "/_emulator/records/contacts") as r:
                assert len(await r.json()) == 2
            async with session.get(hs.base_url + "/_emulator/budget") as r:
                assert (await r.json())["daily_used"] == 1
    async with HubSpotEmulator(snapshot=snapshot) as hs:
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(3)})
        assert status == 200
        assert [r["new"] for r in body["results"]] == [False, False, True]
        assert len({r["id"] for r in hs.records("contacts")}) == 3


async def test_search_is_limited_to_five_per_second_with_its_own_policy():
    async with HubSpotEmulator() as hs:
        statuses = [(await _post(hs, "/crm/v3/objects/contacts/search", {}))[0] for _ in range(5)]
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/search", {})
        assert statuses == [200] * 5 and status == 429 and body["policyName"] == "SECONDLY"
        status, _, _ = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)})
        assert status == 200  # other endpoints are not held back by the search limit
        hs.clock.advance(1.01)
        assert (await _post(hs, "/crm/v3/objects/contacts/search", {}))[0] == 200


async def test_a_task_created_for_a_contact_is_associated_with_it():
    async with HubSpotEmulator() as hs:
        client = _client(hs)
        contact_id = (await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(1)}))[2][
            "results"
        ][0]["id"]
        task = {
            "properties": {
                "hs_task_subject": "Call about churn risk",
                "hs_timestamp": "2026-12-04T10:00:00Z",
                "cdp_idempotency_key": "churn-1",
            },
            "associations": [
                {
                    "to": {"id": contact_id},
                    "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 204}],
                }
            ],
        }
        status, _, created = await _post(hs, "/crm/v3/objects/tasks", task)
        assert status == 201
        assert hs.associations("tasks", created["id"]) == [("contacts", contact_id)]
        status, _, duplicate = await _post(hs, "/crm/v3/objects/tasks", task)
        assert status == 409 and duplicate["category"] == "CONFLICT"
        ticket = (
            await _post(
                hs, "/crm/v3/objects/tickets", {"properties": {"subject": "Fraud signal", "hs_pipeline_stage": "1"}}
            )
        )[2]
        async with aiohttp.ClientSession() as session:
            url = f"{hs.base_url}/crm/v4/objects/tickets/{ticket['id']}/associations/default/contacts/{contact_id}"
            async with session.put(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
        linked = await asyncio.to_thread(
            client.crm.associations.v4.basic_api.get_page, "contacts", contact_id, "tickets"
        )
        assert [str(r.to_object_id) for r in linked.results] == [ticket["id"]]


async def test_rejections_can_be_injected_over_http_from_another_process():
    async with HubSpotEmulator() as hs:
        async with aiohttp.ClientSession() as session:
            fault = {
                "kind": "reject",
                "object": "contacts",
                "field": "email",
                "value": "p1@example.com",
                "message": "blocked",
            }
            async with session.post(hs.base_url + "/_emulator/faults", json=fault) as r:
                assert r.status == 200
        status, _, body = await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(2)})
        assert status == 207 and body["errors"][0]["context"]["ids"] == ["p1@example.com"]


async def test_official_client_batch_reads_by_email_and_updates_one_record():
    from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, SimplePublicObjectInput

    async with HubSpotEmulator() as hs:
        client = _client(hs)
        await _post(hs, "/crm/v3/objects/contacts/batch/upsert", {"inputs": _upsert_inputs(2)})
        read = BatchReadInputSimplePublicObjectId(
            id_property="email",
            properties=["firstname"],
            inputs=[{"id": "p0@example.com"}, {"id": "nobody@example.com"}],
        )
        found = await asyncio.to_thread(client.crm.contacts.batch_api.read, read)
        assert [r.properties["firstname"] for r in found.results] == ["P0"]
        assert found.errors[0].category == "OBJECT_NOT_FOUND" and found.errors[0].context["ids"] == [
            "nobody@example.com"
        ]
        update = SimplePublicObjectInput(properties={"lifecyclestage": "customer"})
        updated = await asyncio.to_thread(
            client.crm.contacts.basic_api.update, "p1@example.com", update, id_property="email"
        )
        assert updated.properties["lifecyclestage"] == "customer"
        assert hs.find("contacts", "email", "P1@example.com")["properties"]["lifecyclestage"] == "customer"


async def test_official_client_merges_two_contacts_keeping_the_primarys_values_and_the_others_extras():
    """merge_new_ids=False: the primary keeps its id (HubSpot's merge before its changelog "Updated merge
    functionality for contacts and companies"; the new id is test_hubspot_late_and_merged's)."""
    from hubspot.crm.contacts import PublicMergeInput

    async with HubSpotEmulator(merge_new_ids=False) as hs:
        client = _client(hs)
        primary = hs.user_create("contacts", {"email": "ada@example.com", "firstname": "Ada", "cdp_id": "p-1"})
        other = hs.user_create("contacts", {"email": "ada@work.example", "firstname": "Augusta", "phone": "+4412"})
        list_id = (await _post(hs, "/crm/v3/lists", {"name": "l", "objectTypeId": "0-1", "processingType": "MANUAL"}))[
            2
        ]["list"]["listId"]
        async with aiohttp.ClientSession() as session:
            url = f"{hs.base_url}/crm/v3/lists/{list_id}/memberships/add"
            async with session.put(url, json=[other["id"]], headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
        merge = PublicMergeInput(primary_object_id=primary["id"], object_id_to_merge=other["id"])
        merged = await asyncio.to_thread(client.crm.contacts.basic_api.merge, merge)
        assert merged.id == primary["id"]
        (only,) = hs.records("contacts")
        props = only["properties"]
        assert (props["email"], props["firstname"], props["phone"]) == ("ada@example.com", "Ada", "+4412")
        assert props["hs_merged_object_ids"] == other["id"]
        assert hs.members(list_id) == [primary["id"]]
        assert hs.find("contacts", "email", "ada@work.example") is None
        # Either record gone: 404.
        status, _, _ = await _post(
            hs, "/crm/v3/objects/contacts/merge", {"primaryObjectId": primary["id"], "objectIdToMerge": other["id"]}
        )
        assert status == 404
