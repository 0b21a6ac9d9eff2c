"""The Dataverse emulator: msal (unchanged) for the Entra ID token, then the Web API over plain HTTP."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import msal
import orjson
import pytest
import requests

from cdp_crm_emulators.dynamics import API, DynamicsEmulator

TENANT = "00000000-0000-0000-0000-0000000000aa"


async def _token(dv: DynamicsEmulator) -> str:
    async with aiohttp.ClientSession() as session:
        form = {
            "grant_type": "client_credentials",
            "client_id": "local-dynamics-client",
            "client_secret": "local-dynamics-secret",
            "scope": f"{dv.base_url}/.default",
        }
        async with session.post(f"{dv.base_url}/{TENANT}/oauth2/v2.0/token", data=form) as r:
            return (await r.json())["access_token"]


async def _call(dv, method, path, body=None, token=None, headers=None, raw=None):
    token = token or await _token(dv)
    async with aiohttp.ClientSession() as session:
        h = {"Authorization": f"Bearer {token}", **(headers or {})}
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        async with session.request(method, f"{dv.base_url}{API}/{path}", headers=h, data=data) as r:
            content = await r.read()
            parsed = orjson.loads(content) if content and r.content_type == "application/json" else content
            return r.status, r.headers.copy(), parsed


def _msal_token(dv: DynamicsEmulator, secret: str = "local-dynamics-secret") -> dict:
    """Runs in a thread: msal discovers the tenant's OpenID configuration as the app is built."""
    http = requests.Session()
    http.verify = dv.ca_file
    http.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override `verify`
    app = msal.ConfidentialClientApplication(
        "local-dynamics-client",
        client_credential=secret,
        authority=f"{dv.base_url}/{TENANT}",
        instance_discovery=False,  # this host is not a Microsoft cloud; discovery would ask login.microsoftonline.com
        http_client=http,
    )
    return app.acquire_token_for_client(scopes=[f"{dv.base_url}/.default"])


async def test_msal_acquires_a_client_credentials_token_that_the_web_api_accepts():
    async with DynamicsEmulator(tls=True) as dv:
        result = await asyncio.to_thread(_msal_token, dv)
        assert result["token_type"] == "Bearer" and result["expires_in"] > 3000
        bad = await asyncio.to_thread(_msal_token, dv, "wrong")
        assert bad["error"] == "invalid_client" and 7000215 in bad["error_codes"]
    async with DynamicsEmulator() as plain:
        plain.tokens.add(result["access_token"])
        status, _, _ = await _call(plain, "GET", "contacts", token=result["access_token"])
        assert status == 200


async def test_bad_token_is_401_with_a_bearer_challenge():
    async with DynamicsEmulator() as dv:
        status, headers, _ = await _call(dv, "GET", "contacts", token="forged")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")


async def test_upsert_by_alternate_key_creates_once_then_updates():
    async with DynamicsEmulator() as dv:
        path = "contacts(emailaddress1='ada@example.com')"
        status, headers, _ = await _call(dv, "PATCH", path, {"firstname": "Ada", "lastname": "Lovelace"})
        assert status == 204 and headers["OData-EntityId"].startswith(f"{dv.base_url}{API}/contacts(")
        status, _, _ = await _call(dv, "PATCH", path, {"jobtitle": "Analyst"})
        assert status == 204
        [contact] = dv.records("contacts")
        assert (contact["emailaddress1"], contact["firstname"], contact["jobtitle"], contact["fullname"]) == (
            "ada@example.com",
            "Ada",
            "Analyst",
            "Ada Lovelace",
        )


async def test_if_match_and_if_none_match_preconditions():
    async with DynamicsEmulator() as dv:
        path = "contacts(cdp_id='p1')"
        status, _, body = await _call(dv, "PATCH", path, {"lastname": "X"}, headers={"If-Match": "*"})
        assert status == 404 and body["error"]["code"] == "0x80040217" and dv.records("contacts") == []
        status, headers, _ = await _call(dv, "PATCH", path, {"lastname": "X"}, headers={"If-None-Match": "*"})
        assert status == 204
        etag = headers["ETag"]
        status, _, body = await _call(dv, "PATCH", path, {"lastname": "Y"}, headers={"If-None-Match": "*"})
        assert status == 412 and body["error"]["code"] == "0x80040237"
        status, _, _ = await _call(dv, "PATCH", path, {"lastname": "Y"}, headers={"If-Match": etag})
        assert status == 204
        status, _, body = await _call(dv, "PATCH", path, {"lastname": "Z"}, headers={"If-Match": etag})
        assert status == 412 and body["error"]["code"] == "0x80060882"
        assert dv.records("contacts")[0]["lastname"] == "Y"


