"""The Zoho CRM v8 emulator over plain HTTP: refresh-token OAuth, upsert, search, credits, modified-since."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from cdp_crm_emulators.zoho import ZohoEmulator

REFRESH = {
    "grant_type": "refresh_token",
    "client_id": "1000.LOCALZOHOCLIENT",
    "client_secret": "local-zoho-secret",
    "refresh_token": "1000.local-refresh-token",
}


async def _token(zoho: ZohoEmulator, **override) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{zoho.base_url}/oauth/v2/token", params={**REFRESH, **override}) as r:
            assert r.status == 200
            return await r.json()


async def _call(zoho, method, path, body=None, token=None, headers=None, params=None):
    token = token or (await _token(zoho))["access_token"]
    async with aiohttp.ClientSession() as session:
        h = {"Authorization": f"Zoho-oauthtoken {token}", **(headers or {})}
        async with session.request(method, zoho.base_url + path, json=body, headers=h, params=params) as r:
            raw = await r.read()
            return r.status, (orjson.loads(raw) if raw and r.content_type == "application/json" else raw)


def _contacts(n, start=0):
    return [
        {"Last_Name": f"Person {i}", "Email": f"p{i}@example.com", "CDP_Id": f"p{i}"} for i in range(start, start + n)
    ]


async def test_refresh_token_flow_and_its_errors():
    async with ZohoEmulator() as zoho:
        token = await _token(zoho)
        assert token["api_domain"] == zoho.base_url and token["token_type"] == "Bearer" and token["expires_in"] == 3600
        assert (await _token(zoho, client_secret="wrong")) == {"error": "invalid_client"}
        assert (await _token(zoho, refresh_token="1000.revoked")) == {"error": "invalid_code"}
        status, body = await _call(zoho, "GET", "/crm/v8/Contacts", token="1000.forged", params={"fields": "Email"})
        assert status == 401 and body["code"] == "INVALID_TOKEN"


async def test_upsert_matches_on_duplicate_check_fields_and_reports_each_record():
    async with ZohoEmulator() as zoho:
        token = (await _token(zoho))["access_token"]
        status, body = await _call(
            zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(2), "duplicate_check_fields": ["CDP_Id"]}, token
        )
        assert status == 200 and [r["action"] for r in body["data"]] == ["insert", "insert"]
        again = [
            {"CDP_Id": "p0", "Title": "Engineer"},
            {"CDP_Id": "new"},
            {"CDP_Id": "bad", "Last_Name": "X", "Email": "nope"},
        ]
        status, body = await _call(
            zoho, "POST", "/crm/v8/Contacts/upsert", {"data": again, "duplicate_check_fields": ["CDP_Id"]}, token
        )
        assert status == 207
        first, second, third = body["data"]
        assert (first["code"], first["action"], first["duplicate_field"]) == ("SUCCESS", "update", "CDP_Id")
        assert (second["code"], second["details"]["api_name"], second["details"]["json_path"]) == (
            "MANDATORY_NOT_FOUND",
            "Last_Name",
            "$.data[1].Last_Name",
        )
        assert (third["code"], third["details"]["api_name"], third["details"]["expected_data_type"]) == (
            "INVALID_DATA",
            "Email",
            "email",
        )
        assert len(zoho.records("Contacts")) == 2 and zoho.find("Contacts", "CDP_Id", "p0")["Title"] == "Engineer"


async def test_upsert_limits_and_unknown_fields():
    async with ZohoEmulator() as zoho:
        token = (await _token(zoho))["access_token"]
        status, body = await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(101)}, token)
        assert status == 400 and body["code"] == "LIMIT_EXCEEDED"
        status, body = await _call(
            zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(1), "duplicate_check_fields": ["Title"]}, token
        )
        assert status == 400 and body["details"]["api_name"] == "duplicate_check_fields"
        status, body = await _call(
            zoho, "POST", "/crm/v8/Contacts/upsert", {"data": [{"Last_Name": "X", "Shoe_Size": 42}]}, token
        )
        assert status == 400 and body["data"][0]["details"]["api_name"] == "Shoe_Size"
        assert zoho.records("Contacts") == []


async def test_cases_and_tasks_upsert_idempotently():
    async with ZohoEmulator() as zoho:
        token = (await _token(zoho))["access_token"]
        case = {"Subject": "Fraud signal", "Status": "New", "Case_Origin": "Web", "CDP_Idempotency_Key": "fraud-1"}
        task = {"Subject": "Call about churn", "Status": "Not Started", "CDP_Idempotency_Key": "churn-1"}
        for _ in range(2):
            assert (await _call(zoho, "POST", "/crm/v8/Cases/upsert", {"data": [case]}, token))[0] == 200
            assert (await _call(zoho, "POST", "/crm/v8/Tasks/upsert", {"data": [task]}, token))[0] == 200
        assert len(zoho.records("Cases")) == 1 and len(zoho.records("Tasks")) == 1


async def test_credits_run_out_with_limit_reached_and_return_after_24_hours():
    async with ZohoEmulator(daily_credits=2) as zoho:
        token = (await _token(zoho))["access_token"]
        for _ in range(2):
            status, _ = await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(1)}, token)
            assert status == 200
        status, body = await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(1, 5)}, token)
        assert status == 429 and body["code"] == "LIMIT_REACHED"
        assert len(zoho.records("Contacts")) == 1 and zoho.budget()["credits_used"] == 2
        zoho.clock.advance(86401)
        status, _ = await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(1, 5)}, token)
        assert status == 200


async def test_a_call_that_meets_an_injected_fault_used_its_credits():
    # Zoho deducts a call's credits when it arrives: a 429, a 500 or an answer lost after the write happen
    # inside a call already paid for.
    async with ZohoEmulator(daily_credits=4) as zoho:
        token = (await _token(zoho))["access_token"]
        zoho.faults.throttle_next(1)
        zoho.faults.fail_next(1, status=500)
        zoho.faults.drop_after_commit_next(1)
        statuses = []
        for i in range(3):
            try:
                statuses.append(
                    (await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(1, i)}, token))[0]
                )
            except aiohttp.ClientError:
                statuses.append("dropped")
        assert statuses == [429, 500, "dropped"] and zoho.budget()["credits_used"] == 3
        status, _ = await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(1, 3)}, token)
        assert status == 200
        status, body = await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(1, 9)}, token)
        assert status == 429 and body["code"] == "LIMIT_REACHED" and zoho.budget()["refused"] == 1
        assert zoho.find("Contacts", "CDP_Id", "p9") is None
        assert [r.status for r in zoho.requests][-1] == 429  # a call refused for its credits is in the log too


async def test_search_by_criteria_pages_and_answers_204_when_empty():
    async with ZohoEmulator() as zoho:
        token = (await _token(zoho))["access_token"]
        await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(3)}, token)
        status, body = await _call(
            zoho,
            "GET",
            "/crm/v8/Contacts/search",
            token=token,
            params={"criteria": "((Email:equals:p1@example.com)or(CDP_Id:equals:p2))"},
        )
        assert status == 200 and sorted(r["CDP_Id"] for r in body["data"]) == ["p1", "p2"]
        status, body = await _call(
            zoho,
            "GET",
            "/crm/v8/Contacts/search",
            token=token,
            params={"criteria": "(Last_Name:starts_with:Person)", "per_page": "2"},
        )
        assert body["info"]["more_records"] is True and body["info"]["count"] == 2
        status, _ = await _call(
            zoho, "GET", "/crm/v8/Contacts/search", token=token, params={"email": "nobody@example.com"}
        )
        assert status == 204
        status, body = await _call(
            zoho, "GET", "/crm/v8/Contacts/search", token=token, params={"criteria": "(Shoe:equals:1)"}
        )
        assert status == 400


async def test_user_edits_show_up_in_modified_since_reads():
    async with ZohoEmulator() as zoho:
        token = (await _token(zoho))["access_token"]
        await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(2)}, token)
        since = zoho.records("Contacts")[0]["Modified_Time"]
        status, _ = await _call(
            zoho,
            "GET",
            "/crm/v8/Contacts",
            token=token,
            params={"fields": "Email"},
            headers={"If-Modified-Since": since},
        )
        assert status == 304
        zoho.clock.advance(5)
        edited = zoho.user_update("Contacts", zoho.find("Contacts", "CDP_Id", "p1")["id"], {"Email_Opt_Out": True})
        opened = zoho.user_create("Cases", {"Subject": "Where is my order", "Status": "New", "Case_Origin": "Phone"})
        status, body = await _call(
            zoho,
            "GET",
            "/crm/v8/Contacts",
            token=token,
            params={"fields": "Email,Email_Opt_Out,Modified_Time"},
            headers={"If-Modified-Since": since},
        )
        assert status == 200 and [(r["id"], r["Email_Opt_Out"]) for r in body["data"]] == [(edited["id"], True)]
        status, body = await _call(
            zoho,
            "GET",
            "/crm/v8/Cases/search",
            token=token,
            params={"criteria": f"(Modified_Time:greater_than:{since})"},
        )
        assert [r["id"] for r in body["data"]] == [opened["id"]]


@pytest.mark.parametrize("fault", ["429", "500", "drop", "reject"])
async def test_faults(fault):
    async with ZohoEmulator() as zoho:
        token = (await _token(zoho))["access_token"]
        path, body = "/crm/v8/Contacts/upsert", {"data": _contacts(2)}
        if fault in ("429", "500"):
            zoho.faults.fail_next(1, status=int(fault))
            status, answer = await _call(zoho, "POST", path, body, token)
            assert status == int(fault) and answer["status"] == "error" and zoho.records("Contacts") == []
        elif fault == "drop":
            zoho.faults.drop_after_commit_next(1)
            with pytest.raises(aiohttp.ClientError):
                await _call(zoho, "POST", path, body, token)
            status, answer = await _call(zoho, "POST", path, body, token)
            assert [r["action"] for r in answer["data"]] == ["update", "update"] and len(zoho.records("Contacts")) == 2
        else:
            zoho.faults.reject(
                lambda module, record: record.get("CDP_Id") == "p1", message="blocked by a validation rule"
            )
            status, answer = await _call(zoho, "POST", path, body, token)
            assert status == 207 and [r["status"] for r in answer["data"]] == ["success", "error"]


def _sdk_upsert_and_search(base_url: str, workdir: str) -> tuple[list[str], list[str]]:
    """Runs in a thread: the Zoho CRM SDK (v8) unchanged, its Environment pointed at the emulator."""
    from zohocrmsdk.src.com.zoho.api.authenticator.oauth_token import OAuthToken
    from zohocrmsdk.src.com.zoho.api.authenticator.store import FileStore
    from zohocrmsdk.src.com.zoho.crm.api import HeaderMap, ParameterMap
    from zohocrmsdk.src.com.zoho.crm.api.dc.data_center import DataCenter
    from zohocrmsdk.src.com.zoho.crm.api.initializer import Initializer
    from zohocrmsdk.src.com.zoho.crm.api.record import BodyWrapper, Record, RecordOperations, SearchRecordsParam
    from zohocrmsdk.src.com.zoho.crm.api.sdk_config import SDKConfig

    environment = DataCenter.Environment(base_url, f"{base_url}/oauth/v2/token", base_url)
    token = OAuthToken(
        client_id=REFRESH["client_id"], client_secret=REFRESH["client_secret"], refresh_token=REFRESH["refresh_token"]
    )
    config = SDKConfig(auto_refresh_fields=False, pick_list_validation=False)
    Initializer.initialize(
        environment=environment,
        token=token,
        store=FileStore(f"{workdir}/tokens.txt"),
        sdk_config=config,
        resource_path=workdir,
    )
    operations = RecordOperations("Contacts")
    actions = []
    for title in ("Analyst", "Engineer"):
        record = Record()
        record.add_key_value("Last_Name", "Lovelace")
        record.add_key_value("Email", "ada@example.com")
        record.add_key_value("Title", title)
        body = BodyWrapper()
        body.set_data([record])
        body.set_duplicate_check_fields(["Email"])
        response = operations.upsert_records(body, HeaderMap())
        actions += [
            f"{item.get_details()['id']}:{item.get_message().get_value()}" for item in response.get_object().get_data()
        ]
    params = ParameterMap()
    params.add(SearchRecordsParam.criteria, "(Email:equals:ada@example.com)")
    found = operations.search_records(params, HeaderMap()).get_object().get_data()
    return actions, [record.get_key_value("Title") for record in found]


async def test_the_zoho_sdk_unchanged_upserts_and_searches_against_the_emulator(tmp_path):
    import asyncio

    async with ZohoEmulator() as zoho:
        actions, titles = await asyncio.to_thread(_sdk_upsert_and_search, zoho.base_url, str(tmp_path))
        [contact] = zoho.records("Contacts")
        assert actions == [f"{contact['id']}:record added", f"{contact['id']}:record updated"]
        assert titles == ["Engineer"]


async def test_the_query_api_finds_records_by_a_body_and_update_records_never_creates():
    """COQL (``POST /crm/v8/coql``): ``in`` compares text without case, pages by limit/offset, 204 for none,
    an unknown column is INVALID_QUERY. Update Records (``PUT /crm/v8/<Module>``) changes by id only."""
    async with ZohoEmulator() as zoho:
        status, _ = await _call(zoho, "POST", "/crm/v8/Contacts/upsert", {"data": _contacts(3)})
        assert status == 200
        ada = zoho.user_create("Contacts", {"Last_Name": "Lovelace", "Email": "ADA@example.com", "Phone": "+4420"})
        query = "select Email, CDP_Id from Contacts where Email in ('ada@example.com', 'p1@example.com') limit 1"
        status, body = await _call(zoho, "POST", "/crm/v8/coql", {"select_query": query})
        assert status == 200 and body["info"] == {"count": 1, "more_records": True}
        (first,) = body["data"]
        status, body = await _call(zoho, "POST", "/crm/v8/coql", {"select_query": query + " offset 1"})
        assert {first["id"], body["data"][0]["id"]} == {ada["id"], zoho.find("Contacts", "CDP_Id", "p1")["id"]}
        assert set(body["data"][0]) == {"Email", "CDP_Id", "id"} and body["info"]["more_records"] is False
        none = "select Email from Contacts where (Phone = '+4421') or (Email = 'nobody@example.com')"
        assert (await _call(zoho, "POST", "/crm/v8/coql", {"select_query": none}))[0] == 204
        status, body = await _call(
            zoho, "POST", "/crm/v8/coql", {"select_query": "select Nope from Contacts where Phone = '1'"}
        )
        assert status == 400 and body["code"] == "INVALID_QUERY" and body["details"]["column_name"] == "Nope"

        gone = "5725767000000999999"
        update = {"data": [{"id": ada["id"], "Email": None, "Last_Name": "(deleted)"}, {"id": gone, "Email": None}]}
        status, body = await _call(zoho, "PUT", "/crm/v8/Contacts", update)
        assert status == 207
        assert [item["code"] for item in body["data"]] == ["SUCCESS", "INVALID_DATA"]
        assert body["data"][1]["details"]["api_name"] == "id"
        assert zoho.find("Contacts", "id", ada["id"])["Email"] is None and len(zoho.records("Contacts")) == 4
        status, body = await _call(zoho, "PUT", "/crm/v8/Contacts", {"data": [{"id": ada["id"], "Last_Name": ""}]})
        assert status == 400 and body["data"][0]["code"] == "MANDATORY_NOT_FOUND"
