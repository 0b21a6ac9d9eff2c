"""A document over MAX_DOCUMENT_BYTES of JSON inside a bulk write is refused naming its op, and nothing of
the write is stored, on the adapters that store JSON (SQLite encodes each document in its own loop and
hands only an oversized one to `encode_document` to refuse; MongoDB's limit is BSON's, see the contract
tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import Put, Store
from cdp_kit.storage.memory import MemoryStore
from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_kit.storage.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "memory"])
async def json_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    store: Store = SqliteStore(tmp_path / "size.db") if request.param == "sqlite" else MemoryStore()
    yield store
    await store.close()


async def test_an_oversized_document_in_a_bulk_write_is_refused_naming_its_op_and_nothing_is_written(
    json_store: Store,
) -> None:
    store = json_store
    ops = [
        Put("profiles", "small", {"name": "a"}),
        Put("profiles", "huge", {"blob": "x" * MAX_DOCUMENT_BYTES}),
        Put("profiles", "after", {"name": "b"}),
    ]

    with pytest.raises(InvalidArgument) as caught:
        await store.bulk_write(ops)

    assert caught.value.field == "ops[1].doc"
    assert await store.get_many("profiles", ["small", "huge", "after"]) == {}


async def test_a_document_just_under_the_limit_is_stored(json_store: Store) -> None:
    store = json_store
    doc = {"blob": "x" * (MAX_DOCUMENT_BYTES - len('{"blob":""}'))}

    result = await store.bulk_write([Put("profiles", "big", doc), Put("profiles", "other", {"n": 1})])

    assert result.versions == (1, 1)
    assert (await store.get("profiles", "big")).doc == doc