async def test_unknown_property_gets_the_odata_error_naming_it():
    async with DynamicsEmulator() as dv:
        status, _, body = await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"shoesize": 42})
        assert status == 400 and body["error"]["code"] == "0x80060888" and "'shoesize'" in body["error"]["message"]


async def test_incident_binds_its_customer_by_alternate_key_and_is_idempotent():
    async with DynamicsEmulator() as dv:
        await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "Lovelace"})
        contact_id = dv.find("contacts", "cdp_id", "p1")["contactid"]
        case = {"title": "Fraud signal", "customerid_contact@odata.bind": "/contacts(cdp_id='p1')"}
        for _ in range(2):
            status, _, _ = await _call(dv, "PATCH", "incidents(cdp_idempotencykey='fraud-1')", case)
            assert status == 204
        [incident] = dv.records("incidents")
        assert incident["_customerid_contact_value"] == contact_id and incident["ticketnumber"].startswith("CAS-")


def _batch_body(boundary, changeset, operations, loose=()):
    lines = [f"--{boundary}", f"Content-Type: multipart/mixed; boundary={changeset}", ""]
    for n, (method, url, body) in enumerate(operations, start=1):
        lines += [
            f"--{changeset}",
            "Content-Type: application/http",
            "Content-Transfer-Encoding: binary",
            f"Content-ID: {n}",
            "",
        ]
        lines += [f"{method} {url} HTTP/1.1", "Content-Type: application/json", "", orjson.dumps(body).decode()]
    lines += [f"--{changeset}--", ""]
    for method, url in loose:
        lines += [
            f"--{boundary}",
            "Content-Type: application/http",
            "Content-Transfer-Encoding: binary",
            "",
            f"{method} {url} HTTP/1.1",
            "",
            "",
        ]
    lines += [f"--{boundary}--", ""]
    return "\r\n".join(lines).encode()


async def test_batch_change_set_is_all_or_nothing():
    async with DynamicsEmulator() as dv:
        ok = [
            ("PATCH", f"{dv.base_url}{API}/contacts(cdp_id='p1')", {"lastname": "One"}),
            (
                "POST",
                f"{dv.base_url}{API}/tasks",
                {"subject": "Call", "regardingobjectid_contact@odata.bind": "/contacts(cdp_id='p1')"},
            ),
        ]
        body = _batch_body("batch_1", "changeset_1", ok, loose=[("GET", f"{API}/contacts?$select=lastname")])
        status, headers, answer = await _call(
            dv, "POST", "$batch", raw=body, headers={"Content-Type": "multipart/mixed; boundary=batch_1"}
        )
        assert status == 200 and headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
        assert answer.count(b"HTTP/1.1 204") == 2 and b"HTTP/1.1 200" in answer
        assert len(dv.records("contacts")) == 1 and len(dv.records("tasks")) == 1
        bad = [
            ("PATCH", f"{API}/contacts(cdp_id='p2')", {"lastname": "Two"}),
            ("PATCH", f"{API}/contacts(cdp_id='p3')", {"nosuchcolumn": 1}),
        ]
        body = _batch_body("batch_2", "changeset_2", bad)
        status, _, answer = await _call(
            dv, "POST", "$batch", raw=body, headers={"Content-Type": "multipart/mixed; boundary=batch_2"}
        )
        assert status == 200 and b"HTTP/1.1 400" in answer and b"HTTP/1.1 204" not in answer
        assert [c["cdp_id"] for c in dv.records("contacts")] == ["p1"]


async def test_service_protection_limit_answers_429_with_retry_after_until_the_window_slides():
    async with DynamicsEmulator(window_limit=3, window_seconds=300) as dv:
        token = await _token(dv)
        for _ in range(3):
            status, _, _ = await _call(dv, "GET", "contacts", token=token)
            assert status == 200
        dv.clock.advance(100)
        status, headers, body = await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "X"}, token=token)
        assert status == 429 and body["error"]["code"] == "0x80072322"
        assert 199 <= int(headers["Retry-After"]) <= 200
        assert dv.records("contacts") == []
        dv.clock.advance(int(headers["Retry-After"]))
        status, _, _ = await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "X"}, token=token)
        assert status == 204


