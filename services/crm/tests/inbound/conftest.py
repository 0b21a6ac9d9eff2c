"""What every CRM's inbound test needs: the collector's /v1/batch as the connector relies on it (a write
key, each messageId stored once, refusals and a 'kill' point on demand), a store and an HTTP session."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from cdp_crm.inbound import Collector
from cdp_crm.state import prepare_store
from cdp_kit.storage import open_store

WRITE_KEY = "crm-key"


class CollectorStandIn:
    def __init__(self) -> None:
        self.stored: dict[str, dict] = {}
        self.posts = 0
        self.duplicates = 0
        self.refuse_next = 0
        self.hold_after: int | None = None  # posts answered before the next one hangs (the poller is killed there)
        self.held = asyncio.Event()
        self.released = asyncio.Event()
        self.url = ""
        app = web.Application()
        app.router.add_post("/v1/batch", self.batch)
        self.runner = web.AppRunner(app)

    async def batch(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Basic Y3JtLWtleTo=":  # "crm-key:"
            return web.json_response({"success": False, "code": "unauthorized"}, status=401)
        if self.refuse_next:
            self.refuse_next -= 1
            return web.json_response({"success": False, "code": "unavailable"}, status=503)
        if self.hold_after is not None and self.posts >= self.hold_after:
            self.held.set()
            await self.released.wait()  # the poller is killed while waiting; nothing of this post is stored
            return web.json_response({"success": False, "code": "unavailable"}, status=503)
        self.posts += 1
        for event in (await request.json())["batch"]:
            if event["messageId"] in self.stored:
                self.duplicates += 1
            else:
                self.stored[event["messageId"]] = event
        return web.json_response({"success": True})

    def events(self, name: str | None = None, kind: str = "track") -> list[dict]:
        return [e for e in self.stored.values() if e["type"] == kind and (name is None or e.get("event") == name)]

    def names(self) -> list[str]:
        return [e["event"] for e in self.stored.values() if e["type"] == "track"]

    def client(self, session: aiohttp.ClientSession) -> Collector:
        return Collector(session, self.url, WRITE_KEY)

    async def kill_mid_page(self, poll: Callable, after_posts: int) -> None:
        """Run a poll until this collector has taken `after_posts` posts and the next is in flight, then
        kill it (cancel: nothing after that point runs, as with SIGKILL)."""
        self.hold_after = after_posts
        self.held.clear()
        self.released.clear()
        task = asyncio.ensure_future(poll())
        await asyncio.wait_for(self.held.wait(), 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.hold_after = None
        self.released.set()


@pytest.fixture
async def collector():
    stand_in = CollectorStandIn()
    await stand_in.runner.setup()
    site = web.TCPSite(stand_in.runner, "127.0.0.1", 0)
    await site.start()
    stand_in.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield stand_in
    await stand_in.runner.cleanup()


@pytest.fixture
async def store(tmp_path):
    async with open_store(f"sqlite:///{tmp_path}/crm.db") as opened:
        await prepare_store(opened)
        yield opened


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as opened:
        yield opened
