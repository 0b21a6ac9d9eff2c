"""Partitions of partitioned subjects (`events.raw.<p>`; the subjects themselves: `cdp_kit.bus.subjects`).

The partition of a key is FNV-1a (32-bit) of its UTF-8 bytes modulo the partition count: the same
function nats-server's subject-mapping `partition(n, …)` uses, so a producer computing the partition
itself and a stream mapping subjects server-side place a key in the same partition.
"""

from __future__ import annotations

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_for(key: str, partitions: int) -> int:
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    if partitions == 1:
        return 0
    return fnv1a_32(key.encode()) % partitions


def owned_partitions(partitions: int, ordinal: int, replicas: int) -> list[int]:
    """Partitions replica `ordinal` (a StatefulSet ordinal) of `replicas` owns: p % replicas == ordinal.

    Every partition has exactly one owner for any replica count, so one person's events are handled
    in order by one process."""
    if not 0 <= ordinal < replicas:
        raise ValueError(f"ordinal {ordinal} outside 0..{replicas - 1}")
    return [p for p in range(partitions) if p % replicas == ordinal]


class Partitioner:
    """`partition_for` with a cache: the partition of each key seen lately, for services that look up
    the same persons' partitions over and over (FNV-1a in Python is the costly part). The cache is
    bounded: past `limit` keys it starts again."""

    __slots__ = ("_cache", "limit", "partitions")

    def __init__(self, partitions: int, *, limit: int = 1_000_000) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self.partitions = partitions
        self.limit = limit
        self._cache: dict[str, int] = {}

    def __call__(self, key: str) -> int:
        partition = self._cache.get(key)
        if partition is None:
            if len(self._cache) >= self.limit:
                self._cache.clear()
            partition = self._cache[key] = partition_for(key, self.partitions)
        return partition