async def test_a_request_that_meets_an_injected_fault_was_counted_in_the_service_protection_window():
    # Dataverse counts a request towards the caller's 5-minute window when it arrives: a 503, a 429 or an
    # answer lost after the write happen inside a request already counted.
    async with DynamicsEmulator(window_limit=4, window_seconds=300) as dv:
        token = await _token(dv)
        dv.faults.fail_next(1, status=503)
        dv.faults.throttle_next(1)
        dv.faults.drop_after_commit_next(1)
        statuses = []
        for i in range(3):
            try:
                statuses.append(
                    (await _call(dv, "PATCH", f"contacts(cdp_id='p{i}')", {"lastname": "X"}, token=token))[0]
                )
            except aiohttp.ClientError:
                statuses.append("dropped")
        assert statuses == [503, 429, "dropped"] and dv.budget()["window_used"] == 3
        status, _, _ = await _call(dv, "GET", "contacts", token=token)
        assert status == 200
        status, headers, body = await _call(dv, "PATCH", "contacts(cdp_id='p9')", {"lastname": "X"}, token=token)
        assert status == 429 and body["error"]["code"] == "0x80072322" and int(headers["Retry-After"]) >= 299
        assert dv.budget()["throttled"] == 1 and dv.find("contacts", "cdp_id", "p9") is None
        assert [r.status for r in dv.requests][-1] == 429  # a request refused for the limit is in the log too


async def test_change_tracking_delta_link_returns_user_changes_and_deletions():
    async with DynamicsEmulator() as dv:
        await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "One"})
        await _call(dv, "PATCH", "contacts(cdp_id='p2')", {"lastname": "Two"})
        status, _, first = await _call(
            dv, "GET", "contacts?$select=lastname,cdp_id", headers={"Prefer": "odata.track-changes"}
        )
        assert status == 200 and len(first["value"]) == 2
        delta = first["@odata.deltaLink"].split(API + "/", 1)[1]
        p1 = dv.find("contacts", "cdp_id", "p1")["contactid"]
        p2 = dv.find("contacts", "cdp_id", "p2")["contactid"]
        dv.user_update("contacts", p1, {"donotbulkemail": True})
        dv.user_delete("contacts", p2)
        _, _, changes = await _call(dv, "GET", delta)
        assert [(c.get("contactid") or c.get("id"), c.get("reason")) for c in changes["value"]] == [
            (p1, None),
            (p2, "deleted"),
        ]
        _, _, nothing = await _call(dv, "GET", changes["@odata.deltaLink"].split(API + "/", 1)[1])
        assert nothing["value"] == []


async def test_an_expired_delta_link_answers_expired_version_stamp_until_tracking_starts_again():
    async with DynamicsEmulator() as dv:
        await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "One"})
        _, _, first = await _call(dv, "GET", "contacts", headers={"Prefer": "odata.track-changes"})
        old = first["@odata.deltaLink"].split(API + "/", 1)[1]
        dv.expire_change_tracking()
        status, _, refused = await _call(dv, "GET", old)
        assert status == 400 and refused["error"]["code"] == "0x80044352"
        # A new change-tracking read gives a link that works again.
        _, _, again = await _call(dv, "GET", "contacts", headers={"Prefer": "odata.track-changes"})
        assert [c["cdp_id"] for c in again["value"]] == ["p1"]
        dv.user_update("contacts", again["value"][0]["contactid"], {"jobtitle": "Analyst"})
        status, _, changes = await _call(dv, "GET", again["@odata.deltaLink"].split(API + "/", 1)[1])
        assert status == 200 and [c["jobtitle"] for c in changes["value"]] == ["Analyst"]


async def test_paging_with_maxpagesize_and_filter():
    async with DynamicsEmulator() as dv:
        token = await _token(dv)
        for i in range(5):
            await _call(
                dv, "PATCH", f"contacts(cdp_id='p{i}')", {"lastname": "Same" if i < 4 else "Other"}, token=token
            )
        _, _, page = await _call(
            dv, "GET", "contacts?$filter=lastname eq 'Same'", token=token, headers={"Prefer": "odata.maxpagesize=3"}
        )
        assert len(page["value"]) == 3
        _, _, rest = await _call(dv, "GET", page["@odata.nextLink"].split(API + "/", 1)[1], token=token)
        assert len(rest["value"]) == 1 and "@odata.nextLink" not in rest


