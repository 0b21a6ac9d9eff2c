"""How every orchestration command reaches the service: its `--json` / `--address` options (the address
`cdpctl up` runs by default), one call with the workspace's credentials (`common.call_service`: a refused
call printed naming the field the service named, exit 1), and the page size lists are read in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdpctl.common import call_service, service_options
from cdpctl.platform import Workspace

PAGE = 500

options = service_options("orchestration")


def call(ws: Workspace, address: str | None, as_json: bool, work: Callable[[Any, tuple], Awaitable[Any]]) -> Any:
    return call_service(ws, "orchestration", orchestration_pb2_grpc.OrchestrationServiceStub, address, as_json, work)
