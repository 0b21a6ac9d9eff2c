"""A JSON file (usually a mounted Kubernetes Secret) parsed once and re-parsed when it changes.

Used for credentials that rotate: bearer-token digests, source write keys. A malformed file at start-up
stops the service with the reason; a malformed file later (a Secret caught mid-rewrite) keeps the last
good content in force instead of locking every caller out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class WatchedJsonFile(Generic[T]):
    def __init__(self, path: Path, parse: Callable[[Any], T], *, variable: str) -> None:
        """`parse` turns the decoded JSON into T, raising KeyError/TypeError/ValueError on bad content;
        `variable` names the setting the file came from, for the error message."""
        self.path = path
        self._parse = parse
        self._variable = variable
        self._mtime_ns: int | None = None
        self._value = self._load()

    def _load(self) -> T:
        stat = self.path.stat()
        try:
            value = self._parse(json.loads(self.path.read_text()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self._variable} {self.path} is malformed: {exc}") from exc
        self._mtime_ns = stat.st_mtime_ns
        return value

    @property
    def value(self) -> T:
        try:
            if self.path.stat().st_mtime_ns != self._mtime_ns:
                self._value = self._load()
        except (OSError, ValueError):
            pass
        return self._value
