"""The Salesforce emulator against simple-salesforce (unchanged, instance_url + session_id) and plain HTTP."""

from __future__ import annotations

import asyncio
import ssl
import time

import aiohttp
import jwt
import orjson
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceExpiredSession

from cdp_crm_emulators.salesforce import SalesforceEmulator

SESSION = "00DDp0000000001!local-session"
V = "/services/data/v62.0"


def _client(sf: SalesforceEmulator, session_id: str = SESSION) -> Salesforce:
    session = requests.Session()
    session.verify = sf.ca_file
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override `verify`
    return Salesforce(instance_url=sf.base_url, session_id=session_id, session=session, version="62.0")


async def _call(sf, method, path, body=None, token=SESSION, headers=None, form=None):
    async with aiohttp.ClientSession() as session:
        kwargs = {"data": form} if form is not None else {"json": body} if body is not None else {}
        h = {"Authorization": f"Bearer {token}", **(headers or {})}
        tls = ssl.create_default_context(cafile=sf.ca_file) if sf.ca_file else None
        async with session.request(method, sf.base_url + path, headers=h, ssl=tls, **kwargs) as r:
            raw = await r.read()
            parsed = orjson.loads(raw) if r.content_type == "application/json" and raw else raw
            return r.status, dict(r.headers), parsed


def _contacts(n, start=0, **extra):
    return [
        {"attributes": {"type": "Contact"}, "CDP_Id__c": f"p{i}", "LastName": f"Person {i}", **extra}
        for i in range(start, start + n)
    ]


async def test_client_credentials_token_works_with_simple_salesforce_upsert_and_query():
    async with SalesforceEmulator(tls=True) as sf:
        async with aiohttp.ClientSession() as session:
            form = {
                "grant_type": "client_credentials",
                "client_id": "local-consumer-key",
                "client_secret": "local-consumer-secret",
            }
            tls = ssl.create_default_context(cafile=sf.ca_file)
            async with session.post(sf.base_url + "/services/oauth2/token", data=form, ssl=tls) as r:
                token = await r.json()
        assert token["token_type"] == "Bearer" and token["instance_url"] == sf.base_url
        client = _client(sf, token["access_token"])
        created = await asyncio.to_thread(
            client.Contact.upsert, "CDP_Id__c/p1", {"LastName": "Lovelace", "Email": "ada@example.com"}
        )
        updated = await asyncio.to_thread(client.Contact.upsert, "CDP_Id__c/p1", {"FirstName": "Ada"})
        assert (created, updated) == (201, 200)
        result = await asyncio.to_thread(
            client.query, "SELECT Id, FirstName, LastName FROM Contact WHERE CDP_Id__c = 'p1'"
        )
        assert result["totalSize"] == 1
        assert (result["records"][0]["FirstName"], result["records"][0]["LastName"]) == ("Ada", "Lovelace")
        assert client.api_usage["api-usage"].used == 3


async def test_bad_client_secret_and_bad_session_are_refused():
    async with SalesforceEmulator(tls=True) as sf:
        async with aiohttp.ClientSession() as session:
            form = {"grant_type": "client_credentials", "client_id": "local-consumer-key", "client_secret": "wrong"}
            tls = ssl.create_default_context(cafile=sf.ca_file)
            async with session.post(sf.base_url + "/services/oauth2/token", data=form, ssl=tls) as r:
                assert r.status == 400 and (await r.json())["error"] == "invalid_client"
        with pytest.raises(SalesforceExpiredSession) as caught:
            await asyncio.to_thread(_client(sf, "forged").query, "SELECT Id FROM Contact")
        assert caught.value.content[0]["errorCode"] == "INVALID_SESSION_ID"


def _assertion(key, **claims):
    payload = {
        "iss": "local-consumer-key",
        "sub": "sync@example.com",
        "aud": "https://login.salesforce.com",
        "exp": int(time.time()) + 180,
    }
    payload.update(claims)
    return jwt.encode(payload, key, algorithm="RS256")


