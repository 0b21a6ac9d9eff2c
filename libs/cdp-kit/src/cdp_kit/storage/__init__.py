"""The storage port every service keeps its durable state behind, and its adapters.

    from cdp_kit.storage import Put, open_store

    async with open_store(settings.store_url) as store:          # CDP_STORE_URL
        await store.ensure_index("profiles", "email", unique=True)
        version = await store.put("profiles", "p-1", {"email": "a@example.com"}, expected_version=0)
        await store.bulk_write([
            Put("profiles", "p-1", {"email": "b@example.com"}, expected_version=version),
            Put("checkpoints", "profile/3", {"seq": 1042}),      # state and stream position together
        ])

`open_store(url)` picks the adapter from the URL:

- ``memory://`` - `MemoryStore`, for unit tests;
- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` - `SqliteStore`, the embedded
  default (``?synchronous=full`` for power-loss durability);
- ``mongodb://...`` or ``mongodb+srv://...`` - `MongoStore`; the database is the URL path (default
  ``cdp``).

The contract (versions, conflicts, indexes, scans, bulk atomicity) is documented in `cdp_kit.storage.port`
and per backend in each adapter's module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage.memory import MemoryStore
from cdp_kit.storage.port import (
    BulkResult,
    Delete,
    Document,
    DuplicateValue,
    Page,
    Put,
    Record,
    Store,
    VersionConflict,
    WriteOp,
)
from cdp_kit.storage.sqlite import SqliteStore

if TYPE_CHECKING:
    from cdp_kit.storage.mongo import MongoStore

__all__ = [
    "BulkResult",
    "Delete",
    "Document",
    "DuplicateValue",
    "MemoryStore",
    "MongoStore",
    "Page",
    "Put",
    "Record",
    "SqliteStore",
    "Store",
    "VersionConflict",
    "WriteOp",
    "open_store",
]

_ACCEPTED = (
    "memory://, sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "mongodb://host[:port]/database or mongodb+srv://host/database"
)


def __getattr__(name: str) -> Any:
    # pymongo is imported only by processes that actually use MongoDB.
    if name == "MongoStore":
        from cdp_kit.storage.mongo import MongoStore

        return MongoStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str) -> Store:
    """The store for a CDP_STORE_URL. Opens SQLite files now (so a bad path fails at start-up); a
    MongoDB client connects on first use."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgument("CDP_STORE_URL", f"expected a URL: {_ACCEPTED}")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "memory":
        if rest.strip("/"):
            raise InvalidArgument("CDP_STORE_URL", "memory:// takes no path or options")
        return MemoryStore()
    if scheme == "sqlite":
        return _open_sqlite(rest)
    if scheme in ("mongodb", "mongodb+srv"):
        from cdp_kit.storage.mongo import MongoStore

        return MongoStore.from_url(url)
    # Only the scheme is echoed: the rest of a URL can carry credentials.
    raise InvalidArgument("CDP_STORE_URL", f"unsupported scheme {scheme!r}; use {_ACCEPTED}")


def _open_sqlite(rest: str) -> SqliteStore:
    location, _, query = rest.partition("?")
    # sqlite:///a.db -> "/a.db" -> relative "a.db"; sqlite:////abs/a.db -> "//abs/a.db" -> "/abs/a.db"
    if not location.startswith("/") or len(location) < 2:
        raise InvalidArgument(
            "CDP_STORE_URL",
            "sqlite URLs have three slashes before a relative path (sqlite:///data/cdp.db) "
            "or four before an absolute one (sqlite:////var/lib/cdp/cdp.db)",
        )
    path = location[1:]
    options = dict(parse_qsl(query, keep_blank_values=True))
    synchronous = options.pop("synchronous", "normal").lower()
    if synchronous not in ("normal", "full"):
        raise InvalidArgument("CDP_STORE_URL", f"sqlite option synchronous={synchronous!r}: use normal or full")
    if options:
        raise InvalidArgument(
            "CDP_STORE_URL",
            f"unknown sqlite option(s) {', '.join(sorted(options))}; the only one is synchronous",
        )
    return SqliteStore(path, synchronous=synchronous)  # type: ignore[arg-type]
