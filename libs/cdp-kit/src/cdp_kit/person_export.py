"""`cdp.privacy.v1.PrivacyService/ExportPerson`: what one service holds about a person, for the person's
request to see their data (GDPR art. 15). `cdpctl export` asks every service and puts the answers together.

The part every service shares lives here: the scope, the servicer with the request's checks and the
conversion of a service's answer to JSON. The checks are the same on every service: a person is
required, and an id no store can hold as a key (a NUL, over 1024 characters) is refused with
INVALID_ARGUMENT naming its field (`person_id`, `merged_person_ids[i]`) before the service is asked. A service supplies one coroutine, `export(person_id, merged_person_ids, context) -> dict`
(the gRPC context, for a service that forwards to the replica owning the person), that gathers what it keeps under those ids and nothing of anyone else's; a person it does not know gives an
empty dict (an empty document, never an error: "we hold nothing" is an answer).

The scope is `privacy:export`, not a service's read scope: the services' shared token and every reader
could otherwise take a person's whole history. Admin tokens (`*`) have it.

    runtime.grpc.add_service(*export_service("scoring", engine_export))
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2

from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp_kit.errors import InvalidArgument
from cdp_kit.storage.port import check_key

EXPORT_SCOPE = "privacy:export"
SCOPES = {"ExportPerson": EXPORT_SCOPE}
DESCRIPTOR = privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"]
PERSONS = "persons"  # the collection named when an id cannot be a key: every service keys persons by id

Exporter = Callable[[str, Sequence[str], Any], Awaitable[Mapping[str, Any]]]


def rfc3339(seconds: float | None) -> str | None:
    """An epoch instant in seconds as an RFC 3339 UTC string (None stays None)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    # Struct holds JSON only: tuples become lists, numpy and other number types plain floats, a non-finite
    # number (which JSON cannot carry) its name, anything else its text.
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, set | frozenset) else items
    if isinstance(value, int | float) or hasattr(value, "__float__"):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    return str(value)


def document_struct(document: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(_plain(document))
    return struct


class PersonExport(privacy_pb2_grpc.PrivacyServiceServicer):
    """The servicer: checks the request, asks the service's exporter, answers in JSON."""

    def __init__(self, service: str, export: Exporter) -> None:
        self.service = service
        self.export = export

    async def ExportPerson(self, request: privacy_pb2.ExportPersonRequest, context) -> privacy_pb2.ExportPersonResponse:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required (the person as identity knows it now)")
        # An id no store can hold as a key (a NUL, over 1024 characters) is refused here, by every service
        # alike: some would otherwise fail on it in their store, others answer "nothing held".
        check_key(PERSONS, request.person_id, field="person_id")
        for index, merged in enumerate(request.merged_person_ids):
            if not merged:
                raise InvalidArgument(f"merged_person_ids[{index}]", "is empty")
            check_key(PERSONS, merged, field=f"merged_person_ids[{index}]")
        merged = [p for p in dict.fromkeys(request.merged_person_ids) if p != request.person_id]
        document = await self.export(request.person_id, merged, context)
        return privacy_pb2.ExportPersonResponse(service=self.service, document=document_struct(document))


def export_service(service: str, export: Exporter) -> tuple[Any, PersonExport, Any, dict[str, str]]:
    """The arguments of `GrpcServer.add_service` for a service's ExportPerson."""
    return privacy_pb2_grpc.add_PrivacyServiceServicer_to_server, PersonExport(service, export), DESCRIPTOR, SCOPES


__all__ = ["DESCRIPTOR", "EXPORT_SCOPE", "SCOPES", "PersonExport", "document_struct", "export_service", "rfc3339"]
