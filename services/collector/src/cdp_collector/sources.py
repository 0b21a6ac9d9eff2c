"""Sources and their write keys.

A source is one producer of events (a website, an app, a back end, a CRM). Clients authenticate with
the source's write key, exactly as with Segment: HTTP Basic with the key as user name and an empty
password, or `write_key` in a gRPC CollectRequest. The file is a Kubernetes Secret; it is re-read when
it changes so keys can be added or revoked without a restart.

    {"sources": [{"id": "web", "name": "Website", "write_key": "wk_…"}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cdp_kit.errors import Unauthenticated


@dataclass(frozen=True)
class Source:
    id: str
    name: str
    enabled: bool = True


class SourceRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns: int | None = None
        self._by_key: dict[str, Source] = {}
        self._load()

    @classmethod
    def from_entries(cls, path: Path, entries: list[dict]) -> SourceRegistry:
        path.write_text(json.dumps({"sources": entries}, indent=2))
        return cls(path)

    def _load(self) -> None:
        stat = self.path.stat()
        try:
            document = json.loads(self.path.read_text())
            by_key: dict[str, Source] = {}
            for index, entry in enumerate(document["sources"]):
                key = entry["write_key"]
                if not isinstance(key, str) or len(key) < 8:
                    raise ValueError(f"sources[{index}].write_key must be a string of at least 8 characters")
                if key in by_key:
                    raise ValueError(f"sources[{index}].write_key is used by source {by_key[key].id!r} too")
                by_key[key] = Source(
                    str(entry["id"]), str(entry.get("name", entry["id"])), bool(entry.get("enabled", True))
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"CDP_COLLECTOR_SOURCES_FILE {self.path} is malformed: {exc}") from exc
        self._by_key = by_key
        self._mtime_ns = stat.st_mtime_ns

    def _maybe_reload(self) -> None:
        try:
            if self.path.stat().st_mtime_ns != self._mtime_ns:
                self._load()
        except (OSError, ValueError):
            pass  # keep the last good keys while a Secret is being rewritten

    def authenticate(self, write_key: str | None) -> Source:
        if not write_key:
            raise Unauthenticated("missing write key: send it as the HTTP Basic user name (empty password)")
        self._maybe_reload()
        source = self._by_key.get(write_key)
        if source is None:
            raise Unauthenticated("unknown write key")
        if not source.enabled:
            raise Unauthenticated(f"source {source.id!r} is disabled")
        return source

    def __len__(self) -> int:
        return len(self._by_key)
