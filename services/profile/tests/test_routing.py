import pytest

from cdp_kit.bus import partition_for
from cdp_profile.routing import Router, peer_addresses


def test_statefulset_peers_are_derived_from_the_pod_name():
    assert peer_addresses(peers="", pod_name="cdp-profile-1", replicas=3, grpc_port=50051) == [
        "cdp-profile-0.cdp-profile-headless:50051",
        "cdp-profile-1.cdp-profile-headless:50051",
        "cdp-profile-2.cdp-profile-headless:50051",
    ]
    assert peer_addresses(peers="", pod_name="", replicas=1, grpc_port=50051) == []
    assert peer_addresses(peers="a:1, b:2", pod_name="", replicas=2, grpc_port=0) == ["a:1", "b:2"]


def test_peers_that_do_not_match_the_replica_count_are_refused():
    with pytest.raises(ValueError, match="CDP_PROFILE_PEERS lists 1 addresses for CDP_REPLICAS=2"):
        peer_addresses(peers="a:1", pod_name="", replicas=2, grpc_port=0)
    with pytest.raises(ValueError, match="needs CDP_PROFILE_PEERS"):
        peer_addresses(peers="", pod_name="laptop", replicas=2, grpc_port=0)


def test_each_person_has_exactly_one_owner():
    routers = [
        Router(partitions=8, ordinal=i, replicas=3, addresses=["a", "b", "c"], channel=lambda a: None) for i in range(3)
    ]
    for n in range(200):
        person = f"p_{n}"
        local = [r.ordinal for r in routers if r.owner(person) is None]
        assert local == [partition_for(person, 8) % 3]
        assert {r.owner(person) for r in routers if r.ordinal not in local} == set(local)
