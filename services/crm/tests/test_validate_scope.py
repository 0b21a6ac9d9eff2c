"""ValidateConnections with `describe` asks the CRMs for the schema of every object the given document
names, each request taken from the account's shared API budget. A caller with the read scope could name
hundreds of objects per call and spend the account's daily quota (HubSpot's 250,000) in a few hundred
calls, stopping every sync until the next day; describing now takes `crm:admin`, as starting a backfill
does. Validating without `describe` (no CRM request) stays a read."""

from __future__ import annotations

import json

import grpc
import pytest

from cdp.crm.v1 import crm_pb2, crm_pb2_grpc
from cdp_testing.crm import hubspot_document

from .test_export import ADMIN, READER, service  # noqa: F401 - the running connector with tokens


def _document(url: str, objects: int) -> crm_pb2.ConnectionsDocument:
    document = hubspot_document(url)
    mapping = document["connections"][0]["mappings"][0]
    document["connections"][0]["mappings"] = [
        {**mapping, "id": f"m{n}", "object": f"object{n}"} for n in range(objects)
    ] + document["connections"][0]["mappings"]
    return crm_pb2.ConnectionsDocument(json=json.dumps(document))


async def test_describing_a_document_takes_the_admin_scope_and_a_reader_spends_no_budget(service):  # noqa: F811
    _, runtime, emulator = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
        crm = crm_pb2_grpc.CrmServiceStub(channel)
        before = (await crm.GetBudget(crm_pb2.GetBudgetRequest(), metadata=ADMIN)).budgets[0].daily_used
        request = crm_pb2.ValidateConnectionsRequest(document=_document(emulator.base_url, 50), describe=True)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await crm.ValidateConnections(request, metadata=READER)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "crm:admin" in refused.value.details()
        after = (await crm.GetBudget(crm_pb2.GetBudgetRequest(), metadata=ADMIN)).budgets[0].daily_used
        assert after == before  # not one request to the CRM

        # Without describe a reader validates as before; the admin may describe.
        plain = crm_pb2.ValidateConnectionsRequest(document=_document(emulator.base_url, 1))
        assert (await crm.ValidateConnections(plain, metadata=READER)).problems == []
        described = await crm.ValidateConnections(
            crm_pb2.ValidateConnectionsRequest(document=_document(emulator.base_url, 1), describe=True), metadata=ADMIN
        )
        assert described is not None
