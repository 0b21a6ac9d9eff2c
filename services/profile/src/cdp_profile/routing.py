"""Which replica owns a person, and a channel to it.

Each replica keeps only the profiles of the partitions it owns (p % replicas == ordinal), so a request
about someone else's person is forwarded to the owner, whichever pod the Kubernetes Service picked.
Owners are found by StatefulSet ordinal: `CDP_PROFILE_PEERS` lists the replicas' addresses in ordinal
order; in a StatefulSet they are derived from the pod name (`cdp-profile-1` →
`cdp-profile-<ordinal>.cdp-profile-headless:<gRPC port>`).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from cdp.profile.v1 import profile_pb2_grpc
from cdp_kit.bus import partition_for
from cdp_kit.errors import FailedPrecondition

FORWARDED = "x-cdp-forwarded"


def peer_addresses(*, peers: str, pod_name: str, replicas: int, grpc_port: int) -> list[str]:
    if peers:
        addresses = [a.strip() for a in peers.split(",") if a.strip()]
        if len(addresses) != replicas:
            raise ValueError(f"CDP_PROFILE_PEERS lists {len(addresses)} addresses for CDP_REPLICAS={replicas}")
        return addresses
    if replicas == 1:
        return []
    base, _, ordinal = pod_name.rpartition("-")
    if not base or not ordinal.isdigit():
        raise ValueError(
            f"CDP_REPLICAS={replicas} needs CDP_PROFILE_PEERS, or CDP_POD_NAME of a StatefulSet pod (got {pod_name!r})"
        )
    return [f"{base}-{i}.{base}-headless:{grpc_port}" for i in range(replicas)]


class Router:
    def __init__(
        self,
        *,
        partitions: int,
        ordinal: int,
        replicas: int,
        addresses: list[str],
        channel: Callable[[str], grpc.aio.Channel],
    ) -> None:
        self.partitions = partitions
        self.ordinal = ordinal
        self.replicas = replicas
        self.addresses = addresses
        self._channel = channel
        self._stubs: dict[int, profile_pb2_grpc.ProfileServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def owner(self, person_id: str) -> int | None:
        """The ordinal of the replica owning the person's partition; None when it is this one."""
        if self.replicas == 1:
            return None
        ordinal = partition_for(person_id, self.partitions) % self.replicas
        return None if ordinal == self.ordinal else ordinal

    def stub(self, ordinal: int, context) -> profile_pb2_grpc.ProfileServiceStub:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(FORWARDED):
            # The owner we computed forwarded it back: the replicas disagree on CDP_REPLICAS/CDP_PARTITIONS.
            raise FailedPrecondition(
                f"replica {self.ordinal} was sent a person of replica {ordinal} twice; check that every "
                "replica has the same CDP_REPLICAS and CDP_PARTITIONS",
                reason="not_owner",
            )
        stub = self._stubs.get(ordinal)
        if stub is None:
            channel = self._channel(self.addresses[ordinal])
            self._channels.append(channel)
            stub = self._stubs[ordinal] = profile_pb2_grpc.ProfileServiceStub(channel)
        return stub

    @staticmethod
    def metadata(context) -> list[tuple[str, str]]:
        """The caller's credentials travel with the request; the owner checks them again."""
        passed = [(k, v) for k, v in (context.invocation_metadata() or ()) if k in ("authorization", "traceparent")]
        return [*passed, (FORWARDED, "1")]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
