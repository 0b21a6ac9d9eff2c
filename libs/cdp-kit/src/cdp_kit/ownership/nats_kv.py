"""Leases in a NATS JetStream key-value bucket (local runs with `make up`, and tests).

One bucket (`CDP_OWNERSHIP` by default) holds every group's records, keyed
`<group>.members.<identity>` (the member's heartbeat) and `<group>.partitions.<p>` (the holder's
identity, empty when free). A group may keep state of its own beside its leases under
`<group>.<name>...` keys (segmentation: `<group>.percentiles.*`, the per-partition population summaries and
the decided percentile values, `cdp_segmentation.summaries`); the lease keys never collide with them. Writes use the KV's own optimistic concurrency: `create` succeeds only
when the key is absent, `update(..., last=revision)` only when nobody wrote since that revision.
Expiry is the protocol's (a revision unchanged for the TTL), not the bucket's, so the bucket keeps no
per-key TTL and a member's clock never has to agree with the server's.

The bucket is shared, its keys are not: each service's NATS user may reach only `<its service>.…` keys
(`cdp_kit.natsauth`), and the store lists and reads them through subjects that name the group
(`group_kv.GroupKv`), never through a watch, whose consumer names its filter where permissions cannot
see it. Buckets and keys are those of earlier versions, so a running platform needs no migration.

What a member reads back it checks, because the bucket can hold records no member wrote: nats-server
answers a JetStream API request on whatever reply subject the request names, and the bucket's stream stores
such an answer (JSON) under that subject's key, so any NATS user may plant one under a group's keys
(docs/security.md, the known gap). A member record is a heartbeat only when its value is empty (what
`heartbeat` writes); a lease whose key is not a partition of the group is left out (a key such as
`<group>.partitions.x` failed every round of every member, which then fenced itself and let go of every
partition); a lease whose value is neither empty nor an identity is taken for free, so a member takes it
over by compare-and-set at once instead of waiting out the TTL. A planted record thus costs a member one
write, not its partitions.
"""

from __future__ import annotations

import re

from nats.js.errors import KeyWrongLastSequenceError

from cdp_kit.ownership.group_kv import GroupKv
from cdp_kit.ownership.leased import Lease, LeasedOwnership, Revision

_KEY_PART = re.compile(r"^[-_=a-zA-Z0-9]+\Z")


class NatsKvLeaseStore:
    def __init__(self, kv: GroupKv, group: str) -> None:
        for name, value in (("group", group),):
            if not _KEY_PART.match(value):
                raise ValueError(f"{name} {value!r} may hold only letters, digits, '-', '_' and '='")
        self.kv = kv
        self.group = group

    @classmethod
    async def open(cls, js, group: str, *, bucket: str = "CDP_OWNERSHIP") -> NatsKvLeaseStore:
        return cls(await GroupKv.open(js, bucket, group, description="cdp partition ownership"), group)

    async def _snapshot(self, section: str) -> dict[str, object]:
        prefix = f"{self.group}.{section}."
        return {
            key[len(prefix) :]: entry
            for key, entry in (await self.kv.scan(prefix + ">")).items()
            if entry.operation not in ("DEL", "PURGE")
        }

    async def members(self) -> dict[str, Revision]:
        return {
            identity: entry.revision
            for identity, entry in (await self._snapshot("members")).items()
            if not entry.value and _KEY_PART.match(identity)  # a heartbeat, not a planted record
        }

    async def heartbeat(self, identity: str) -> None:
        await self.kv.put(f"{self.group}.members.{identity}", b"")

    async def leave(self, identity: str) -> None:
        await self.kv.delete(f"{self.group}.members.{identity}")

    async def leases(self) -> dict[int, Lease]:
        leases = {}
        for p, entry in (await self._snapshot("partitions")).items():
            if not p.isdecimal() or p != str(int(p)):
                continue  # no partition of the group: a planted record
            holder = (entry.value or b"").decode(errors="replace")
            if holder and not _KEY_PART.match(holder):
                holder = ""  # no identity: free, taken over by compare-and-set on its revision
            leases[int(p)] = Lease(holder, entry.revision)
        return leases

    async def write(self, partition: int, holder: str, expected: Lease | None) -> Lease | None:
        key = f"{self.group}.partitions.{partition}"
        try:
            if expected is None:
                revision = await self.kv.create(key, holder.encode())
            else:
                revision = await self.kv.update(key, holder.encode(), last=int(expected.revision))
        except KeyWrongLastSequenceError:
            return None
        return Lease(holder, revision)


async def nats_kv_ownership(
    js, *, group: str, partitions: int, identity: str, ttl: float = 15.0, bucket: str = "CDP_OWNERSHIP", **kwargs
) -> LeasedOwnership:
    """Ownership of `group`'s partitions (e.g. group "identity") through a NATS KV bucket."""
    if not _KEY_PART.match(identity):
        raise ValueError(f"identity {identity!r} may hold only letters, digits, '-', '_' and '='")
    store = await NatsKvLeaseStore.open(js, group, bucket=bucket)
    return LeasedOwnership(store, partitions=partitions, identity=identity, ttl=ttl, **kwargs)
