"""The part of PrivacyService/ExportPerson every service shares: the request's checks (a person is
required, an id no store can hold as a key is refused naming its field, merged ids are deduplicated
and never the person again), the answer as plain JSON (tuples and sets as lists, numpy numbers as
floats, a non-finite number by its name, times RFC 3339), and the way to the replica holding a person:
where it cannot be reached, UNAVAILABLE naming the partition (never the person), never "nothing held"."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf import json_format

from cdp.privacy.v1 import privacy_pb2
from cdp_kit.bus import partition_for
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_kit.ownership import Ownership, StaticOwnership
from cdp_kit.person_export import (
    EXPORT_SCOPE,
    FORWARDED,
    SCOPES,
    Owners,
    PersonExport,
    document_struct,
    holder_address,
    peer_addresses,
    rfc3339,
)


def test_every_rpc_needs_the_export_scope():
    assert SCOPES == {"ExportPerson": EXPORT_SCOPE} and EXPORT_SCOPE == "privacy:export"


def test_the_document_is_plain_json():
    struct = document_struct(
        {"at": (1, 2), "tags": {"b", "a"}, "score": np.float32(0.5), "n": np.int64(3), "bad": math.inf, "x": None}
    )
    assert json_format.MessageToDict(struct) == {
        "at": [1.0, 2.0],
        "tags": ["a", "b"],
        "score": 0.5,
        "n": 3.0,
        "bad": "inf",
        "x": None,
    }
    assert rfc3339(0) == "1970-01-01T00:00:00Z" and rfc3339(None) is None


async def test_the_servicer_checks_the_request_and_passes_the_persons_once():
    asked = []

    async def export(person_id, merged, context):
        asked.append((person_id, list(merged)))
        return {"person_id": person_id}

    servicer = PersonExport("test", export)
    request = privacy_pb2.ExportPersonRequest(person_id="p1", merged_person_ids=["p0", "p1", "p0"])
    answer = await servicer.ExportPerson(request, None)
    assert answer.service == "test" and json_format.MessageToDict(answer.document) == {"person_id": "p1"}
    assert asked == [("p1", ["p0"])]
    with pytest.raises(InvalidArgument) as caught:
        await servicer.ExportPerson(privacy_pb2.ExportPersonRequest(), None)
    assert caught.value.field == "person_id"
    with pytest.raises(InvalidArgument) as caught:
        await servicer.ExportPerson(privacy_pb2.ExportPersonRequest(person_id="p1", merged_person_ids=[""]), None)
    assert caught.value.field == "merged_person_ids[0]"


async def test_an_id_no_store_can_hold_is_refused_by_the_servicer_before_the_service_is_asked():
    asked = []

    async def export(person_id, merged, context):
        asked.append(person_id)
        return {}

    servicer = PersonExport("test", export)
    for request, field in (
        (privacy_pb2.ExportPersonRequest(person_id="a\x00b"), "person_id"),
        (privacy_pb2.ExportPersonRequest(person_id="p" * 1025), "person_id"),
        (privacy_pb2.ExportPersonRequest(person_id="p1", merged_person_ids=["p0", "x" * 5000]), "merged_person_ids[1]"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            await servicer.ExportPerson(request, None)
        assert caught.value.field == field
    assert asked == []


# --- the replica holding a person: where a replica cannot reach the owner, UNAVAILABLE naming the partition


class _Context:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


class _Leases(Ownership):
    """A leased ownership as seen from one member: who holds each partition (None: free or moving)."""

    identity = "cdp-scoring-0"

    def __init__(self, holders: dict[int, str | None]) -> None:
        self.holders = holders

    async def start(self, on_acquire=None, on_release=None) -> None: ...

    async def stop(self) -> None: ...

    def owned(self):
        return frozenset(p for p, h in self.holders.items() if h == self.identity)

    async def changes(self):
        yield self.owned()

    def holder(self, partition: int) -> str | None:
        return self.holders.get(partition)


def _person_of(partition: int, partitions: int = 4) -> str:
    return next(f"p_{n}" for n in range(1000) if partition_for(f"p_{n}", partitions) == partition)


def _owners(ownership, held=(0,), **kwargs) -> Owners:
    return Owners(partitions=4, held=lambda: held, ownership=ownership, channel=lambda _a: None, **kwargs)


async def _refusal(owners: Owners, person: str, context=None) -> str:
    with pytest.raises(Unavailable) as caught:
        await owners.ask(person, context or _Context())
    assert person not in caught.value.message  # the partition is named, never the person
    return caught.value.message


async def test_a_person_of_a_held_partition_is_answered_here_and_others_are_asked_of_their_owner():
    owners = _owners(StaticOwnership(partitions=4, ordinal=0, replicas=2), held={0, 2}, replicas=2, peers=["a", "b"])
    assert owners.holds(_person_of(0)) and owners.holds(_person_of(2))
    assert not owners.holds(_person_of(1)) and owners.owner_address(1, _Context()) == "b"


async def test_static_a_partition_of_this_replica_still_loading_or_one_of_a_replica_without_address():
    static = StaticOwnership(partitions=4, ordinal=0, replicas=2)
    loading = await _refusal(_owners(static, held=(), replicas=2, peers=["a", "b"]), _person_of(2))
    assert "partition 2" in loading and "loading" in loading
    unknown = await _refusal(_owners(static, replicas=2, peers_variable="CDP_SCORING_PEERS"), _person_of(1))
    assert "partition 1" in unknown and "CDP_SCORING_PEERS" in unknown


async def test_leases_a_moving_partition_or_a_holder_without_address_is_unavailable():
    leases = _Leases({1: None, 2: "cdp-scoring-0", 3: "laptop-4242"})
    assert "partition 1 is moving" in await _refusal(_owners(leases), _person_of(1))
    assert "partition 2 is moving" in await _refusal(_owners(leases), _person_of(2))  # acquired, not loaded yet
    assert "partition 3" in await _refusal(_owners(leases), _person_of(3))
    pods = _owners(_Leases({3: "cdp-scoring-1"}), address_of=lambda holder: holder_address(holder, 50054))
    assert pods.owner_address(3, _Context()) == "cdp-scoring-1.cdp-scoring-headless:50054"


async def test_a_forwarded_request_is_never_forwarded_again():
    owners = _owners(StaticOwnership(partitions=4, ordinal=0, replicas=2), replicas=2, peers=["a", "b"])
    refusal = await _refusal(owners, _person_of(1), _Context((FORWARDED, "1")))
    assert "partition 1" in refusal


def test_replica_addresses_come_from_the_peers_or_the_statefulset_pod_name():
    assert peer_addresses(peers="a:1, b:2", pod_name="", replicas=2, grpc_port=0) == ["a:1", "b:2"]
    assert peer_addresses(peers="", pod_name="cdp-scoring-1", replicas=2, grpc_port=50054) == [
        "cdp-scoring-0.cdp-scoring-headless:50054",
        "cdp-scoring-1.cdp-scoring-headless:50054",
    ]
    assert peer_addresses(peers="", pod_name="laptop", replicas=2, grpc_port=0) == []
    assert holder_address("laptop", 50054) is None
