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
    """Every byte of the files `<name>*` in `folder` (the database, its -wal and -shm)."""
    return b"".join(path.read_bytes() for path in sorted(folder.glob(f"{name}*")))
