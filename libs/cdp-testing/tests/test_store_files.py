"""store_bytes finds a value SQLite split across overflow pages, which no scan of the files does."""

from __future__ import annotations

import contextlib
import sqlite3

from cdp_testing.store_files import store_bytes


def test_a_value_split_across_overflow_pages_is_found(tmp_path):
    # Rows larger than a page, all of one size (where SQLite splits a row depends on its size), each with a
    # marker at another offset: some land across a page boundary (the overflow page's 4-byte pointer to the
    # next one, or another page, between their halves).
    markers = [f"ada-{i:04d}@example.com" for i in range(400)]
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE documents (key TEXT PRIMARY KEY, doc BLOB)")
        for i, marker in enumerate(markers):
            db.execute(
                "INSERT INTO documents VALUES (?, ?)", (str(i), b"x" * (4500 + i) + marker.encode() + b"y" * (8400 - i))
            )
        db.commit()
    raw = b"".join(path.read_bytes() for path in sorted(tmp_path.glob("s.db*")))
    split = [m for m in markers if m.encode() not in raw]
    assert split, "no marker fell across two pages: the test shows nothing"
    held = store_bytes(tmp_path, "s.db")
    assert [m for m in markers if m.encode() not in held] == []
    assert b"bob@example.com" not in held


def test_the_files_read_are_left_as_they_were(tmp_path):
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (v TEXT)")
        db.execute("INSERT INTO t VALUES ('ada@example.com')")
        db.commit()
        before = {p.name: p.read_bytes() for p in tmp_path.glob("s.db*")}
        assert b"ada@example.com" in store_bytes(tmp_path, "s.db")
        assert {p.name: p.read_bytes() for p in tmp_path.glob("s.db*")} == before


def test_files_that_are_no_database_are_read_as_bytes(tmp_path):
    (tmp_path / "notes.log").write_bytes(b"ada@example.com")
    assert b"ada@example.com" in store_bytes(tmp_path, "notes.log")
