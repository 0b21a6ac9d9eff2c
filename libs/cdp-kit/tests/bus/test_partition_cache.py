"""Partitioner: the partition function with a bounded cache."""

from cdp_kit.bus import Partitioner, partition_for


def test_partitioner_answers_partition_for_and_keeps_its_cache_bounded():
    partitioner = Partitioner(8, limit=10)
    keys = [f"person-{i}" for i in range(25)]
    assert [partitioner(k) for k in keys] == [partition_for(k, 8) for k in keys]
    assert len(partitioner._cache) <= 10
    assert [partitioner(k) for k in keys] == [partition_for(k, 8) for k in keys]
