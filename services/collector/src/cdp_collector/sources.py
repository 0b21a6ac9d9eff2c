"""Sources and their write keys.

A source is one producer of events (a website, an app, a back end, a CRM). Clients authenticate with
the source's write key, exactly as with Segment: HTTP Basic with the key as user name and an empty
password, or `write_key` in a gRPC CollectRequest. The file is a Kubernetes Secret; it is re-read when
it changes so keys can be added or revoked, and limits changed, without a restart.

    {"sources": [{"id": "web", "name": "Website", "write_key": "wk_…",
                  "limits": {"events_per_second": 50, "burst": 500, "max_batch": 100}}]}

`limits` is optional (domain/rate.py says what each does). A source may have several keys (one entry
each, the same id: a key being rotated); its limits are one, so its entries must give the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdp_collector.domain.rate import SourceLimits, parse_source_limits
from cdp_kit.errors import Unauthenticated
from cdp_kit.watched import WatchedJsonFile


@dataclass(frozen=True)
class Source:
    id: str
    name: str
    enabled: bool = True
    limits: SourceLimits | None = None  # None: only the limits every source has


def _parse_sources(document: dict) -> dict[str, Source]:
    by_key: dict[str, Source] = {}
    limits_by_id: dict[str, SourceLimits | None] = {}
    for index, entry in enumerate(document["sources"]):
        key = entry["write_key"]
        if not isinstance(key, str) or len(key) < 8:
            raise ValueError(f"sources[{index}].write_key must be a string of at least 8 characters")
        if key in by_key:
            raise ValueError(f"sources[{index}].write_key is used by source {by_key[key].id!r} too")
        source_id = str(entry["id"])
        limits = parse_source_limits(entry.get("limits"), f"sources[{index}].limits")
        if limits_by_id.setdefault(source_id, limits) != limits:
            raise ValueError(
                f"sources[{index}].limits differ from those of another entry of source {source_id!r}: a source's "
                "limits are one, whichever of its keys is sent; give every entry of it the same limits"
            )
        by_key[key] = Source(source_id, str(entry.get("name", entry["id"])), bool(entry.get("enabled", True)), limits)
    return by_key


# How a client that is refused for its key finds the right one and sends it. Never the key it sent: a wrong
# key is often a real one of another source or platform, and answers end up in logs.
_WHERE_KEYS_ARE = (
    "the sources and their write keys are in the collector's CDP_COLLECTOR_SOURCES_FILE (under `make up`: "
    "the dev source's key is write_key in .cdp/run.json). Send the key as the HTTP Basic user name with an "
    'empty password (or as "writeKey" in the body), or as write_key in a gRPC CollectRequest'
)


class SourceRegistry:
    def __init__(self, path: Path) -> None:
        self._sources = WatchedJsonFile(path, _parse_sources, variable="CDP_COLLECTOR_SOURCES_FILE")

    def authenticate(self, write_key: str | None) -> Source:
        if not write_key:
            raise Unauthenticated(f"missing write key: {_WHERE_KEYS_ARE}")
        source = self._sources.value.get(write_key)
        if source is None:
            raise Unauthenticated(f"unknown write key: no source has the key sent; {_WHERE_KEYS_ARE}")
        if not source.enabled:
            raise Unauthenticated(f"source {source.id!r} is disabled")
        return source

    def __len__(self) -> int:
        return len(self._sources.value)
