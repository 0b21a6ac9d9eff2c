"""What a refused gRPC call said, as tests check it: the fields its google.rpc BadRequest names.

Every service answers bad input with INVALID_ARGUMENT and a BadRequest detail naming each offending
field (`cdp_kit.errors.InvalidArgument`); a test asserts on those names, never on the message's wording.

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.TrainModel(request)
    assert bad_request_fields(refused.value) == ["model"]
"""

from __future__ import annotations

import grpc


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The fields a google.rpc BadRequest detail of this error names (empty when it carries none)."""
    from google.protobuf import any_pb2  # noqa: F401  (registers Any for Status.details)
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            fields = []
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    fields.extend(v.field for v in bad.field_violations)
            return fields
    return []
