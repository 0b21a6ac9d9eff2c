"""Which stores of this process cannot work now, for the service's health.

A store that cannot write for a reason the operator must fix (a full disk, an I/O error, a read-only
volume: `cdp_kit.storage.sqlite_faults`) says so here when it starts failing and again when it writes; a
store whose file is damaged says so when a call first meets the damage, and stays listed until it is
closed (damage does not heal by itself). The service runtime (`cdp_kit.service`) turns a non-empty list
into its gRPC health service `cdp.storage` reading NOT_SERVING, which `cdpctl status` shows. Liveness
and readiness (the health of "" and of the service's own gRPC names) do not follow it: restarting a
process or taking it out of its Service frees no disk and mends no file.
"""

from __future__ import annotations

# The gRPC health service name that reads NOT_SERVING while a store of the process cannot work.
HEALTH_NAME = "cdp.storage"

_failing: set[str] = set()
_damaged: set[str] = set()


def cannot_write(store: str) -> None:
    """`store` (its path, or another name without credentials) fails to write from now on."""
    _failing.add(store)


def writes_again(store: str) -> None:
    _failing.discard(store)


def damaged(store: str) -> None:
    """`store`'s file is damaged: listed until `forget` (a write that misses the damage clears nothing)."""
    _damaged.add(store)


def forget(store: str) -> None:
    """`store` is closed: none of its faults is this process's any more."""
    _failing.discard(store)
    _damaged.discard(store)


def failing() -> list[str]:
    """The stores of this process that cannot work now."""
    return sorted(_failing | _damaged)
