"""The aiohttp plumbing the HTTP fakes share: bind 127.0.0.1 on a free port, expose `base_url`, log each
request by its route (`cdp_testing.channels.logs`)."""

from __future__ import annotations

import logging
from typing import Self

from aiohttp import web

from cdp_testing.channels.logs import AccessLog


class HttpFake:
    """Subclasses fill `self.app` (an aiohttp Application) in their constructor."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.app = web.Application()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> Self:
        access = logging.getLogger(type(self).__module__)
        self._runner = web.AppRunner(self.app, access_log_class=AccessLog, access_log=access)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
