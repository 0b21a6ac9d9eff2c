"""Which replica owns a person, and a channel to it.

Each replica keeps only the profiles of the partitions it owns, so a request about someone else's
person is forwarded to the owner, whichever pod the Kubernetes Service picked.

- Static ownership (p % replicas == ordinal): owners are found by StatefulSet ordinal.
  `CDP_PROFILE_PEERS` lists the replicas' addresses in ordinal order; in a StatefulSet they are derived
  from the pod name (`cdp-profile-1` → `cdp-profile-<ordinal>.cdp-profile-headless:<gRPC port>`).
- Leases: the owner is the lease holder the ownership last saw (`Ownership.holder`), a pod name, and
  its address is derived the same way. While a partition moves (no live holder known) the replica
  answers itself: reads come from the store, writes are refused as not owned (retry).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from cdp.profile.v1 import profile_pb2_grpc
from cdp_kit.bus import partition_for
from cdp_kit.errors import FailedPrecondition, Unavailable

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


def holder_address(holder: str, grpc_port: int) -> str | None:
    """The gRPC address of a lease holder named like a StatefulSet pod (`<set>-<ordinal>`), else None."""
    base, _, ordinal = holder.rpartition("-")
    if not base or not ordinal.isdigit():
        return None
    return f"{holder}.{base}-headless:{grpc_port}"


class Router:
    def __init__(
        self,
        *,
        partitions: int,
        ordinal: int,
        replicas: int,
        addresses: list[str],
        channel: Callable[[str], grpc.aio.Channel],
        holder: Callable[[int], str | None] | None = None,
        me: str = "",
        address_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.partitions = partitions
        self.ordinal = ordinal
        self.replicas = replicas
        self.addresses = addresses
        self._channel = channel
        self._holder = holder  # leased ownership: who holds a partition (see the module docstring)
        self._me = me
        self._address_of = address_of or (lambda _holder: None)
        self._stubs: dict[int | str, profile_pb2_grpc.ProfileServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def owner(self, person_id: str) -> int | str | None:
        """Where the person's partition is owned: an ordinal (static) or an address (leases); None
        when it is this replica, or (leases) when no live holder is known."""
        if self._holder is not None:
            holder = self._holder(partition_for(person_id, self.partitions))
            if not holder or holder == self._me:
                return None
            return self._address_of(holder)
        if self.replicas == 1:
            return None
        ordinal = partition_for(person_id, self.partitions) % self.replicas
        return None if ordinal == self.ordinal else ordinal

    def stub(self, ordinal: int | str, context) -> profile_pb2_grpc.ProfileServiceStub:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(FORWARDED) and isinstance(ordinal, str):
            # Leases: the replica that forwarded it saw an older holder; the partition is moving.
            raise Unavailable("the person's partition is moving between replicas; retry", retry_after=1.0)
        if metadata.get(FORWARDED):
            # The owner we computed forwarded it back: the replicas disagree on CDP_REPLICAS/CDP_PARTITIONS.
            raise FailedPrecondition(
                f"replica {self.ordinal} was sent a person of replica {ordinal} twice; check that every "
                "replica has the same CDP_REPLICAS and CDP_PARTITIONS",
                reason="not_owner",
            )
        stub = self._stubs.get(ordinal)
        if stub is None:
            channel = self._channel(ordinal if isinstance(ordinal, str) else self.addresses[ordinal])
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
