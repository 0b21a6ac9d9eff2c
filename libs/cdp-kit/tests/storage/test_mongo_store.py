"""What only the MongoDB adapter promises: its document layout and indexes, topology detection, error
mapping, and reading the server's duplicate-key details."""

from __future__ import annotations

import pytest
from pymongo import AsyncMongoClient

from cdp_kit.errors import Unavailable
from cdp_kit.natsserver import free_port
from cdp_kit.storage import Put, VersionConflict
from cdp_kit.storage.mongo import MongoStore
from cdp_testing.mongo_double import AsyncCollectionDouble, AsyncMongoDouble


async def test_documents_are_id_version_and_doc_with_real_indexes_on_doc_fields() -> None:
    client = AsyncMongoDouble()
    store = MongoStore(client, "cdp")
    await store.ensure_index("profiles", "email", unique=True)
    await store.ensure_index("profiles", "country")
    await store.put("profiles", "p1", {"email": "a@example.com", "country": "NO"})

    raw = client.backend["cdp"]["profiles"]
    assert raw.find_one({"_id": "p1"}) == {
        "_id": "p1",
        "v": 1,
        "d": {"email": "a@example.com", "country": "NO"},
    }
    indexes = raw.index_information()
    assert indexes["d.email"]["key"] == [("d.email", 1)] and indexes["d.email"]["unique"] is True
    assert "partialFilterExpression" in indexes["d.email"]  # nulls and absent values never collide
    assert indexes["d.country"]["key"] == [("d.country", 1)] and not indexes["d.country"].get("unique")


@pytest.mark.parametrize(("replica_set", "atomic"), [(False, False), (True, True)])
async def test_transactions_are_used_exactly_when_the_topology_has_them(replica_set: bool, atomic: bool) -> None:
    store = MongoStore(AsyncMongoDouble(replica_set=replica_set), "cdp")

    assert await store.bulk_is_atomic() is atomic
    assert await MongoStore(AsyncMongoDouble(replica_set=True), "cdp", transactions=False).bulk_is_atomic() is False


async def test_an_unreachable_server_means_unavailable() -> None:
    client: AsyncMongoClient = AsyncMongoClient(f"mongodb://127.0.0.1:{free_port()}", serverSelectionTimeoutMS=50)
    async with MongoStore(client, "cdp", owns_client=True) as store:
        # A read, and a bulk write (which first asks the server for its topology).
        for attempt in (store.get("profiles", "p1"), store.bulk_write([Put("profiles", "p1", {})])):
            with pytest.raises(Unavailable) as caught:
                await attempt
            assert caught.value.retry_after > 0
            assert "mongodb" in str(caught.value) and "Topology Description" not in str(caught.value)


async def test_a_writer_slipping_in_before_a_standalone_bulk_is_a_version_conflict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = AsyncMongoDouble()
    store = MongoStore(client, "cdp")
    await store.put("profiles", "p1", {"n": 1})
    original = AsyncCollectionDouble.bulk_write

    async def bulk_write_after_a_rival(self, requests, ordered=True, *, session=None):
        client.backend["cdp"]["profiles"].update_one({"_id": "p1"}, {"$inc": {"v": 1}})
        return await original(self, requests, ordered, session=session)

    monkeypatch.setattr(AsyncCollectionDouble, "bulk_write", bulk_write_after_a_rival)

    with pytest.raises(VersionConflict) as caught:
        await store.bulk_write([Put("profiles", "p1", {"n": 2}), Put("profiles", "p2", {"n": 1})])

    assert (caught.value.key, caught.value.expected, caught.value.actual, caught.value.op_index) == (
        "p1",
        1,
        2,
        0,
    )


async def test_an_index_declared_by_another_client_is_found() -> None:
    backend = AsyncMongoDouble().backend
    first = MongoStore(AsyncMongoDouble(backend=backend), "cdp")
    second = MongoStore(AsyncMongoDouble(backend=backend), "cdp")
    await first.put("profiles", "p1", {"email": "a@example.com"})  # caches "no indexes"

    await second.ensure_index("profiles", "email")

    assert [r.key for r in await first.find("profiles", "email", "a@example.com")] == ["p1"]


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ({"keyPattern": {"d.email": 1}, "keyValue": {"d.email": "a@example.com"}}, "email"),
        ({"keyPattern": {"_id": 1}, "keyValue": {"_id": "p1"}}, None),
        (
            {"errmsg": 'E11000 duplicate key error collection: cdp.profiles index: d.email dup key: { : "x" }'},
            "email",
        ),
        (
            {"errmsg": 'E11000 duplicate key error collection: cdp.profiles index: _id_ dup key: { : "p1" }'},
            None,
        ),
    ],
)
async def test_server_duplicate_key_details_name_the_field(details: dict, field: str | None) -> None:
    store = MongoStore(AsyncMongoDouble(), "cdp")

    assert await store._duplicate_field(details, "profiles", "p2", {}, inserting=True) == field


async def test_close_closes_only_a_client_the_store_owns() -> None:
    shared, owned = AsyncMongoDouble(), AsyncMongoDouble()

    await MongoStore(shared, "cdp").close()
    await MongoStore(owned, "cdp", owns_client=True).close()

    assert (shared.closed, owned.closed) == (False, True)
