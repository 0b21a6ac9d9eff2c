"""URLs as logs and error messages may show them."""

from __future__ import annotations


def without_credentials(url: str) -> str:
    """A server URL (or a comma-separated list, as CDP_NATS_URL takes) with any user, password or token
    left out: `nats://cdpctl:secret@127.0.0.1:4222` -> `nats://127.0.0.1:4222`."""
    return ", ".join(
        f"{part.partition('://')[0]}://{part.rpartition('@')[2]}" if "@" in part else part
        for part in (p.strip() for p in url.split(","))
    )
