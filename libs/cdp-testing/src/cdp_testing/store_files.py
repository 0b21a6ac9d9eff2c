"""A service's SQLite store files as an operator handles them: copied and restored with their -wal and
-shm (architecture.md's recovery for a damaged store), and read whole, to check that nothing of a deleted
person is left in them.

    copy_store(data, backup, "profile.db")       # the backup
    copy_store(backup, data, "profile.db")       # the restore, over what is there
    assert b"ada@example.com" not in store_bytes(data, "profile.db")
"""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_store(source: Path, target: Path, name: str) -> None:
    """The files `<name>*` of `source` copied into `target`, whose own `<name>*` files go first."""
    target.mkdir(exist_ok=True)
    for old in target.glob(f"{name}*"):
        old.unlink()
    for path in source.glob(f"{name}*"):
        shutil.copy2(path, target / path.name)


def store_bytes(folder: Path, name: str) -> bytes:
    """Every byte of the files `<name>*` in `folder` (the database, its -wal and -shm), then every value of
    every row as SQLite reads them.

    The files alone are not enough either way: SQLite keeps a row larger than a page in a chain of overflow
    pages, so a value can be split across two pages with other bytes between - found in no scan of the
    files, though any reader of the store gets it whole (a restore test's "the copy still holds her email"
    failed so in a loaded run). The rows are read from a copy (opening a database can change its files:
    the last connection to close checkpoints the WAL into it); the raw bytes still catch what no row holds
    any more (freed pages, an old WAL frame)."""
    raw = b"".join(path.read_bytes() for path in sorted(folder.glob(f"{name}*")))
    return raw + b"\n" + row_bytes(folder, name)


def row_bytes(folder: Path, name: str) -> bytes:
    """Every cell of every table of the SQLite database `<name>` in `folder` (b"" if it is none, or if the
    copy cannot be read: taken while a service writes, it may hold a torn page; the raw bytes stand then)."""
    import contextlib
    import sqlite3
    import tempfile

    database = folder / name
    if not database.is_file() or database.read_bytes()[:16] != b"SQLite format 3\x00":
        return b""
    with tempfile.TemporaryDirectory() as scratch:
        copy_store(folder, Path(scratch), name)
        cells: list[bytes] = []
        try:
            with contextlib.closing(sqlite3.connect(Path(scratch) / name)) as db:
                tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                for table in tables:
                    quoted = '"' + table.replace('"', '""') + '"'
                    for row in db.execute(f"SELECT * FROM {quoted}"):  # a name read from the schema
                        for cell in row:
                            if isinstance(cell, bytes):
                                cells.append(cell)
                            elif cell is not None:
                                cells.append(str(cell).encode("utf-8", "surrogatepass"))
        except sqlite3.DatabaseError:
            return b""
        return b"\n".join(cells)
