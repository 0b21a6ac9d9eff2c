"""What a SQLite store's failures become for its callers, its log and the service's health.

SQLite reports a failure as `sqlite3.Error` with a result code; callers must not see that (their logs name
only an exception's type, and a bare `DatabaseError` says neither which file nor what to do). By the
primary result code:

- SQLITE_BUSY / SQLITE_LOCKED: another process holds the write lock past busy_timeout. `Unavailable`,
  retried soon; nothing for the operator.
- SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY, SQLITE_CANTOPEN: the store cannot write until the operator
  frees disk space, fixes the volume or the permissions. `Unavailable` naming the file and the fix; logged
  when it starts, every minute while it lasts and when the store writes again; `cdp.storage` reads
  NOT_SERVING meanwhile (`cdp_kit.storage.health`).
- SQLITE_CORRUPT / SQLITE_NOTADB: the file is damaged, at open or in a page a later statement reaches.
  `DamagedStore`, naming the file and the way out (restore it, or move it aside and start empty); logged
  at ERROR when first found and every minute after; `cdp.storage` reads NOT_SERVING until the store is
  closed - damage does not heal by itself, so a later call that misses the broken pages clears nothing.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from cdp_kit.errors import FailedPrecondition, Unavailable
from cdp_kit.storage import health

log = logging.getLogger("cdp.storage")

SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL = 5, 6, 10, 13
SQLITE_READONLY, SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_NOTADB = 8, 11, 14, 26
# What a store that cannot write says to the operator, by SQLite's primary result code.
CANNOT_WRITE = {
    SQLITE_FULL: "free disk space",
    SQLITE_IOERR: "check the volume (I/O error)",
    SQLITE_READONLY: "the file or its folder is read-only: fix its permissions or mount",
    SQLITE_CANTOPEN: "the file cannot be opened: check it and its folder exist and are writable",
}
DAMAGED = (SQLITE_CORRUPT, SQLITE_NOTADB)
# While a store cannot write, or is damaged, how often it says so again.
FAILURE_LOG_SECONDS = 60.0


class DamagedStore(FailedPrecondition, Unavailable):
    """The store's file is not a usable SQLite database: nothing but the operator fixes it.

    A FailedPrecondition to a gRPC caller and at start-up. It is also an `Unavailable`, so a stream
    consumer whose handler meets it holds its messages and retries (`cdp_kit.bus.consumer.is_outage`):
    the damage is never the message's fault, and nothing may be dead-lettered for it."""

    def __init__(self, message: str) -> None:
        Unavailable.__init__(self, message, retry_after=30.0, reason=FailedPrecondition.reason)


def result_code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def result_name(exc: sqlite3.Error) -> str:
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


def damaged(path: Path, exc: sqlite3.Error) -> DamagedStore:
    return DamagedStore(
        f"sqlite store {path} is not a usable SQLite database ({result_name(exc)}): restore it from a backup, "
        f"or stop the service and move it and its -wal and -shm files aside to start with an empty store (the "
        f"service's README says what it rebuilds from the streams and what is lost)"
    )


def mapped(path: Path, exc: sqlite3.Error, busy_timeout: float) -> Exception:
    """What a caller gets for `exc`: one of cdp's errors, or `exc` itself for anything else."""
    code = result_code(exc)
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return Unavailable(
            f"sqlite store {path}: locked by another writer for over {busy_timeout}s; retry", retry_after=0.5
        )
    if code in CANNOT_WRITE:
        return Unavailable(f"sqlite store {path}: {exc}; {CANNOT_WRITE[code]}", retry_after=5.0)
    if code in DAMAGED:
        return damaged(path, exc)
    return exc


class Faults:
    """One store's failures the operator must fix: what is logged, and when, and what the health says.
    Event loop only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._name = str(path)
        # Since when writes fail for a reason the operator must fix (CANNOT_WRITE), and when that was last
        # logged; when damage was last logged (None: none seen).
        self._failing_since: float | None = None
        self._failure_logged = 0.0
        self._damage_logged: float | None = None

    def failed(self, exc: sqlite3.Error) -> None:
        """Log a failure the operator must fix: when it starts, then every FAILURE_LOG_SECONDS."""
        code = result_code(exc)
        now = time.monotonic()
        if code in DAMAGED:
            if self._damage_logged is None:
                health.damaged(self._name)
            elif now - self._damage_logged < FAILURE_LOG_SECONDS:
                return
            self._damage_logged = now
            log.error(
                "%s. Calls that reach the damage answer FAILED_PRECONDITION until the file is replaced",
                damaged(self.path, exc).message,
            )
            return
        if code not in CANNOT_WRITE:
            return  # busy or locked: another writer, not the operator's to fix
        if self._failing_since is None:
            self._failing_since = now
            health.cannot_write(self._name)
        elif now - self._failure_logged < FAILURE_LOG_SECONDS:
            return
        self._failure_logged = now
        log.warning(
            "sqlite store %s cannot write (%s) for %.0f s: %s; calls answer UNAVAILABLE until it can",
            self.path,
            result_name(exc),
            now - self._failing_since,
            CANNOT_WRITE[code],
        )

    def wrote(self) -> None:
        """A write committed: a store that could not write can again."""
        if self._failing_since is not None:
            log.info("sqlite store %s writes again after %.0f s", self.path, time.monotonic() - self._failing_since)
            self._failing_since = None
            health.writes_again(self._name)

    def closed(self) -> None:
        """The store is closed: its faults are no longer this process's."""
        health.forget(self._name)
