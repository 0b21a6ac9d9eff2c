"""A real collector (in-process) against a real nats-server, and a reader of what it stored."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp_collector.__main__ import setup
from cdp_collector.settings import CollectorSettings
from cdp_kit.bus.rawevents import events_of
from cdp_kit.service import ServiceRuntime, serving

WRITE_KEY = "wk_test_0123456789abcdef"


@dataclass
class RunningCollector:
    runtime: ServiceRuntime
    nats_url: str
    write_key: str = WRITE_KEY

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.runtime.grpc.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.ports['http']}"

    async def stored(self, expected: int | None = None) -> list[tuple[str, events_pb2.Event]]:
        """Every event in events.raw, in stream order (a message's events in its order), as (subject, event)."""
        return [(subject, event) for _, subject, event in await self.stored_at(expected)]

    async def stored_at(self, expected: int | None = None) -> list[tuple[int, str, events_pb2.Event]]:
        """`stored`, each event with the stream position of the message that holds it."""
        nc = await nats.connect(self.nats_url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("EVENTS_RAW")
            out = []
            first = info.state.first_seq if info.state.messages else info.state.last_seq + 1
            for seq in range(first, info.state.last_seq + 1):
                msg = await js.get_msg("EVENTS_RAW", seq)
                # Either form (cdp_kit.bus.rawevents): one event, or several of one request's in one message.
                out.extend((seq, msg.subject, events_pb2.Event.FromString(e)) for e in events_of(msg.data, msg.headers))
            if expected is not None:
                assert len(out) == expected, f"stored {len(out)} events, expected {expected}"
            return out
        finally:
            await nc.close()


def collector_settings(nats_url: str, tmp_path, **overrides) -> CollectorSettings:
    sources = tmp_path / "sources.json"
    sources.write_text(
        json.dumps(
            {
                "sources": [
                    {"id": "web", "name": "Website", "write_key": WRITE_KEY},
                    {"id": "old", "name": "Retired app", "write_key": "wk_disabled_0000", "enabled": False},
                ]
            }
        )
    )
    base = dict(
        nats_url=nats_url,
        sources_file=sources,
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        auth_mode="none",
        partitions=4,
        shutdown_grace=1.0,
        ack_timeout=2.0,
    )
    base.update(overrides)
    return CollectorSettings(**base)


@pytest.fixture
async def collector(nats_server, tmp_path):
    async with serving(collector_settings(nats_server.url, tmp_path), setup) as runtime:
        yield RunningCollector(runtime, nats_server.url)


@pytest.fixture
def start_collector(nats_server, tmp_path):
    """A collector started when the test says so, after it has prepared the bus:
    `async with start_collector() as collector: ...`."""

    @contextlib.asynccontextmanager
    async def start():
        async with serving(collector_settings(nats_server.url, tmp_path), setup) as runtime:
            yield RunningCollector(runtime, nats_server.url)

    return start
