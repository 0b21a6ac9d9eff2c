"""A SQLite store damaged inside its pages (a bad disk, a copy taken mid-write, a stray `dd`): the header and
schema still read, so it opens, and the damage shows only when a statement reaches a broken page. Every
call then answers as the open path does for a file that is not a database - naming the file and the way
out - and the service's health says so, rather than a bare `sqlite3.DatabaseError: database disk image is
malformed` that restarts the service over and over without saying which file or what to do."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cdp_kit.bus.consumer import is_outage
from cdp_kit.errors import FailedPrecondition
from cdp_kit.storage import Put, SqliteStore
from cdp_kit.storage import health as store_health

PAGE = 4096
PEOPLE = [Put("profiles", f"p{i:04}", {"email": f"e{i}@example.com", "note": "y" * 300}) for i in range(400)]


async def _store(path: Path) -> tuple[int, int]:
    """A real store of a few hundred documents, then an index on them; closed. Returns the pages the index
    was built in (1-based, first and last): its root and then its leaves, after every page of the rest."""
    async with SqliteStore(path) as store:
        await store.bulk_write(PEOPLE)
        before = await _page_count(store)
        await store.ensure_index("profiles", "email")
        return before + 1, await _page_count(store)


async def _page_count(store: SqliteStore) -> int:
    return await store._run(store._writer, lambda: store._wconn.execute("PRAGMA page_count").fetchone()[0])


def _overwrite(path: Path, first: int, last: int) -> None:
    """Pages `first`..`last` (1-based) overwritten with bytes that are no b-tree page."""
    assert first > 5  # well past the header, the schema and the tables' roots: the store still opens
    with path.open("r+b") as file:
        for page in range(first, last + 1):
            file.seek((page - 1) * PAGE)
            file.write(b"\xff" * PAGE)


def _says_the_file_and_the_way_out(text: str, path: Path) -> None:
    assert str(path) in text
    assert "SQLITE_CORRUPT" in text
    assert "restore it from a backup" in text and "aside" in text


async def test_a_store_damaged_inside_its_pages_names_the_file_and_the_way_out_on_every_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cdp.db"
    _, last = await _store(path)
    _overwrite(path, 7, last)  # every page below the roots: every call reaches one
    caplog.set_level(logging.INFO, logger="cdp.storage")

    store = SqliteStore(path)  # header and schema are intact: it opens
    try:
        calls = {
            "count": lambda: store.count("profiles"),
            "get": lambda: store.get("profiles", "p0200"),
            "scan": lambda: store.scan("profiles", limit=1000),
            "find": lambda: store.find("profiles", "email", "e300@example.com"),
            "put": lambda: store.put("profiles", "p0201", {"email": "new@example.com"}),
        }
        for name, call in calls.items():
            with pytest.raises(FailedPrecondition) as caught:
                await call()
            _says_the_file_and_the_way_out(str(caught.value), path)
            # Never a message's fault: a consumer holds its messages until the file is fixed, dead-lettering none.
            assert is_outage(caught.value), name

        # What the service's gRPC health `cdp.storage` reads (NOT_SERVING), as for a full disk.
        assert store_health.failing() == [str(path)]
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1  # said when it is found, not on every call
        assert errors[0].levelno == logging.ERROR
        _says_the_file_and_the_way_out(errors[0].getMessage(), path)
        assert "e300@example.com" not in caplog.text  # values stay out of logs
    finally:
        await store.close()
    assert store_health.failing() == []  # a closed store is no longer this process's fault


async def test_a_damaged_store_stays_reported_when_another_call_succeeds(tmp_path: Path) -> None:
    """Damage does not heal by itself: a write that happens to miss the broken pages does not clear it."""
    path = tmp_path / "cdp.db"
    root, last = await _store(path)
    _overwrite(path, root + 1, last)  # the e-mail index's leaves only
    async with SqliteStore(path) as store:
        with pytest.raises(FailedPrecondition) as caught:
            await store.find("profiles", "email", "e300@example.com")
        _says_the_file_and_the_way_out(str(caught.value), path)
        assert (await store.get("profiles", "p0300")).doc["email"] == "e300@example.com"
        await store.put("other", "k", {"n": 1})  # the table and its key index are whole
        assert store_health.failing() == [str(path)]
    assert store_health.failing() == []
