"""What every CRM's inbound test needs besides the collector stand-in (`collector`, from the tests'
conftest one folder up): a store and an HTTP session."""

from __future__ import annotations

import aiohttp
import pytest

from cdp_crm.state import prepare_store
from cdp_kit.storage import open_store


@pytest.fixture
async def store(tmp_path):
    async with open_store(f"sqlite:///{tmp_path}/crm.db") as opened:
        await prepare_store(opened)
        yield opened


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as opened:
        yield opened
