"""MatchRecords as a caller sees it, through gRPC on the running service (memory store, real nats-server):
what is refused before anything is stored, what a response holds, and what a call costs."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.__main__ import setup
from cdp_identity.matching_service import RECORDS
from cdp_identity.settings import IdentitySettings
from cdp_kit.service import serving


@pytest.fixture
async def service(nats_server):
    settings = IdentitySettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        store_url="memory://",
        partitions=1,
        batch_size=10,
        shutdown_grace=1.0,
    )
    async with serving(settings, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield identity_pb2_grpc.IdentityServiceStub(channel), runtime


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    found = []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [violation.field for violation in bad.field_violations]
    return found


def record(record_id: str, **fields: str) -> identity_pb2.MatchRecord:
    return identity_pb2.MatchRecord(
        id=record_id,
        source="crm",
        identifiers=[identity_pb2.Identifier(type="salesforce_id", value=f"SF-{record_id}")],
        fields=fields,
    )


async def stored_records(runtime) -> list[str]:
    return [r.key async for r in runtime.parts["store"].scan_all(RECORDS)]


async def test_an_unparseable_date_is_refused_naming_record_and_field_and_nothing_is_stored(service):
    stub, runtime = service
    good = record("c-1", first_name="Ada", last_name="Lovelace", dob="1815-12-10")
    bad = record("c-2", first_name="Ann", last_name="Byron", dob="19560409x")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=[good, bad], apply=True))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["records[1].fields.dob"]
    assert "19560409" not in raised.value.details()
    assert await stored_records(runtime) == []
    # The documented compact form is a date, not a silent null.
    compact = record("c-3", first_name="Ann", last_name="Byron", dob="19560409")
    response = await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=[compact]))
    assert len(response.persons) == 1
