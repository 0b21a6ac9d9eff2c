"""The engine tests share a toy service (engine_toy.py) and a bus with its streams."""

import sys
from pathlib import Path

import pytest

# --import-mode=importlib keeps test directories off sys.path.
sys.path.insert(0, str(Path(__file__).parent))

from engine_toy import ensure_streams

from cdp_kit.bus import Bus


@pytest.fixture
async def bus(nats_server):
    async with Bus.connect(nats_server.url, name="engine-test", connect_timeout=5) as bus:
        await ensure_streams(bus)
        yield bus
