"""`open_store(CDP_STORE_URL)` picks and configures the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import MemoryStore, SqliteStore, open_store
from cdp_kit.storage.mongo import MongoStore


async def test_memory_url() -> None:
    async with open_store("memory://") as store:
        assert isinstance(store, MemoryStore)
        assert await store.put("c", "k", {}) == 1


async def test_relative_sqlite_path_is_under_the_working_directory_and_gets_its_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    async with open_store("sqlite:///data/nested/cdp.db") as store:
        assert isinstance(store, SqliteStore)
        await store.put("c", "k", {})

    assert (tmp_path / "data" / "nested" / "cdp.db").is_file()


async def test_absolute_sqlite_path_with_options(tmp_path: Path) -> None:
    target = tmp_path / "var" / "lib" / "cdp.db"
    assert str(target).startswith("/")

    async with open_store(f"sqlite:///{target}?synchronous=FULL") as store:
        assert isinstance(store, SqliteStore)
        assert store.path == target
        assert store._synchronous == "FULL"

    assert target.is_file()


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("mongodb://127.0.0.1:1/analytics?serverSelectionTimeoutMS=100", "analytics"),
        ("mongodb://user:pw@h1:27017,h2:27017/?replicaSet=rs0", "cdp"),
        ("mongodb+srv://cluster0.example.invalid/tenant_a", "tenant_a"),
    ],
)
async def test_mongodb_urls_name_the_database_and_connect_lazily(url: str, database: str) -> None:
    store = open_store(url)
    try:
        assert isinstance(store, MongoStore)
        assert store.database == database
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgres://admin:hunter2@db/cdp", "unsupported scheme 'postgres'"),
        ("cdp.db", "expected a URL"),
        ("memory://somewhere", "no path"),
        ("sqlite://cdp.db", "three slashes"),
        ("sqlite:///", "three slashes"),
        ("sqlite:///cdp.db?synchronous=off", "synchronous"),
        ("sqlite:///cdp.db?journal=delete", "unknown sqlite option"),
        ("mongodb://admin:hunter2@host:port/db", "not a usable MongoDB URL"),
    ],
)
def test_bad_urls_name_the_variable_and_the_accepted_forms_without_leaking_secrets(url: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        open_store(url)

    assert caught.value.field == "CDP_STORE_URL"
    assert says in str(caught.value)
    assert "hunter2" not in str(caught.value)
    if "scheme" in says or "expected a URL" in says:
        for form in ("memory://", "sqlite:///relative/path.db", "sqlite:////absolute/path.db", "mongodb://"):
            assert form in str(caught.value)
