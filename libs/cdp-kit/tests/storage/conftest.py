"""Fixtures that run one test against every storage adapter.

`store_factory` is parametrised over the adapters and builds fresh, empty stores of one of them (the
hypothesis model test needs several per test, in its own event loop); `store` is one such store.
``mongo-real`` runs only when CDP_TEST_MONGODB_URI points at a server (each store gets a throwaway
database); it is the only test that may skip.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cdp_kit.storage import MemoryStore, SqliteStore, Store
from cdp_kit.storage.mongo import MongoStore
from cdp_testing.mongo_double import AsyncMongoDouble

MONGODB_URI_ENV = "CDP_TEST_MONGODB_URI"

ADAPTERS = [
    "memory",
    "sqlite",
    "mongo-double",  # a standalone server: the non-transactional bulk path
    "mongo-double-rs",  # a replica set: the session-transaction bulk path
    pytest.param("mongo-real", marks=pytest.mark.mongodb),
]


class StoreFactory:
    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self._tmp_path = tmp_path
        self._serial = itertools.count()

    def __call__(self) -> Store:
        if self.kind == "memory":
            return MemoryStore()
        if self.kind == "sqlite":
            return SqliteStore(self._tmp_path / f"store-{next(self._serial)}" / "cdp.db")
        if self.kind in ("mongo-double", "mongo-double-rs"):
            return MongoStore(AsyncMongoDouble(replica_set=self.kind == "mongo-double-rs"), "cdp_test")
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient = AsyncMongoClient(os.environ[MONGODB_URI_ENV], serverSelectionTimeoutMS=5000)
        return MongoStore(client, f"cdp_test_{uuid.uuid4().hex[:12]}", owns_client=True)

    async def discard(self, store: Store) -> None:
        if self.kind == "mongo-real" and isinstance(store, MongoStore) and not store._closed:
            await store._client.drop_database(store.database)
        await store.close()


@pytest.fixture(params=ADAPTERS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if request.param == "mongo-real" and not os.environ.get(MONGODB_URI_ENV):
        pytest.skip(f"set {MONGODB_URI_ENV}=mongodb://host:27017 to run the contract against a real MongoDB")
    return StoreFactory(request.param, tmp_path)


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    made = store_factory()
    try:
        yield made
    finally:
        await store_factory.discard(made)
