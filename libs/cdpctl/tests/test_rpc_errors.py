"""How a refused gRPC call reads on the terminal."""

from __future__ import annotations

import grpc
from grpc.aio import AioRpcError, Metadata

from cdpctl.common import rpc_error


def test_a_call_nobody_answered_in_time_says_where_to_look():
    # An on-call trial with profile stopped read only "DEADLINE_EXCEEDED: Deadline Exceeded".
    exc = AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(), details="Deadline Exceeded")
    message = rpc_error(exc).message
    assert message.startswith("DEADLINE_EXCEEDED: Deadline Exceeded") and "cdpctl status" in message

    refused = AioRpcError(grpc.StatusCode.NOT_FOUND, Metadata(), Metadata(), details="no person 'p1'")
    assert rpc_error(refused).message == "NOT_FOUND: no person 'p1'"  # an answer needs no hint
