"""What only the SQLite adapter promises: persistence, its file format, its locking, its query plans."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from cdp_kit.errors import FailedPrecondition, InvalidArgument, Unavailable
from cdp_kit.storage import Delete, DuplicateValue, Put, Record, SqliteStore
from cdp_kit.storage import health as store_health


async def test_documents_versions_and_indexes_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as store:
        await store.ensure_index("profiles", "email", unique=True)
        await store.bulk_write(
            [
                Put("profiles", "p1", {"email": "a@example.com", "traits": {"plan": "pro"}}),
                Put("checkpoints", "profile/0", {"seq": 42}),
            ]
        )
        await store.put("profiles", "p1", {"email": "a@example.com", "traits": {"plan": "team"}})

    async with SqliteStore(path) as reopened:
        assert await reopened.get("profiles", "p1") == Record(
            "p1", 2, {"email": "a@example.com", "traits": {"plan": "team"}}
        )
        assert await reopened.get("checkpoints", "profile/0") == Record("profile/0", 1, {"seq": 42})
        assert [r.key for r in await reopened.find("profiles", "email", "a@example.com")] == ["p1"]
        with pytest.raises(DuplicateValue):
            await reopened.put("profiles", "p2", {"email": "a@example.com"})
        assert await reopened.put("profiles", "p1", {"email": "b@example.com"}, expected_version=2) == 3


async def test_find_is_an_index_lookup_not_a_scan(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "cdp.db") as store:
        await store.ensure_index("profiles", "email", unique=True)
        await store.ensure_index("profiles", "country")

        unique_plan = store.find_query_plan("profiles", "email")
        plain_plan = store.find_query_plan("profiles", "country")

    assert '"ix:profiles:email"' in unique_plan or "ix:profiles:email" in unique_plan
    assert "ix:profiles:country" in plain_plan
    assert "SCAN documents" not in unique_plan + plain_plan
    # The non-unique index carries the key, so "ORDER BY key LIMIT n" needs no sort.
    assert "TEMP B-TREE" not in plain_plan


async def test_the_file_is_wal_with_json_documents(tmp_path: Path) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as store:
        await store.put("profiles", "p1", {"name": "Zoë", "n": [1, 2.5, None]})

        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            (doc,) = raw.execute("SELECT doc FROM documents WHERE collection = 'profiles' AND key = 'p1'").fetchone()
        finally:
            raw.close()

    assert json.loads(doc) == {"name": "Zoë", "n": [1, 2.5, None]}


async def test_documents_are_stored_as_json_text_that_every_release_reads(tmp_path: Path) -> None:
    # The column holds TEXT, as it always has: released code reads it back as a str, and SQLite from 3.45
    # reads a BLOB given to the JSON functions of the index expressions as binary JSONB.
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as store:
        await store.ensure_index("profiles", "email")
        await store.bulk_write(
            [
                Put("profiles", "p1", {"email": "zoë@example.com", "n": [1, 2.5, None]}),
                Put("profiles", "p2", {"email": "b@example.com"}),
            ]
        )
        await store.put("profiles", "p2", {"email": "c@example.com"})

        raw = sqlite3.connect(path)
        try:
            rows = raw.execute(
                "SELECT key, typeof(doc), doc, json_extract(doc, '$.email') FROM documents ORDER BY key"
            ).fetchall()
            # A document a released version wrote (a str bound as TEXT) reads back alike.
            raw.execute(
                "INSERT INTO documents (collection, key, version, doc) VALUES ('profiles', 'p3', 4, ?)",
                (json.dumps({"email": "d@example.com"}),),
            )
            raw.commit()
        finally:
            raw.close()
        assert rows == [
            ("p1", "text", '{"email":"zoë@example.com","n":[1,2.5,null]}', "zoë@example.com"),
            ("p2", "text", '{"email":"c@example.com"}', "c@example.com"),
        ]
        assert await store.get("profiles", "p3") == Record("p3", 4, {"email": "d@example.com"})
        assert [r.key for r in await store.find("profiles", "email", "d@example.com")] == ["p3"]
        assert await store.put("profiles", "p3", {"email": "e@example.com"}, expected_version=4) == 5


@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2)])
async def test_synchronous_level_is_configurable(tmp_path: Path, synchronous: str, level: int) -> None:
    async with SqliteStore(tmp_path / "cdp.db", synchronous=synchronous) as store:  # type: ignore[arg-type]
        assert store._writer.submit(lambda: store._wconn.execute("PRAGMA synchronous").fetchone()[0]).result() == level


async def test_a_writer_in_another_process_past_the_busy_timeout_means_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path, busy_timeout=0.05) as store:
        await store.put("profiles", "p1", {"n": 1})
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(Unavailable) as caught:
                await store.put("profiles", "p1", {"n": 2})
            assert await store.get("profiles", "p1") == Record("p1", 1, {"n": 1})  # readers carry on
        finally:
            other.execute("ROLLBACK")
            other.close()

        assert caught.value.retry_after > 0 and "locked" in str(caught.value)
        assert await store.put("profiles", "p1", {"n": 2}) == 2


async def test_an_index_declared_by_another_process_is_found(tmp_path: Path) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as first, SqliteStore(path) as second:
        await first.put("profiles", "p1", {"email": "a@example.com"})
        await second.ensure_index("profiles", "email")

        assert [r.key for r in await first.find("profiles", "email", "a@example.com")] == ["p1"]


async def test_a_database_from_a_newer_release_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "cdp.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.close()

    with pytest.raises(FailedPrecondition, match="schema version 99"):
        SqliteStore(path)


@pytest.mark.parametrize("path", [":memory:", ""])
def test_in_memory_sqlite_is_refused_in_favour_of_memory_store(path: str) -> None:
    with pytest.raises(InvalidArgument, match="memory://"):
        SqliteStore(path)


def files_holding(directory: Path, marker: bytes) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and marker in p.read_bytes())


async def test_erase_leaves_no_byte_of_deleted_documents_in_any_file(tmp_path: Path) -> None:
    """A privacy deletion promises the person is gone from disk, not just from live rows: the WAL still
    holds page images from before the delete, and freed pages keep their old bytes unless zeroed."""
    marker = b"ada.lovelace@example.com"
    async with SqliteStore(tmp_path / "identity.db") as store:
        await store.ensure_index("people", "email", unique=True)
        people = [Put("people", f"email:{i}.{marker.decode()}", {"email": f"{i}.{marker.decode()}"}) for i in range(50)]
        others = [Put("people", f"p{i}", {"email": f"{i}@example.org", "pad": "x" * 500}) for i in range(200)]
        await store.bulk_write(people + others)
        await store.put("people", "email:0." + marker.decode(), {"email": "0." + marker.decode(), "plan": "pro"})
        assert files_holding(tmp_path, marker)  # the test can see what it looks for

        await store.bulk_write([Delete("people", op.key) for op in people])
        assert await store.erase() is True
        assert files_holding(tmp_path, marker) == []
        assert await store.count("people") == 200
        # Debian's libsqlite3 zeroes deleted content by default, SQLite's own default does not: the
        # writer asks for it rather than depend on the build.
        secure = store._writer.submit(lambda: store._wconn.execute("PRAGMA secure_delete").fetchone()[0])
        assert secure.result() == 1  # what was not deleted is all there
    async with SqliteStore(tmp_path / "identity.db") as reopened:
        assert await reopened.count("people") == 200
        assert (await reopened.find("people", "email", "7@example.org"))[0].key == "p7"
    assert files_holding(tmp_path, marker) == []


async def test_an_erase_a_reader_kept_from_finishing_is_finished_by_the_next_write(tmp_path: Path) -> None:
    """A reader that holds an old snapshot longer than erase waits (another process reading the file, a
    long scan) leaves the deleted person's page images in the WAL. The store owes the erase then: the
    next write truncates the WAL as soon as no reader holds it, rather than waiting for the next deletion."""
    path = tmp_path / "profile.db"
    marker = b"katherine.johnson@example.com"
    async with SqliteStore(path, busy_timeout=0.02) as store:
        await store.put("profiles", "p1", {"email": marker.decode()})
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM documents").fetchone()  # a snapshot with the document in it
        await store.delete("profiles", "p1")
        assert await store.erase() is False  # the reader never let go while erase tried
        assert files_holding(tmp_path, marker)
        reader.execute("COMMIT")
        reader.close()
        await store.put("profiles", "p2", {"email": "someone.else@example.org"})  # any later write
        assert files_holding(tmp_path, marker) == []
        assert (await store.get("profiles", "p2")).doc["email"] == "someone.else@example.org"


async def test_erase_waits_for_a_reader_holding_an_old_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "profile.db"
    marker = b"grace.hopper@example.com"
    async with SqliteStore(path) as store:
        await store.put("profiles", "p1", {"email": marker.decode()})
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM documents").fetchone()  # a snapshot with the document in it
        await store.delete("profiles", "p1")
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, lambda: reader.execute("COMMIT"))
        assert await store.erase() is True
        reader.close()
        assert files_holding(tmp_path, marker) == []


# --------------------------------------------------------------------- what the operator is told, and when


async def test_a_full_disk_is_unavailable_logged_once_with_the_file_and_the_cause_and_again_when_it_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as store:
        await store.put("profiles", "p0", {"n": 0})
        pages = store._writer.submit(lambda: store._wconn.execute("PRAGMA page_count").fetchone()[0]).result()
        store._writer.submit(
            lambda: store._wconn.execute(f"PRAGMA max_page_count={pages}")
        ).result()  # the disk is full
        caplog.set_level(logging.INFO, logger="cdp.storage")
        for i in range(3):
            with pytest.raises(Unavailable) as caught:
                await store.bulk_write([Put("profiles", f"p{i + 1}", {"blob": "x" * 20_000})])
        assert "free disk space" in str(caught.value)

        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # said when it starts, not on every call
        assert store_health.failing() == [str(path)]  # what the service's health `cdp.storage` reads
        assert str(path) in warnings[0].getMessage() and "SQLITE_FULL" in warnings[0].getMessage()

        store._writer.submit(lambda: store._wconn.execute("PRAGMA max_page_count=1073741823")).result()  # space again
        await store.bulk_write([Put("profiles", "p1", {"blob": "x" * 20_000})])
        assert await store.count("profiles") == 2
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
            f"sqlite store {path} writes again after 0 s"
        ]
        assert store_health.failing() == []


async def test_a_read_only_store_is_unavailable_naming_the_cause(tmp_path: Path, caplog) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as store:
        store._writer.submit(lambda: store._wconn.execute("PRAGMA query_only=ON")).result()  # as a read-only volume
        with caplog.at_level(logging.WARNING, logger="cdp.storage"), pytest.raises(Unavailable) as caught:
            await store.put("profiles", "p1", {"n": 1})
    assert "read-only" in str(caught.value)
    assert "SQLITE_READONLY" in caplog.records[0].getMessage()


@pytest.mark.parametrize("damage", ["header", "truncated"])
async def test_a_file_that_is_not_a_sqlite_database_stops_start_up_naming_the_file_and_what_to_do(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as store:
        await store.put("profiles", "p1", {"n": 1})
    data = path.read_bytes()
    path.write_bytes(b"not a database, really" * 8 + data[176:] if damage == "header" else data[:100])

    with pytest.raises(FailedPrecondition) as caught:
        SqliteStore(path)
    assert str(path) in str(caught.value)
    assert "restore it from a backup" in str(caught.value) and "aside" in str(caught.value)


def file_size(path: str | Path) -> int:
    return os.path.getsize(path)


async def test_the_log_is_copied_into_the_database_by_the_commits_and_stays_bounded(tmp_path: Path) -> None:
    """SQLite's own checkpoints (no background thread): the commit that passes the mark copies the log
    into the database file, and the log starts again from its beginning, so it stays near the mark."""
    path = tmp_path / "cdp.db"
    async with SqliteStore(path) as store:
        for i in range(240):  # ~24 MB of log in 240 commits: past the mark of 1000 pages (~4 MB) many times
            await store.put("profiles", f"p{i}", {"bio": f"{i:05d}" * 20_000})
        assert file_size(path) > 8 * 1024 * 1024  # copied by a commit, not only logged
        assert file_size(f"{path}-wal") < 5 * 1024 * 1024  # reused from its start: the mark plus a commit
        assert (await store.get("profiles", "p0")).doc["bio"] == "00000" * 20_000  # type: ignore[union-attr]
