"""The SQLite store's checkpoints: off the commit path, in the background, bounded, and out of the way of
erase() and close()."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import Delete, Put, SqliteStore

KIB = 1024


def wal_exists(path: Path) -> bool:
    return Path(f"{path}-wal").exists()


def wal_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size if wal_exists(path) else 0


def files_holding(directory: Path, marker: bytes) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and marker in p.read_bytes())


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def pinning_reader(path: Path) -> sqlite3.Connection:
    """Another connection in the middle of a read transaction: its snapshot keeps checkpoints from
    copying anything newer and the log from starting over."""
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM documents").fetchone()
    return reader


def slowed_rounds(store: SqliteStore, seconds: float) -> threading.Event:
    """Make each background round take `seconds` longer; the event is set when one starts."""
    checkpointer = store._checkpointer
    assert checkpointer is not None
    original = checkpointer._checkpoint
    started = threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        started.set()
        time.sleep(seconds)
        original(conn)

    checkpointer._checkpoint = slow  # type: ignore[method-assign]
    return started


async def test_a_commit_past_sqlites_own_checkpoint_mark_leaves_the_copy_to_the_background(tmp_path: Path) -> None:
    """SQLite's auto-checkpoint copies the log into the database file inside the commit that passes 1000
    pages, and every partition waits behind that commit. Here the commits return without touching the
    database file; the checkpointer copies the log once it may run."""
    path = tmp_path / "profile.db"
    async with SqliteStore(path, background_checkpoints=True) as store:
        assert store._checkpointer is not None
        before = path.stat().st_size
        with store._checkpointer.lock:  # the background round cannot run meanwhile
            for i in range(400):  # ~8 MB of log: well past 1000 pages, well under the 64 MiB bound
                await store.put("profiles", f"p{i}", {"bio": f"{i:04d}" * 2000})
            assert wal_size(path) > 4 * 1000 * KIB
            assert path.stat().st_size == before  # no commit copied anything
        await eventually(lambda: store.wal_checkpoints.background >= 1)
        assert path.stat().st_size > 3 * 1000 * KIB
        assert store.wal_checkpoints.blocking == 0
        assert (await store.get("profiles", "p399")).doc["bio"] == "0399" * 2000  # type: ignore[union-attr]


async def test_the_log_is_copied_soon_after_writes_stop_and_the_next_write_starts_it_small(tmp_path: Path) -> None:
    path = tmp_path / "profile.db"
    marker = "the-last-write-before-a-quiet-spell"
    async with SqliteStore(
        path, background_checkpoints=True, wal_checkpoint_bytes=64 * KIB, wal_checkpoint_interval=0.05
    ) as store:
        await store.bulk_write([Put("profiles", f"p{i}", {"bio": "x" * 3000}) for i in range(100)])
        assert wal_size(path) > 64 * KIB
        await store.put("profiles", "p0", {"bio": marker})

        # Nothing more is written, yet the database file itself gets the last write.
        await eventually(lambda: marker.encode() in path.read_bytes())
        # The log starts over at the first write after a round that copied all of it has ended: the marker's
        # page reaches the file before that round syncs and records it (a CI run under load wrote in between
        # and found a 449 kB log). A round holds the lock from start to end.
        assert store._checkpointer is not None
        await eventually(lambda: not store._checkpointer.lock.locked())

        await store.put("profiles", "p1", {"bio": "after the quiet spell"})
        assert wal_size(path) <= 64 * KIB  # the log started over and its file was cut back
        assert store.wal_checkpoints.blocking == 0


async def test_a_reader_holding_a_snapshot_cannot_grow_the_log_past_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "profile.db"
    limit = 512 * KIB
    async with SqliteStore(
        path, background_checkpoints=True, wal_checkpoint_bytes=64 * KIB, wal_max_bytes=limit
    ) as store:
        await store.put("profiles", "p0", {"bio": "before the reader"})
        reader = pinning_reader(path)

        async def let_go_once_past_the_bound() -> None:
            await eventually(lambda: wal_size(path) > limit)
            await asyncio.sleep(0.2)  # while the commit that found it so waits
            reader.execute("COMMIT")

        letting_go = asyncio.create_task(let_go_once_past_the_bound())
        largest = 0
        try:
            for i in range(150):  # ~2.4 MB of log
                await store.put("profiles", f"p{i}", {"bio": f"{i:04d}" * 2000})
                largest = max(largest, wal_size(path))
        finally:
            await letting_go
            reader.close()

        assert largest <= limit + 64 * KIB  # the bound plus one transaction
        # The commit that found the log past the bound waited for the reader and truncated it.
        assert store.wal_checkpoints.blocking >= 1
        assert store.wal_checkpoints.blocked == 0
        assert await store.count("profiles") == 150


async def test_a_reader_that_never_lets_go_slows_commits_but_fails_none(tmp_path: Path) -> None:
    path = tmp_path / "profile.db"
    async with SqliteStore(
        path, background_checkpoints=True, busy_timeout=0.05, wal_checkpoint_bytes=32 * KIB, wal_max_bytes=128 * KIB
    ) as store:
        await store.put("profiles", "p0", {"bio": "before the reader"})
        reader = pinning_reader(path)
        try:
            for i in range(40):
                await store.put("profiles", f"p{i}", {"bio": "y" * 6000})
            assert wal_size(path) > 128 * KIB  # what the reader's snapshot holds on to
            assert store.wal_checkpoints.blocked >= 1
        finally:
            reader.execute("COMMIT")
            reader.close()

        await store.put("profiles", "p1", {"bio": "after the reader"})  # the next commit tries again
        assert wal_size(path) == 0
        assert await store.count("profiles") == 40


async def test_erase_during_a_background_checkpoint_leaves_no_readable_copy(tmp_path: Path) -> None:
    path = tmp_path / "identity.db"
    marker = b"mary.somerville@example.com"
    async with SqliteStore(path, background_checkpoints=True, wal_checkpoint_interval=0.05) as store:
        await store.bulk_write(
            [Put("people", "email", {"email": marker.decode()})]
            + [Put("people", f"p{i}", {"pad": "x" * 500}) for i in range(100)]
        )
        started = slowed_rounds(store, 0.3)
        await asyncio.to_thread(started.wait, 5)  # a round is under way
        await store.bulk_write([Delete("people", "email")])

        assert await store.erase() is True
        assert files_holding(tmp_path, marker) == []
        assert await store.count("people") == 100


async def test_close_during_a_background_checkpoint_is_clean(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "profile.db"
    caplog.set_level(logging.WARNING, logger="cdp.storage")
    store = SqliteStore(path, background_checkpoints=True, wal_checkpoint_interval=0.05)
    await store.bulk_write([Put("profiles", f"p{i}", {"bio": "z" * 2000}) for i in range(200)])
    started = slowed_rounds(store, 0.3)
    await asyncio.to_thread(started.wait, 5)
    await store.put("profiles", "last", {"bio": "committed while the checkpoint ran"})

    await store.close()

    assert store._checkpointer is not None and not store._checkpointer.running
    assert not wal_exists(path)  # the last connection closed copied the log and removed it
    assert caplog.records == []
    async with SqliteStore(path) as reopened:
        assert await reopened.count("profiles") == 201
        assert (await reopened.get("profiles", "last")).doc["bio"] == "committed while the checkpoint ran"  # type: ignore[union-attr]


def test_checkpoint_settings_are_checked() -> None:
    with pytest.raises(InvalidArgument) as caught:
        SqliteStore("x.db", wal_checkpoint_bytes=64 * KIB, wal_max_bytes=32 * KIB)
    assert caught.value.field == "wal_checkpoint_bytes"
    with pytest.raises(InvalidArgument) as caught:
        SqliteStore("x.db", wal_checkpoint_interval=0)
    assert caught.value.field == "wal_checkpoint_interval"