@pytest.mark.parametrize("kind", ["status", "drop"])
async def test_faults_leave_state_as_the_fault_says(kind):
    async with DynamicsEmulator() as dv:
        token = await _token(dv)
        if kind == "status":
            dv.faults.throttle_next(1)
            status, headers, _ = await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "X"}, token=token)
            assert status == 429 and "Retry-After" in headers and dv.records("contacts") == []
        else:
            dv.faults.drop_after_commit_next(1)
            with pytest.raises(aiohttp.ClientError):
                await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "X"}, token=token)
            await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": "X"}, token=token)
            assert len(dv.records("contacts")) == 1


async def test_upsert_by_guid_creates_with_that_guid():
    async with DynamicsEmulator() as dv:
        guid = str(uuid.uuid4())
        status, _, _ = await _call(dv, "PATCH", f"accounts({guid})", {"name": "Initech"})
        assert status == 204 and dv.records("accounts")[0]["accountid"] == guid


DEFINITION = (
    "$select=LogicalName,EntitySetName,PrimaryIdAttribute"
    "&$expand=Attributes($select=LogicalName,AttributeType,RequiredLevel,IsValidForCreate,IsValidForUpdate),"
    "Keys($select=LogicalName,KeyAttributes)"
)


async def test_a_table_definition_answers_in_the_web_apis_metadata_shape():
    async with DynamicsEmulator() as dv:
        status, _, contact = await _call(dv, "GET", f"EntityDefinitions(LogicalName='contact')?{DEFINITION}")
        assert status == 200 and contact["@odata.context"].endswith("$metadata#EntityDefinitions/$entity")
        assert {k for k in contact if not k.startswith("@")} == {
            "MetadataId", "LogicalName", "EntitySetName", "PrimaryIdAttribute", "Attributes", "Keys",
        }  # fmt: skip
        assert contact["EntitySetName"] == "contacts" and str(uuid.UUID(contact["MetadataId"]))
        attributes = {a["LogicalName"]: a for a in contact["Attributes"]}
        lastname = attributes["lastname"]
        assert lastname["@odata.type"] == "#Microsoft.Dynamics.CRM.StringAttributeMetadata"
        assert lastname["AttributeType"] == "String" and lastname["IsValidForCreate"] and lastname["IsValidForUpdate"]
        # RequiredLevel is the managed property, its Value an AttributeRequiredLevel member.
        assert lastname["RequiredLevel"] == {
            "Value": "ApplicationRequired", "CanBeChanged": True,
            "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
        }  # fmt: skip
        assert attributes["emailaddress1"]["RequiredLevel"]["Value"] == "None"
        assert attributes["contactid"]["RequiredLevel"]["Value"] == "SystemRequired"
        assert attributes["contactid"]["AttributeType"] == "Uniqueidentifier"
        assert (
            attributes["fullname"]["IsValidForCreate"] is False and attributes["fullname"]["IsValidForUpdate"] is False
        )
        assert attributes["donotbulkemail"]["AttributeType"] == "Boolean"
        assert attributes["parentcustomerid"]["AttributeType"] == "Customer"
        assert set(attributes["lastname"]) == {
            "@odata.type", "MetadataId", "LogicalName", "AttributeType", "RequiredLevel", "IsValidForCreate",
            "IsValidForUpdate",
        }  # $select narrowed each attribute  # fmt: skip
        keys = sorted(tuple(k["KeyAttributes"]) for k in contact["Keys"])
        assert keys == [("cdp_id",), ("emailaddress1",)]

        # By entity set name, as a mapping names the table; no match is an empty collection.
        status, _, found = await _call(dv, "GET", f"EntityDefinitions?$filter=EntitySetName eq 'tasks'&{DEFINITION}")
        assert status == 200 and [d["LogicalName"] for d in found["value"]] == ["task"]
        status, _, none = await _call(dv, "GET", "EntityDefinitions?$filter=EntitySetName eq 'nopes'")
        assert status == 200 and none["value"] == []

        # The documented filter on the managed property's enum value, on the Attributes collection.
        required = "RequiredLevel/Value eq Microsoft.Dynamics.CRM.AttributeRequiredLevel'ApplicationRequired'"
        status, _, listed = await _call(
            dv, "GET", f"EntityDefinitions(LogicalName='contact')/Attributes?$select=LogicalName&$filter={required}"
        )
        assert status == 200 and [a["LogicalName"] for a in listed["value"]] == ["lastname"]

        status, _, relationships = await _call(
            dv, "GET", "EntityDefinitions(LogicalName='incident')?$select=LogicalName&$expand=ManyToOneRelationships"
        )
        navs = {
            r["ReferencingEntityNavigationPropertyName"]: (r["ReferencingAttribute"], r["ReferencedEntity"])
            for r in relationships["ManyToOneRelationships"]
        }
        assert navs == {
            "customerid_contact": ("customerid", "contact"),
            "customerid_account": ("customerid", "account"),
        }


