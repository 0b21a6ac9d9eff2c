"""What every service's PrivacyService/ExportPerson refuses, as the services' tests check it.

The request checks live in the kit's shared servicer (`cdp_kit.person_export`), so every service refuses
alike: no read scope exports, a person is required, and an id no store can hold as a key (a NUL, over
1024 characters) is refused naming its field, before the service looks anything up. Every service's
export tests call these against its real gRPC server with its tokens: `admin` holds `privacy:export`,
`reader` only a read scope.
"""

from __future__ import annotations

import grpc
import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp_testing.errors import bad_request_fields


async def assert_read_scope_refused(privacy, reader) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await privacy.ExportPerson(privacy_pb2.ExportPersonRequest(person_id="ada"), metadata=reader)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "privacy:export" in error.value.details()  # the refusal names the scope that would do


async def assert_person_required(privacy, admin) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await privacy.ExportPerson(privacy_pb2.ExportPersonRequest(), metadata=admin)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error.value) == ["person_id"]


async def assert_unstorable_ids_named(privacy, admin) -> None:
    for request, field in (
        (privacy_pb2.ExportPersonRequest(person_id="a\x00b"), "person_id"),
        (privacy_pb2.ExportPersonRequest(person_id="ada", merged_person_ids=["x" * 5000]), "merged_person_ids[0]"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await privacy.ExportPerson(request, metadata=admin)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(error.value) == [field]
