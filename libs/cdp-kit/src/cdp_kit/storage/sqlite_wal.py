"""The SQLite store's write-ahead log checkpoints, kept off the commit path.

Why. SQLite checkpoints by itself (``wal_autocheckpoint``, every 1000 pages) inside the COMMIT that
crosses the mark: that commit copies the log's pages into the database file and syncs both before it
returns, and every partition of a service waits behind it on the store's one writer thread. Under the
profile service at 1,000 events/s that was 165 of 2,463 commits and 4.2 s of their 13.1 s.

How. The writer runs with ``wal_autocheckpoint=0``, and a `Checkpointer` thread with a connection of its
own runs ``wal_checkpoint(PASSIVE)``. PASSIVE waits for no one and takes neither the write lock nor a
reader's: a commit appends to the log while the checkpoint copies older frames, and Python's sqlite3
lets go of the GIL while SQLite copies and syncs. A thread of its own rather than the writer thread
"between commits": under the load where this matters the writer is seldom idle, and a checkpoint begun
on its queue in an idle moment would still hold the next commit behind it for all its length.

When. A round runs when a commit leaves the log past `threshold` bytes (default 4 MiB, SQLite's own
1000 pages), and otherwise `interval` seconds (default 1) after the last round if anything was committed
since - so after writes stop the log is copied into the database file within about a second. The log
starts over from its beginning at the first write after a round copied all of it, i.e. a round that
ended before the next commit: a writer that never pauses (thousands of commits a second, back to back)
may not leave such a gap for a long while, and the bound below then also catches that log: at worst
one truncation in a commit per `limit` of log, instead of SQLite's copy in a commit per 1000 pages.

Measuring the log costs one stat of the -wal file after each commit. SQLite does not shrink the file
when the log starts over (it overwrites it); ``journal_size_limit=threshold`` makes the first commit of a
new log cut the file back to the threshold, so the file is past the threshold exactly when the log is.

The bound. A checkpoint cannot copy frames newer than an open read transaction's snapshot, and the log
cannot start over while a reader uses it, so a reader holding a snapshot keeps it growing whatever
PASSIVE does. Past `limit` bytes (default 64 MiB) the commit that finds it so runs a TRUNCATE checkpoint
itself, waiting up to busy_timeout for readers to let go, and the log file is cut to zero bytes
(`WalCheckpoints.blocking` counts these). If a reader holds on longer than that (`blocked`), the commit
still succeeds and the next one tries again: the log then passes `limit` only by what is committed while
one reader keeps one snapshot open, at most one commit per busy_timeout. So the -wal file stays under
`limit` plus one transaction, except behind a reader that never ends its read transaction.

One checkpoint at a time: SQLite refuses a second concurrent checkpoint with SQLITE_BUSY without waiting,
so the background round, the commit path's blocking checkpoint and ``erase()``'s truncation share
`lock`. `stop()` lets a round in progress finish, ends the thread and closes its connection; the store
then closes its writer and reader as before, and the last connection to close copies what is left and
removes the log.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cdp.storage")

DEFAULT_THRESHOLD_BYTES = 4 * 1024 * 1024
DEFAULT_LIMIT_BYTES = 64 * 1024 * 1024
DEFAULT_INTERVAL_SECONDS = 1.0


@dataclass
class WalCheckpoints:
    """What the store's checkpoints have done since it opened."""

    background: int = 0  # PASSIVE rounds on the checkpointer thread
    blocking: int = 0  # TRUNCATE checkpoints a commit ran because the log passed the limit
    blocked: int = 0  # of those, how many readers kept from finishing
    failed: int = 0  # background rounds SQLite refused (another process checkpointing, an I/O error)


class Checkpointer:
    def __init__(self, path: Path, *, threshold: int, limit: int, interval: float, busy_timeout: float) -> None:
        self.path = path
        self.wal_path = Path(f"{path}-wal")
        self.threshold = threshold
        self.limit = limit
        self.interval = interval
        self.busy_timeout = busy_timeout
        self.counts = WalCheckpoints()
        # Held for the length of any checkpoint this store runs (see the module docstring).
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._committed = False  # a commit since the last round started
        self._stopping = False
        # A daemon: a store nobody closed must not keep the interpreter from exiting; a checkpoint cut
        # short by the exit is one SQLite recovers from.
        self._thread = threading.Thread(target=self._loop, name="cdp-sqlite-checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def writer_settings(self) -> list[str]:
        """The PRAGMAs the writer connection runs with."""
        return ["PRAGMA wal_autocheckpoint=0", f"PRAGMA journal_size_limit={self.threshold}"]

    # --- the writer thread, after each commit ---

    def after_commit(self, conn: sqlite3.Connection) -> None:
        """Never raises: the commit is done, and its caller must hear that it succeeded."""
        self._committed = True
        try:
            size = os.stat(self.wal_path).st_size
        except OSError:  # another connection closed last and removed the log
            return
        if size <= self.threshold:
            return
        if size <= self.limit:
            self._wake.set()
            return
        self.counts.blocking += 1
        try:
            with self.lock:
                # Waits for readers up to the connection's busy_timeout.
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            busy = 1
            log.warning("sqlite store %s: truncating the write-ahead log failed (%s)", self.path, type(exc).__name__)
        if busy:
            self.counts.blocked += 1
            log.warning(
                "sqlite store %s: the write-ahead log passed %d bytes and a reader kept it from being "
                "truncated; the next commit tries again",
                self.path,
                self.limit,
            )

    # --- the checkpointer thread ---

    def _loop(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        except sqlite3.Error as exc:  # the commits' bound still holds the log
            log.warning("sqlite store %s: no background checkpoints (%s)", self.path, type(exc).__name__)
            return
        try:
            while True:
                woken = self._wake.wait(self.interval)
                if self._stopping:
                    return
                self._wake.clear()
                if not (woken or self._committed):
                    continue  # nothing written since the last round
                self._committed = False
                with self.lock:
                    if self._stopping:
                        return
                    self._checkpoint(conn)
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            # busy=1 only when another connection (another process's store) is checkpointing the same
            # file: PASSIVE waits for no reader, it just copies less. The next round tries again.
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            busy = 1
            log.warning("sqlite store %s: a background checkpoint failed (%s)", self.path, type(exc).__name__)
        if busy:
            self.counts.failed += 1
        else:
            self.counts.background += 1

    def stop(self) -> None:
        """End the thread (after the round in progress, if any) and close its connection. Blocks."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