async def test_an_unknown_table_or_property_answers_dataverses_error():
    async with DynamicsEmulator() as dv:
        status, _, body = await _call(dv, "GET", "EntityDefinitions(LogicalName='cdp_nothing')")
        assert status == 404 and body["error"]["code"] == "0x80040217" and "cdp_nothing" in body["error"]["message"]
        status, _, body = await _call(dv, "GET", "EntityDefinitions(LogicalName='contact')?$select=Nope")
        assert status == 400 and set(body["error"]) == {"code", "message"} and "Nope" in body["error"]["message"]
        status, _, _ = await _call(dv, "DELETE", "EntityDefinitions(LogicalName='contact')")
        assert status == 405


async def test_what_the_definitions_call_required_is_what_the_web_api_holds_rows_to():
    async with DynamicsEmulator() as dv:
        _, _, definitions = await _call(dv, "GET", f"EntityDefinitions?{DEFINITION}")
        level = {
            (d["EntitySetName"], a["LogicalName"]): a["RequiredLevel"]["Value"]
            for d in definitions["value"]
            for a in d["Attributes"]
        }
        # ApplicationRequired lastname: forms ask for it, the Web API takes a contact without one.
        assert level["contacts", "lastname"] == "ApplicationRequired"
        status, _, _ = await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"emailaddress1": "a@example.com"})
        assert status == 204
        status, _, _ = await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"lastname": None})
        assert status == 204
        # A SystemRequired column is the platform's: it cannot be cleared.
        assert level["contacts", "statecode"] == "SystemRequired"
        status, _, body = await _call(dv, "PATCH", "contacts(cdp_id='p1')", {"statecode": None})
        assert status == 400 and "statecode" in body["error"]["message"]
        # The primary name column a row is created with (account's name) is described as required.
        assert level["accounts", "name"] == "ApplicationRequired"
        status, _, body = await _call(dv, "POST", "accounts", {"websiteurl": "https://example.com"})
        assert status == 400 and "'name'" in body["error"]["message"]


async def test_who_am_i_answers_the_calling_user_and_a_batch_get_answers_as_if_asked_directly():
    """``GET WhoAmI``: the caller's ids (a bad token 401). A GET outside any change set of a ``$batch`` answers
    its rows in the batch's body, its ``$filter`` read from the body, not a request line."""
    async with DynamicsEmulator() as dv:
        status, _, body = await _call(dv, "GET", "WhoAmI")
        assert status == 200 and {"UserId", "BusinessUnitId", "OrganizationId"} <= set(body)
        assert (await _call(dv, "GET", "WhoAmI", token="nope"))[0] == 401
        dv.user_create("contacts", {"lastname": "Lovelace", "emailaddress1": "ADA@example.com"})
        dv.user_create("contacts", {"lastname": "Byron", "emailaddress1": "byron@example.com"})
        query = "contacts?$select=lastname&$filter=emailaddress1%20eq%20'ada%40example.com'"
        raw = (
            "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            f"GET {dv.base_url}{API}/{query} HTTP/1.1\r\nAccept: application/json\r\n\r\n\r\n--b--\r\n"
        ).encode()
        status, _, answer = await _call(
            dv, "POST", "$batch", raw=raw, headers={"Content-Type": "multipart/mixed; boundary=b"}
        )
        assert status == 200 and b"HTTP/1.1 200" in answer and b'"lastname":"Lovelace"' in answer
        assert b"Byron" not in answer
        assert all("ada" not in r.path.lower() for r in dv.requests)
