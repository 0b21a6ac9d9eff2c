"""A CRM (or whatever answers at its URL: a proxy, a hijacked DNS name) answering with a redirect or a body
without end: the connector follows no redirect - its token or client secret never reaches another
address - and reads no answer past `MAX_ANSWER_BYTES`, so one answer cannot take the process's memory."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.adapters.http import MAX_ANSWER_BYTES, exchange
from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.adapters.zoho import ZohoAdapter
from cdp_crm.connectors import open_adapters
from cdp_crm.domain.coalesce import DELETE, UPSERT, Change
from cdp_crm.domain.isolation import AUTH, UNAVAILABLE
from cdp_crm.domain.mapping import parse_connections

CHUNK = b"x" * (1 << 20)


class Hostile:
    """A server whose every answer is a redirect to `/catch` (which records what reached it) or a body that
    never ends; `sent` counts the bytes of that body written so far."""

    def __init__(self) -> None:
        self.caught: list[dict[str, str]] = []
        self.sent = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/catch", self.catch)
        self.app.router.add_route("*", "/huge", self.huge)
        self.app.router.add_route("*", "/{tail:.*}", self.redirect)
        self.url = ""

    async def redirect(self, request: web.Request) -> web.Response:
        # 307 keeps the method and the body: a token request's client secret would go along.
        raise web.HTTPTemporaryRedirect(self.url + "/catch")

    async def catch(self, request: web.Request) -> web.Response:
        self.caught.append({"authorization": request.headers.get("Authorization", ""), "body": await request.text()})
        return web.json_response({"access_token": "stolen", "instance_url": self.url, "api_domain": self.url})

    async def huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            while self.sent < 4 * MAX_ANSWER_BYTES:
                await response.write(CHUNK)
                self.sent += len(CHUNK)
        except (ConnectionError, RuntimeError):
            pass
        return response


@pytest.fixture
async def hostile():
    server = Hostile()
    runner = web.AppRunner(server.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


async def test_a_redirect_is_not_followed_and_the_token_stays_where_it_was_sent(hostile):
    async with aiohttp.ClientSession() as session:
        answer = await exchange(
            session, "GET", hostile.url + "/crm/v3/objects/contacts", headers={"Authorization": "Bearer pat-secret"}
        )
    assert answer.error is not None and answer.error.reason == UNAVAILABLE and answer.error.code == "REDIRECT"
    assert answer.status == 307 and hostile.caught == []


async def test_an_answer_without_end_is_cut_at_the_limit_not_read_into_memory(hostile):
    async with aiohttp.ClientSession() as session:
        answer = await exchange(session, "GET", hostile.url + "/huge", timeout=120)
    assert answer.error is not None and answer.error.reason == UNAVAILABLE and answer.error.code == "TOO_LARGE"
    assert answer.body is None and answer.raw == b""
    await asyncio.sleep(0.2)
    # The server's writes stop soon after the limit: the connection was closed, not drained.
    assert hostile.sent < 2 * MAX_ANSWER_BYTES


@pytest.mark.parametrize("kind", ["salesforce", "dynamics", "zoho"])
async def test_a_token_endpoint_redirecting_gets_no_client_secret_and_fails_auth(hostile, kind):
    async with aiohttp.ClientSession() as session:
        if kind == "salesforce":
            adapter = SalesforceAdapter(session, client_id="id", client_secret="s3cret", login_url=hostile.url)
        elif kind == "dynamics":
            adapter = DynamicsAdapter(
                session, url=hostile.url, tenant_id="t", client_id="id", client_secret="s3cret", authority=hostile.url
            )
        else:
            adapter = ZohoAdapter(
                session, client_id="id", client_secret="s3cret", refresh_token="r3fresh", accounts_url=hostile.url
            )
        error = await adapter._authenticate()
    assert error is not None and error.reason == AUTH
    assert hostile.caught == []


@pytest.mark.parametrize("kind", ["salesforce", "dynamics", "zoho"])
async def test_a_token_endpoint_answering_without_end_fails_auth_within_the_limit(hostile, kind):
    async with aiohttp.ClientSession() as session:
        if kind == "salesforce":
            adapter = SalesforceAdapter(session, client_id="id", client_secret="s", login_url=hostile.url + "/huge?")
        elif kind == "dynamics":
            adapter = DynamicsAdapter(
                session,
                url=hostile.url,
                tenant_id="t",
                client_id="id",
                client_secret="s",
                authority=hostile.url + "/huge?",
            )
        else:
            adapter = ZohoAdapter(
                session, client_id="id", client_secret="s", refresh_token="r", accounts_url=hostile.url + "/huge?"
            )
        error = await adapter._authenticate()
    assert error is not None and error.reason == AUTH
    assert hostile.sent < 2 * MAX_ANSWER_BYTES


@pytest.mark.parametrize("body", [b"<html>down for maintenance</html>", b"[]", b"[1, 2]", b'"ok"'])
@pytest.mark.parametrize("kind", ["hubspot", "zoho"])
@pytest.mark.parametrize("op", [UPSERT, DELETE])
async def test_a_success_that_is_not_the_apis_json_is_retried_not_raised(kind, op, body):
    """A 200 carrying a proxy's page or a list: `send` raised AttributeError / TypeError out of the
    connector's batch (its contract is to never raise for what the CRM does); now it is UNAVAILABLE
    `UNEXPECTED_ANSWER`, retried like a 5xx, and nothing is taken as written."""

    async def anything(request: web.Request) -> web.Response:
        if request.path.endswith("/token"):
            return web.json_response({"access_token": "t", "api_domain": url})
        return web.Response(status=200, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    key, field = ("cdp_id", "email") if kind == "hubspot" else ("CDP_Id", "Email")
    credentials = (
        {"token": "T"} if kind == "hubspot" else {"client_id": "T", "client_secret": "T", "refresh_token": "T"}
    )
    document = {"connections": [{"id": "c", "kind": kind, "url": url, "credentials": credentials, "mappings": [
        {"id": "contacts", "object": "contacts" if kind == "hubspot" else "Contacts", "match": {key: "person.id"},
         "fields": {field: "traits.email"}}]}]}  # fmt: skip
    (connection,) = parse_connections(document)
    try:
        async with aiohttp.ClientSession() as session:
            adapter = open_adapters([connection], session, {"T": "x"}, timeout=5)["c"]
            if kind == "zoho":
                adapter._accounts = url
            mapping = connection.mappings[0]
            change = Change(mapping.name, ((key, "p1"),), {field: "a@example.com"}, op=op, person_id="p1")
            outcome = await adapter.send(mapping, [change])
    finally:
        await runner.cleanup()
    assert (
        outcome.error is not None and outcome.error.reason == UNAVAILABLE and outcome.error.code == "UNEXPECTED_ANSWER"
    )
    assert not any(result.ok for result in outcome.results.values())


@pytest.mark.parametrize("body", [b"{}", b'{"results": 5, "records": 5, "data": 5}', b"<html>ok</html>"])
@pytest.mark.parametrize("kind", ["hubspot", "salesforce", "zoho"])
async def test_a_privacy_delete_whose_lookup_answer_lists_nothing_readable_deletes_nothing_and_says_so(kind, body):
    """A privacy delete first looks the person's records up by their key. A 200 without the list the API
    always answers with (a proxy's page; `{}`) read as "no such record": the record counted as deleted
    already, the erasure was recorded done, and the CRM kept the person. It is UNAVAILABLE now, and asked
    again."""

    async def anything(request: web.Request) -> web.Response:
        if request.path.endswith("/token"):
            return web.json_response({"access_token": "t", "instance_url": url, "api_domain": url})
        return web.Response(status=200, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    key, field, obj, credentials = {
        "hubspot": ("cdp_id", "email", "contacts", {"token": "T"}),
        "salesforce": ("CDP_Id__c", "Email", "Contact", {"client_id": "T", "client_secret": "T"}),
        "zoho": ("CDP_Id", "Email", "Contacts", {"client_id": "T", "client_secret": "T", "refresh_token": "T"}),
    }[kind]
    document = {"connections": [{"id": "c", "kind": kind, "url": url, "credentials": credentials, "mappings": [
        {"id": "contacts", "object": obj, "match": {key: "person.id"}, "fields": {field: "traits.email"}}]}]}  # fmt: skip
    (connection,) = parse_connections(document)
    try:
        async with aiohttp.ClientSession() as session:
            adapter = open_adapters([connection], session, {"T": "x"}, timeout=5)["c"]
            adapter._accounts = adapter._login = url  # the token endpoints (Zoho, Salesforce) here too
            mapping = connection.mappings[0]
            change = Change(mapping.name, ((key, "p1"),), {}, op=DELETE, person_id="p1")
            outcome = await adapter.send(mapping, [change])
    finally:
        await runner.cleanup()
    assert not any(result.ok for result in outcome.results.values())
    assert outcome.error is not None and outcome.error.reason == UNAVAILABLE