async def test_jwt_bearer_verifies_the_rs256_assertion_against_the_configured_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    async with SalesforceEmulator(jwt_public_key=public, usernames={"sync@example.com"}) as sf:
        grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
        cases = {
            "good": _assertion(key),
            "wrong key": _assertion(other),
            "expired": _assertion(key, exp=int(time.time()) - 10),
            "wrong audience": _assertion(key, aud="https://evil.example.com"),
            "unknown user": _assertion(key, sub="someone@example.com"),
        }
        answers = {}
        for name, assertion in cases.items():
            status, _, body = await _call(
                sf, "POST", "/services/oauth2/token", form={"grant_type": grant, "assertion": assertion}
            )
            answers[name] = (status, body.get("error"))
        assert answers["good"] == (200, None)
        assert all(answer == (400, "invalid_grant") for name, answer in answers.items() if name != "good")
        status, _, body = await _call(
            sf, "POST", "/services/oauth2/token", form={"grant_type": grant, "assertion": _assertion(key)}
        )
        status, _, _ = await _call(sf, "GET", f"{V}/sobjects", token=body["access_token"])
        assert status == 200


async def test_query_pages_with_next_records_url_and_query_all_follows_it():
    async with SalesforceEmulator(tls=True) as sf:
        for start in range(0, 2600, 200):
            status, _, results = await _call(
                sf,
                "PATCH",
                f"{V}/composite/sobjects/Contact/CDP_Id__c",
                {"allOrNone": False, "records": _contacts(200, start)},
            )
            assert status == 200 and all(r["success"] for r in results)
        status, _, first = await _call(sf, "GET", f"{V}/query?q=SELECT+Id+FROM+Contact")
        assert first["totalSize"] == 2600 and len(first["records"]) == 2000 and first["done"] is False
        assert first["nextRecordsUrl"].startswith(f"{V}/query/")
        _, _, second = await _call(sf, "GET", first["nextRecordsUrl"])
        assert second["totalSize"] == 2600 and len(second["records"]) == 600 and second["done"] is True
        everything = await asyncio.to_thread(
            _client(sf).query_all, "SELECT Id, CDP_Id__c FROM Contact ORDER BY CDP_Id__c"
        )
        assert len({r["Id"] for r in everything["records"]}) == 2600


async def test_soql_errors_name_the_column_or_the_problem():
    async with SalesforceEmulator() as sf:
        status, _, body = await _call(sf, "GET", f"{V}/query?q=SELECT+Favourite__c+FROM+Contact")
        assert status == 400 and body[0]["errorCode"] == "INVALID_FIELD" and "Favourite__c" in body[0]["message"]
        status, _, body = await _call(sf, "GET", f"{V}/query?q=SELECT+Id+FROM+Contact+WHERE")
        assert status == 400 and body[0]["errorCode"] == "MALFORMED_QUERY"


