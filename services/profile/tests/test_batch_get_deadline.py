"""BatchGetProfiles from a profile service far behind, to a caller with a deadline (crm's: 30 s).

A pipeline benchmark at 5,000 events/s logged `grpc call failed` BatchGetProfiles UNKNOWN at ERROR
(twice, caller cdp-crm, ~29.4 s): a read waits for the persons' pending writes to land, the store wrote
slowly, the caller's deadline passed, grpc.aio cancelled the handler - and the interceptor took the
cancellation, which set no status, for UNKNOWN (a bug, by the platform's alerts). The caller heard
DEADLINE_EXCEEDED; the server now says so too, at WARNING, and the persons' changes are all there once
the writes land (nothing lost: the caller asks again)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.interceptors import CdpInterceptor
from cdp_kit.telemetry import setup_telemetry
from cdp_profile import engine as engine_module
from cdp_profile.api import ProfileApi
from cdp_profile.engine import PROFILES
from cdp_testing.waiting import eventually

T0 = 1_790_000_000.0


def order(message_id: str, person: str) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(
        message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
    )
    event.timestamp.FromNanoseconds(int(T0 * 1e9))
    event.received_at.FromNanoseconds(int(T0 * 1e9))
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])


class SlowWrites:
    """The store's writes of profiles held until released: a store far behind."""

    def __init__(self, store) -> None:
        self.write = store.bulk_write
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        store.bulk_write = self.bulk_write

    async def bulk_write(self, ops) -> None:
        if any(getattr(op, "collection", None) == PROFILES for op in ops):
            self.held.set()
            await self.release.wait()
        await self.write(ops)


async def test_a_batch_read_past_the_callers_deadline_is_deadline_exceeded_not_unknown(
    running_engine, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="cdp.grpc")
    # The reads would wait longer than the caller (as crm's 500 persons did, 5 s each at most): the caller's
    # deadline passes first, not profile's own read wait (UNAVAILABLE).
    monkeypatch.setattr(engine_module, "DURABLE_READ_WAIT", 60.0)
    async with running_engine("memory://", hash_key="k" * 32, name="batch-deadline") as engine:
        await engine.feed(order("o1", "p1"), order("o2", "p2"))
        server = grpc.aio.server(interceptors=[CdpInterceptor(setup_telemetry("profile-test"))])
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(ProfileApi(engine), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        slow = SlowWrites(engine.store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                profiles = profile_pb2_grpc.ProfileServiceStub(channel)
                # A second order each, applied in memory; their write is held.
                publishing = asyncio.ensure_future(engine.feed(order("o3", "p1"), order("o4", "p2")))
                await asyncio.wait_for(slow.held.wait(), 30)
                request = profile_pb2.BatchGetProfilesRequest(person_ids=["p1", "p2"])
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    # Time enough for a machine stalled for seconds (CI's loaded workers) to start the handler
                    # before the deadline passes: the writes are held anyway.
                    await profiles.BatchGetProfiles(request, timeout=10.0)
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

                def logged():
                    return [r for r in caplog.records if r.name == "cdp.grpc"]

                (line,) = await eventually(logged, timeout=30)
                assert (line.levelname, line.status, line.method) == (
                    "WARNING",
                    "DEADLINE_EXCEEDED",
                    "/cdp.profile.v1.ProfileService/BatchGetProfiles",
                )

                # The writes land: the caller asking again reads both persons' second order.
                slow.release.set()
                await publishing
                answer = await profiles.BatchGetProfiles(request, timeout=30)
                assert sorted((p.person_id, p.event_count) for p in answer.profiles) == [("p1", 2), ("p2", 2)]
        finally:
            slow.release.set()
            await server.stop(None)
