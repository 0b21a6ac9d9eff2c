"""`cdp.privacy.v1.PrivacyService/ExportPerson`: what one service holds about a person, for the person's
request to see their data (GDPR art. 15). `cdpctl export` asks every service and puts the answers together.

The part every service shares lives here: the scope, the servicer with the request's checks, the
conversion of a service's answer to JSON, and the way to the replica holding a person (`Owners`).
The checks are the same on every service: a person is required, and an id no store can hold as a key
(a NUL, over 1024 characters) is refused with INVALID_ARGUMENT naming its field (`person_id`,
`merged_person_ids[i]`) before the service is asked. A service supplies one coroutine,
`export(person_id, merged_person_ids, context) -> dict` (the gRPC context, for a service that forwards
to the replica owning the person), that gathers what it keeps under those ids and nothing of anyone
else's; a person it does not know gives an empty dict (an empty document, never an error: "we hold
nothing" is an answer).

"We hold nothing" must be true of the service, not of one replica: a service whose replicas each hold
only their partitions in memory (segmentation, scoring) answers for a person of another replica's
partition by asking that replica (`Owners.ask`: its ExportPerson for that person alone, with the
caller's token and a mark that it was forwarded, so it is never forwarded again). A replica that cannot
reach the owner (no address for it, the partition moving or loading, the owner not answering) answers
UNAVAILABLE naming the partition, never an empty document: `cdpctl export` then names the service as
missing, and a retry finds the partition settled.

The scope is `privacy:export`, not a service's read scope: the services' shared token and every reader
could otherwise take a person's whole history. Admin tokens (`*`) have it.

    runtime.grpc.add_service(*export_service("scoring", engine_export))
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp_kit.bus import partition_for
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_kit.ownership import Ownership, StaticOwnership
from cdp_kit.storage.port import check_key

EXPORT_SCOPE = "privacy:export"
# Erasing a person (profile's `Delete`, which every service then follows): never a service's own scope.
DELETE_SCOPE = "privacy:delete"
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


# --- the replica holding a person ----------------------------------------------------------------------

FORWARDED = "x-cdp-forwarded"  # metadata of an ExportPerson one replica asked another for
FORWARD_TIMEOUT = 30.0
# The owner's refusals that are the caller's own (its token): passed on as they are. Anything else the
# owner answers (down, moving, too slow) leaves the export without the partition: UNAVAILABLE.
_PASSED_ON = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
# What an owner answers about the request itself (the definition or model asked about, the person, a field),
# which a forwarded question about one person passes on as it is (`Owners.forward`'s `passed_on`).
REQUEST_ERRORS = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT}
)


def peer_addresses(*, peers: str, pod_name: str, replicas: int, grpc_port: int) -> list[str]:
    """The replicas' gRPC addresses in ordinal order (static ownership): `peers` (comma-separated) if
    given, else derived from a StatefulSet pod name (`cdp-scoring-1` ->
    `cdp-scoring-<i>.cdp-scoring-headless:<port>`), else none known ([]: persons of other replicas
    cannot be exported from this one)."""
    if peers:
        return [a.strip() for a in peers.split(",") if a.strip()]
    base, _, ordinal = pod_name.rpartition("-")
    if replicas == 1 or not base or not ordinal.isdigit():
        return []
    return [f"{base}-{i}.{base}-headless:{grpc_port}" for i in range(replicas)]


def holder_address(holder: str, grpc_port: int) -> str | None:
    """The gRPC address of a lease holder named like a StatefulSet pod (`<set>-<ordinal>`), else None."""
    base, _, ordinal = holder.rpartition("-")
    if not base or not ordinal.isdigit():
        return None
    return f"{holder}.{base}-headless:{grpc_port}"


class Owners:
    """Which replica holds a person's partition, and its export of the person when it is not this one.

    `held()` is the partitions whose persons this replica holds and are up to date (loaded, replayed),
    not merely those it owns: a partition still loading here is not answered from here. The owner of
    any other partition is found through the ownership: static, replica p % replicas at
    `peers[p % replicas]` (`peer_addresses`); leases, the holder the ownership last saw
    (`Ownership.holder`), at `address_of(holder)`.
    """

    def __init__(
        self,
        *,
        partitions: int,
        held: Callable[[], Collection[int]],
        ownership: Ownership,
        channel: Callable[[str], grpc.aio.Channel],
        peers: Sequence[str] = (),
        ordinal: int = 0,
        replicas: int = 1,
        address_of: Callable[[str], str | None] = lambda _holder: None,
        peers_variable: str = "",
    ) -> None:
        self.partitions = partitions
        self.held = held
        self.ownership = ownership
        self.peers = list(peers)
        self.ordinal = ordinal
        self.replicas = replicas
        self._channel = channel
        self._address_of = address_of
        self._peers_variable = peers_variable
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, type], Any] = {}

    def holds(self, person_id: str) -> bool:
        """Whether this replica answers for the person itself."""
        return partition_for(person_id, self.partitions) in self.held()

    async def ask(self, person_id: str, context: Any) -> dict[str, Any]:
        """The document the replica holding `person_id`'s partition gives for that person alone."""
        reply = await self.forward(
            partition_for(person_id, self.partitions),
            context,
            privacy_pb2_grpc.PrivacyServiceStub,
            "ExportPerson",
            privacy_pb2.ExportPersonRequest(person_id=person_id),
        )
        return json_format.MessageToDict(reply.document)

    async def forward(
        self,
        partition: int,
        context: Any,
        stub: type,
        method: str,
        request: Any,
        *,
        passed_on: Collection[grpc.StatusCode] = (),
    ) -> Any:
        """`request` answered by `method` of the replica holding `partition`, with the caller's token and
        trace, marked as forwarded (so it is never sent on). The owner's refusal of the caller's token, and
        of the codes in `passed_on` (the caller's own errors: a person or a definition not found), come
        back as they are; anything else (down, moving, too slow) is UNAVAILABLE naming the partition."""
        address = self.owner_address(partition, context)
        stubs = self._stubs.get((address, stub))
        if stubs is None:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._channel(address)
            stubs = self._stubs[(address, stub)] = stub(channel)
        passed = [(k, v) for k, v in (context.invocation_metadata() or ()) if k in ("authorization", "traceparent")]
        try:
            return await getattr(stubs, method)(request, metadata=[*passed, (FORWARDED, "1")], timeout=FORWARD_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _PASSED_ON or exc.code() in passed_on:
                await context.abort(exc.code(), exc.details() or "")
            raise Unavailable(
                f"partition {partition} is held by the replica at {address}, which could not answer for it "
                f"({exc.code().name}: {exc.details()}); retry",
                retry_after=1.0,
            ) from None

    def owner_address(self, partition: int, context: Any) -> str:
        if any(key == FORWARDED for key, _ in (context.invocation_metadata() or ())):
            # Asked by the replica that took this one for the owner: the partition is moving (or still
            # loading here), or the replicas disagree on CDP_REPLICAS / CDP_PARTITIONS. Never sent on.
            raise Unavailable(
                f"partition {partition} is not held by the replica it was forwarded to (moving or loading); retry",
                retry_after=1.0,
            )
        if isinstance(self.ownership, StaticOwnership):
            owner = partition % self.replicas
            if owner == self.ordinal:
                raise Unavailable(f"partition {partition} is loading on this replica; retry", retry_after=1.0)
            if len(self.peers) != self.replicas:
                raise Unavailable(
                    f"partition {partition} is held by another replica, and this one knows no replica addresses "
                    f"({self._peers_variable}, or a StatefulSet pod name in CDP_POD_NAME)",
                    retry_after=1.0,
                )
            return self.peers[owner]
        holder = self.ownership.holder(partition)
        if not holder or holder == getattr(self.ownership, "identity", None):
            raise Unavailable(f"partition {partition} is moving between replicas; retry", retry_after=1.0)
        address = self._address_of(holder)
        if address is None:
            raise Unavailable(
                f"partition {partition} is held by replica {holder!r}, whose address cannot be derived from its "
                "name (only a StatefulSet pod's can: CDP_OWNERSHIP=kubernetes)",
                retry_after=1.0,
            )
        return address

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def replica_owners(
    settings: Any,
    ownership: Ownership,
    *,
    held: Callable[[], Collection[int]],
    channel: Callable[[str], grpc.aio.Channel],
    peers: str = "",
    peers_variable: str = "",
    replicas: int | None = None,
) -> Owners:
    """`Owners` as a partitioned service's settings (`OwnershipSettings`, `ServiceSettings`) describe its
    replicas: static, the addresses in `peers` (the service's CDP_<SERVICE>_PEERS) or a StatefulSet's;
    Kubernetes leases, the holder's pod through the headless Service. NATS leases (local runs) name
    holders host-pid, which says no address: persons of another replica's partitions get UNAVAILABLE.
    `replicas` overrides the settings' (a replica holding every partition whatever they say: 1)."""
    replicas = settings.replicas if replicas is None else replicas
    static = isinstance(ownership, StaticOwnership)
    kubernetes = not static and settings.ownership == "kubernetes"
    addresses = (
        peer_addresses(peers=peers, pod_name=settings.pod_name, replicas=replicas, grpc_port=settings.grpc_port)
        if static
        else []
    )
    return Owners(
        partitions=settings.partitions,
        held=held,
        ownership=ownership,
        channel=channel,
        peers=addresses,
        ordinal=settings.pod_ordinal if replicas > 1 else 0,
        replicas=replicas,
        address_of=(lambda holder: holder_address(holder, settings.grpc_port)) if kubernetes else (lambda _h: None),
        peers_variable=peers_variable,
    )


__all__ = [
    "DELETE_SCOPE",
    "DESCRIPTOR",
    "EXPORT_SCOPE",
    "FORWARDED",
    "SCOPES",
    "Owners",
    "PersonExport",
    "document_struct",
    "export_service",
    "holder_address",
    "peer_addresses",
    "replica_owners",
    "rfc3339",
]