async def test_collections_upsert_reports_errors_per_record_and_writes_the_rest():
    async with SalesforceEmulator() as sf:
        sf.faults.reject(lambda obj, values: values.get("LastName") == "Blocked", message="Blocked by validation rule")
        records = [
            *_contacts(2),
            {"attributes": {"type": "Contact"}, "CDP_Id__c": "no-name"},
            {"attributes": {"type": "Contact"}, "CDP_Id__c": "bad-email", "LastName": "X", "Email": "not-an-email"},
            {"attributes": {"type": "Contact"}, "CDP_Id__c": "unknown", "LastName": "X", "Shoe_Size__c": 42},
            {"attributes": {"type": "Contact"}, "CDP_Id__c": "blocked", "LastName": "Blocked"},
        ]
        status, _, results = await _call(
            sf, "PATCH", f"{V}/composite/sobjects/Contact/CDP_Id__c", {"allOrNone": False, "records": records}
        )
        assert status == 200
        assert [r["success"] for r in results] == [True, True, False, False, False, False]
        assert [r["errors"][0]["statusCode"] for r in results[2:]] == [
            "REQUIRED_FIELD_MISSING",
            "INVALID_EMAIL_ADDRESS",
            "INVALID_FIELD",
            "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        ]
        assert results[2]["errors"][0]["fields"] == ["LastName"]
        assert sorted(r["CDP_Id__c"] for r in sf.records("Contact")) == ["p0", "p1"]


async def test_collections_upsert_all_or_none_rolls_back_and_over_200_records_is_refused():
    async with SalesforceEmulator() as sf:
        records = [*_contacts(2), {"attributes": {"type": "Contact"}, "CDP_Id__c": "no-name"}]
        status, _, results = await _call(
            sf, "PATCH", f"{V}/composite/sobjects/Contact/CDP_Id__c", {"allOrNone": True, "records": records}
        )
        assert [r["errors"][0]["statusCode"] for r in results] == ["ALL_OR_NONE_OPERATION_ROLLED_BACK"] * 2 + [
            "REQUIRED_FIELD_MISSING"
        ]
        assert sf.records("Contact") == []
        status, _, body = await _call(
            sf, "PATCH", f"{V}/composite/sobjects/Contact/CDP_Id__c", {"records": _contacts(201)}
        )
        assert status == 400 and body[0]["errorCode"] == "EXCEEDED_ID_LIMIT"


async def test_unknown_field_on_single_upsert_is_invalid_field():
    async with SalesforceEmulator() as sf:
        status, _, body = await _call(
            sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p1", {"LastName": "X", "Shoe_Size__c": 42}
        )
        assert status == 400 and body[0]["errorCode"] == "INVALID_FIELD" and body[0]["fields"] == ["Shoe_Size__c"]


async def test_daily_limit_gives_request_limit_exceeded_and_the_usage_header_counts():
    async with SalesforceEmulator(daily_limit=2) as sf:
        for used in (1, 2):
            status, headers, _ = await _call(sf, "GET", f"{V}/sobjects")
            assert status == 200 and headers["Sforce-Limit-Info"] == f"api-usage={used}/2"
        status, headers, body = await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p1", {"LastName": "X"})
        assert status == 403 and body[0]["errorCode"] == "REQUEST_LIMIT_EXCEEDED"
        assert sf.records("Contact") == [] and sf.budget()["over_budget"] == 1
        sf.clock.advance(86401)
        status, _, _ = await _call(sf, "GET", f"{V}/sobjects")
        assert status == 200


async def test_a_request_that_meets_an_injected_fault_was_counted_against_the_daily_limit():
    # Salesforce counts a call when it arrives: a throttle, a 503 or an answer lost after the write happen
    # inside a call the org already counted towards its daily API requests.
    async with SalesforceEmulator(daily_limit=4) as sf:
        sf.faults.throttle_next(1)
        sf.faults.fail_next(1, status=503)
        sf.faults.drop_after_commit_next(1)
        statuses = []
        for i in range(3):
            try:
                statuses.append(
                    (await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p{i}", {"LastName": "X"}))[0]
                )
            except aiohttp.ClientError:
                statuses.append("dropped")
        assert statuses == [403, 503, "dropped"] and sf.budget()["daily_used"] == 3
        status, headers, _ = await _call(sf, "GET", f"{V}/sobjects")
        assert status == 200 and headers["Sforce-Limit-Info"] == "api-usage=4/4"
        status, headers, body = await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p9", {"LastName": "X"})
        assert status == 403 and body[0]["errorCode"] == "REQUEST_LIMIT_EXCEEDED"
        assert headers["Sforce-Limit-Info"] == "api-usage=4/4" and sf.budget()["over_budget"] == 1
        assert [r.status for r in sf.requests][-1] == 403  # a call refused for the limit is in the log too


async def test_case_and_task_upsert_by_idempotency_key_link_the_contact_by_external_id():
    async with SalesforceEmulator() as sf:
        await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p1", {"LastName": "Lovelace"})
        contact_id = sf.find("Contact", "CDP_Id__c", "p1")["Id"]
        case = {"Subject": "Fraud signal", "Priority": "High", "Contact": {"CDP_Id__c": "p1"}}
        task = {"Subject": "Call about churn risk", "Who": {"attributes": {"type": "Contact"}, "CDP_Id__c": "p1"}}
        for _ in range(2):  # a retry after a timeout changes nothing
            s1, _, _ = await _call(sf, "PATCH", f"{V}/sobjects/Case/CDP_Idempotency_Key__c/fraud-1", case)
            s2, _, _ = await _call(sf, "PATCH", f"{V}/sobjects/Task/CDP_Idempotency_Key__c/churn-1", task)
        assert (s1, s2) == (200, 200)
        [stored_case], [stored_task] = sf.records("Case"), sf.records("Task")
        assert stored_case["ContactId"] == contact_id and stored_case["Status"] == "New" and stored_case["CaseNumber"]
        assert stored_task["WhoId"] == contact_id and stored_task["Status"] == "Not Started"
        status, _, body = await _call(
            sf, "PATCH", f"{V}/sobjects/Case/CDP_Idempotency_Key__c/x", {"Contact": {"CDP_Id__c": "nobody"}}
        )
        assert status == 400 and body[0]["errorCode"] == "INVALID_FIELD"


async def test_composite_chains_references_and_all_or_none_rolls_back():
    async with SalesforceEmulator() as sf:
        request = {
            "allOrNone": True,
            "compositeRequest": [
                {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "c", "body": {"LastName": "Hopper"}},
                {
                    "method": "POST",
                    "url": f"{V}/sobjects/Case",
                    "referenceId": "k",
                    "body": {"Subject": "Help", "ContactId": "@{c.id}"},
                },
            ],
        }
        status, _, body = await _call(sf, "POST", f"{V}/composite", request)
        assert status == 200
        answers = body["compositeResponse"]
        assert [a["httpStatusCode"] for a in answers] == [201, 201]
        assert sf.records("Case")[0]["ContactId"] == answers[0]["body"]["id"]
        request["compositeRequest"][1]["body"] = {"Subject": "Help", "Bogus__c": 1}
        status, _, body = await _call(sf, "POST", f"{V}/composite", request)
        assert status == 200
        assert [a["httpStatusCode"] for a in body["compositeResponse"]] == [400, 400]
        assert len(sf.records("Contact")) == 1 and len(sf.records("Case")) == 1


async def test_bulk2_upsert_through_simple_salesforce_reports_successes_and_failures():
    async with SalesforceEmulator(tls=True) as sf:
        client = _client(sf)
        records = [{"CDP_Id__c": f"p{i}", "LastName": f"Person {i}", "Email": f"p{i}@example.com"} for i in range(500)]
        records.append({"CDP_Id__c": "broken", "LastName": "", "Email": "x@example.com"})
        results = await asyncio.to_thread(
            client.bulk2.Contact.upsert, records=records, external_id_field="CDP_Id__c", wait=0.05
        )
        assert results[0]["numberRecordsProcessed"] == 501 and results[0]["numberRecordsFailed"] == 1
        failed = await asyncio.to_thread(client.bulk2.Contact.get_failed_records, results[0]["job_id"])
        assert "REQUIRED_FIELD_MISSING" in failed and "broken" in failed
        again = await asyncio.to_thread(
            client.bulk2.Contact.upsert, records=records[:10], external_id_field="CDP_Id__c", wait=0.05
        )
        successes = await asyncio.to_thread(client.bulk2.Contact.get_successful_records, again[0]["job_id"])
        assert successes.splitlines()[0].startswith('"sf__Id","sf__Created"') or successes.startswith(
            "sf__Id,sf__Created"
        )
        assert len(sf.records("Contact")) == 500


async def test_bulk2_job_rules_over_plain_http():
    async with SalesforceEmulator() as sf:
        status, _, body = await _call(
            sf,
            "POST",
            f"{V}/jobs/ingest",
            {"object": "Contact", "operation": "upsert", "externalIdFieldName": "LastName"},
        )
        assert status == 400 and body[0]["errorCode"] == "INVALIDJOB"
        _, _, job = await _call(
            sf,
            "POST",
            f"{V}/jobs/ingest",
            {"object": "Contact", "operation": "upsert", "externalIdFieldName": "CDP_Id__c"},
        )
        assert job["state"] == "Open"
        async with aiohttp.ClientSession() as session:
            async with session.put(
                f"{sf.base_url}/{job['contentUrl']}",
                data=b"CDP_Id__c,LastName\nq1,One\nq2,Two\n",
                headers={"Authorization": f"Bearer {SESSION}", "Content-Type": "text/csv"},
            ) as r:
                assert r.status == 201
        status, _, _ = await _call(sf, "GET", f"{V}/jobs/ingest/{job['id']}/successfulResults")
        assert status == 400  # not complete yet
        await _call(sf, "PATCH", f"{V}/jobs/ingest/{job['id']}", {"state": "UploadComplete"})
        await sf.drain_jobs()
        _, _, info = await _call(sf, "GET", f"{V}/jobs/ingest/{job['id']}")
        assert info["state"] == "JobComplete" and info["numberRecordsProcessed"] == 2


async def test_user_edits_are_seen_by_modified_since_polling_on_system_modstamp():
    async with SalesforceEmulator() as sf:
        await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p1", {"LastName": "Lovelace"})
        await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p2", {"LastName": "Hopper"})
        cursor = max(r["SystemModstamp"] for r in sf.records("Contact"))
        sf.clock.advance(2)
        edited = sf.user_update("Contact", sf.find("Contact", "CDP_Id__c", "p2")["Id"], {"HasOptedOutOfEmail": True})
        opened = sf.user_create("Case", {"Subject": "Where is my order", "ContactId": edited["Id"]})
        soql = f"SELECT Id, SystemModstamp FROM Contact WHERE SystemModstamp > {cursor.replace('+0000', 'Z')}"
        _, _, changed = await _call(sf, "GET", f"{V}/query?q={soql.replace(' ', '+')}")
        assert [r["Id"] for r in changed["records"]] == [edited["Id"]]
        _, _, cases = await _call(sf, "GET", f"{V}/query?q=SELECT+Id,ContactId+FROM+Case+WHERE+IsClosed+=+false")
        assert [(r["Id"], r["ContactId"]) for r in cases["records"]] == [(opened["Id"], edited["Id"])]


async def test_faults_throttle_as_salesforce_does_and_a_dropped_answer_does_not_duplicate_on_retry():
    async with SalesforceEmulator() as sf:
        sf.faults.throttle_next(1)
        sf.faults.fail_next(1, status=503)
        statuses = [
            (await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p1", {"LastName": "X"}))[0] for _ in range(2)
        ]
        assert statuses == [403, 503] and sf.records("Contact") == []
        sf.faults.drop_after_commit_next(1)
        with pytest.raises(aiohttp.ClientError):
            await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p1", {"LastName": "X"})
        status, _, body = await _call(sf, "PATCH", f"{V}/sobjects/Contact/CDP_Id__c/p1", {"LastName": "X"})
        assert status == 200 and body["created"] is False and len(sf.records("Contact")) == 1


async def test_query_batch_size_header_sets_the_page_size():
    async with SalesforceEmulator() as sf:
        await _call(sf, "PATCH", f"{V}/composite/sobjects/Contact/CDP_Id__c", {"records": _contacts(200)})
        await _call(sf, "PATCH", f"{V}/composite/sobjects/Contact/CDP_Id__c", {"records": _contacts(100, 200)})
        _, _, page = await _call(
            sf, "GET", f"{V}/query?q=SELECT+Id+FROM+Contact", headers={"Sforce-Query-Options": "batchSize=200"}
        )
        assert len(page["records"]) == 200 and page["totalSize"] == 300 and not page["done"]
