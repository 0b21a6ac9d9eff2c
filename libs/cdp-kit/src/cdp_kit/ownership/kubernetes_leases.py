"""Leases as coordination.k8s.io/v1 Lease objects, through the `kubernetes` client's asyncio API.

Objects, in the replica's namespace, labelled `app.kubernetes.io/part-of=cdp`, `cdp.io/ownership-group=<group>`:
- `<group>-member-<identity>` (label `cdp.io/ownership=member`): the member's heartbeat; its
  `renewTime` changes on every heartbeat, and with it the resourceVersion the others watch.
- `<group>-partition-<p>` (label `cdp.io/ownership=partition`): `holderIdentity` is the owner (absent
  when free), `leaseDurationSeconds` the TTL, `acquireTime`/`renewTime` for people reading it with
  kubectl, `leaseTransitions` counts hand-overs.

Every write of a partition lease is a create (409 when it exists) or a replace carrying the
resourceVersion read (409 when anybody wrote since): the API server's optimistic concurrency is the
compare-and-set. Expiry follows the protocol (`leased`): a resourceVersion unchanged for the TTL by the
reader's clock, as client-go's leader election does, so no two clocks need to agree.
The service account needs get/list/watch/create/update/delete on leases (the chart's Role).
"""

from __future__ import annotations

import datetime as dt

from kubernetes.aio import client as k8s
from kubernetes.aio.client.exceptions import ApiException

from cdp_kit.ownership.leased import Lease, LeasedOwnership, Revision

GROUP_LABEL = "cdp.io/ownership-group"
KIND_LABEL = "cdp.io/ownership"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class KubernetesLeaseStore:
    def __init__(self, api_client: k8s.ApiClient, *, namespace: str, group: str, ttl: float) -> None:
        self.api = k8s.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.group = group
        self.ttl_seconds = max(1, round(ttl))

    def _meta(self, name: str, kind: str, resource_version: str | None = None) -> k8s.V1ObjectMeta:
        return k8s.V1ObjectMeta(
            name=name,
            namespace=self.namespace,
            resource_version=resource_version,
            labels={"app.kubernetes.io/part-of": "cdp", GROUP_LABEL: self.group, KIND_LABEL: kind},
        )

    async def _list(self, kind: str) -> list[k8s.V1Lease]:
        listed = await self.api.list_namespaced_lease(
            self.namespace, label_selector=f"{GROUP_LABEL}={self.group},{KIND_LABEL}={kind}"
        )
        return list(listed.items or [])

    async def members(self) -> dict[str, Revision]:
        return {
            lease.spec.holder_identity: lease.metadata.resource_version
            for lease in await self._list("member")
            if lease.spec is not None and lease.spec.holder_identity
        }

    async def heartbeat(self, identity: str) -> None:
        name = f"{self.group}-member-{identity}"
        spec = k8s.V1LeaseSpec(holder_identity=identity, lease_duration_seconds=self.ttl_seconds, renew_time=_now())
        try:
            current = await self.api.read_namespaced_lease(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            await self.api.create_namespaced_lease(
                self.namespace, k8s.V1Lease(metadata=self._meta(name, "member"), spec=spec)
            )
            return
        body = k8s.V1Lease(metadata=self._meta(name, "member", current.metadata.resource_version), spec=spec)
        await self.api.replace_namespaced_lease(name, self.namespace, body)

    async def leave(self, identity: str) -> None:
        try:
            await self.api.delete_namespaced_lease(f"{self.group}-member-{identity}", self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def leases(self) -> dict[int, Lease]:
        prefix = f"{self.group}-partition-"
        out = {}
        for lease in await self._list("partition"):
            name = lease.metadata.name or ""
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                holder = (lease.spec.holder_identity if lease.spec is not None else None) or ""
                out[int(name[len(prefix) :])] = Lease(holder, lease.metadata.resource_version)
        return out

    async def write(self, partition: int, holder: str, expected: Lease | None) -> Lease | None:
        name = f"{self.group}-partition-{partition}"
        now = _now()
        taking = expected is None or expected.holder != holder
        spec = k8s.V1LeaseSpec(
            holder_identity=holder or None,
            lease_duration_seconds=self.ttl_seconds,
            renew_time=now if holder else None,
            acquire_time=now if holder and taking else None,
        )
        try:
            if expected is None:
                written = await self.api.create_namespaced_lease(
                    self.namespace, k8s.V1Lease(metadata=self._meta(name, "partition"), spec=spec)
                )
            else:
                # Read for the counters only: the replace below carries the resourceVersion the
                # caller read, so the API server refuses it (409) if anybody wrote since.
                current = await self.api.read_namespaced_lease(name, self.namespace)
                previous = current.spec or k8s.V1LeaseSpec()
                spec.lease_transitions = (previous.lease_transitions or 0) + (1 if holder and taking else 0)
                if holder and not taking:
                    spec.acquire_time = previous.acquire_time
                body = k8s.V1Lease(metadata=self._meta(name, "partition", str(expected.revision)), spec=spec)
                written = await self.api.replace_namespaced_lease(name, self.namespace, body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return None  # created, replaced or deleted by someone else first
            raise
        return Lease(holder, written.metadata.resource_version)


async def kubernetes_lease_ownership(
    api_client: k8s.ApiClient | None,
    *,
    namespace: str,
    group: str,
    partitions: int,
    identity: str,
    ttl: float = 15.0,
    **kwargs,
) -> LeasedOwnership:
    """Ownership of `group`'s partitions through Lease objects in `namespace`; with no `api_client`,
    the pod's service account (in-cluster configuration) is used."""
    if api_client is None:
        from kubernetes.aio import config

        config.load_incluster_config()
        api_client = k8s.ApiClient()
    store = KubernetesLeaseStore(api_client, namespace=namespace, group=group, ttl=ttl)
    return LeasedOwnership(store, partitions=partitions, identity=identity, ttl=ttl, **kwargs)
