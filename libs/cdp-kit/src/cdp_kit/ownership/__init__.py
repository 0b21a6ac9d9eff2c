"""Which replica works on which partition, following the live set of replicas.

A partitioned engine plugs in like this::

    ownership = await ownership_from_settings(settings, js=js, group="identity", partitions=8)
    await ownership.start(on_acquire=engine.start_partition, on_release=engine.stop_partition)
    ...
    await ownership.stop()  # on SIGTERM: releases every partition, then leaves

- `on_acquire(p)` is awaited once this replica holds partition p: start p's pipeline.
- `on_release(p)` is awaited when p must go to another replica (or on `stop()`): stop fetching,
  drain in-flight commits, then return. Returning is the acknowledgement: the lease is freed for the
  new owner only afterwards, so no partition is ever worked on by two live replicas at once.
- `owned()` is the current set; `changes()` yields each new set (for metrics and logs).

Kinds (`CDP_OWNERSHIP`):
- `static`: `StaticOwnership`, p % CDP_REPLICAS == CDP_POD_ORDINAL, fixed for the process' life
  (single-process runs, tests, and the behaviour before leases).
- `nats`: `LeasedOwnership` over a NATS JetStream KV bucket (`nats_kv`): `make up` and tests. The bucket
  is shared; each service lists and reads only its own keys (`group_kv`, on subjects its NATS user is
  granted).
- `kubernetes`: `LeasedOwnership` over coordination.k8s.io/v1 Lease objects (`kubernetes_leases`),
  in a cluster; the chart grants the service account the Lease verbs.

How leases move (the protocol, its invariants and its failure behaviour: `leased`): every member
heartbeats a member record; each computes the same balanced assignment over the live members
(`assignment`); a member that is no longer assigned a partition releases it and then frees its
lease, and the assigned member takes a lease only when it is free or its holder stopped renewing it
for `CDP_OWNERSHIP_TTL` seconds (a crashed replica's partitions move after the TTL).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import typing

from cdp_kit.ownership.assignment import assign, owned_by
from cdp_kit.ownership.base import Ownership, PartitionCallback, StaticOwnership
from cdp_kit.ownership.leased import Lease, LeasedOwnership, LeaseStore
from cdp_kit.settings import env

__all__ = [
    "Lease",
    "LeaseStore",
    "LeasedOwnership",
    "Ownership",
    "OwnershipSettings",
    "PartitionCallback",
    "StaticOwnership",
    "assign",
    "owned_by",
    "ownership_from_settings",
]


@dataclasses.dataclass(frozen=True)
class OwnershipSettings:
    """The ownership variables; a partitioned service adds these fields to its settings class."""

    ownership: typing.Literal["static", "nats", "kubernetes"] = env(
        "CDP_OWNERSHIP",
        "static",
        help="static: p % CDP_REPLICAS == CDP_POD_ORDINAL; nats: leases in a NATS KV bucket; kubernetes: Lease objects",
    )
    ownership_ttl: float = env(
        "CDP_OWNERSHIP_TTL", 15.0, help="seconds without renewal after which a replica's partitions move to others"
    )
    pod_name: str = env(
        "CDP_POD_NAME",
        "",
        help="this replica's identity among the lease holders, unique per replica (the pod name; default: host-pid)",
    )
    pod_namespace: str = env(
        "CDP_POD_NAMESPACE", "default", help="namespace of the Lease objects (CDP_OWNERSHIP=kubernetes)"
    )
    pod_ordinal: int = env("CDP_POD_ORDINAL", 0, help="this replica's StatefulSet ordinal (CDP_OWNERSHIP=static)")
    replicas: int = env("CDP_REPLICAS", 1, help="replicas sharing the partitions (CDP_OWNERSHIP=static)")

    def validate(self) -> list[str]:
        problems = []
        if self.ownership_ttl <= 0:
            problems.append(f"CDP_OWNERSHIP_TTL={self.ownership_ttl} is invalid: must be positive")
        if self.ownership == "static":
            if self.replicas < 1:
                problems.append(f"CDP_REPLICAS={self.replicas} is invalid: must be at least 1")
            elif not 0 <= self.pod_ordinal < self.replicas:
                problems.append(f"CDP_POD_ORDINAL={self.pod_ordinal} is invalid: must be 0..{self.replicas - 1}")
        return problems


def _process_identity() -> str:
    """host-pid, in the characters every store accepts: unique among the processes of one machine."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "host"
    return f"{host}-{os.getpid()}"


async def ownership_from_settings(
    settings: OwnershipSettings, *, group: str, partitions: int, js=None, api_client=None
) -> Ownership:
    """The ownership `settings` name, for `group`'s partitions (`js`: a JetStream context, needed for
    nats; `api_client`: a kubernetes.aio ApiClient, loaded from the pod's service account if None)."""
    identity = settings.pod_name or _process_identity()
    if settings.ownership == "static":
        return StaticOwnership(partitions=partitions, ordinal=settings.pod_ordinal, replicas=settings.replicas)
    if settings.ownership == "nats":
        if js is None:
            raise ValueError("CDP_OWNERSHIP=nats needs a JetStream context")
        from cdp_kit.ownership.nats_kv import nats_kv_ownership

        return await nats_kv_ownership(
            js, group=group, partitions=partitions, identity=identity, ttl=settings.ownership_ttl
        )
    from cdp_kit.ownership.kubernetes_leases import kubernetes_lease_ownership

    return await kubernetes_lease_ownership(
        api_client,
        namespace=settings.pod_namespace,
        group=group,
        partitions=partitions,
        identity=identity,
        ttl=settings.ownership_ttl,
    )
