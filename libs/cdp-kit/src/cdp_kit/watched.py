"""A JSON file (usually a mounted Kubernetes Secret) parsed once and re-parsed when it changes.

Used for credentials that rotate: bearer-token digests, source write keys. A malformed file at start-up
stops the service with the reason; a malformed file later (a Secret caught mid-rewrite) keeps the last
good content in force instead of locking every caller out. Such a file is said once at WARNING (the
variable, the path and what is wrong with it, which names fields and positions, never their values) and
not read again until it changes: a request never pays for re-parsing a file already known to be bad.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("cdp.watched")


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
            # Remembered, so the bad version is not parsed again on every call; a later write is read.
            self._mtime_ns = stat.st_mtime_ns
            raise ValueError(f"{self._variable} {self.path} is malformed: {exc}") from exc
        self._mtime_ns = stat.st_mtime_ns
        return value

    @property
    def value(self) -> T:
        try:
            if self.path.stat().st_mtime_ns != self._mtime_ns:
                self._value = self._load()
        except OSError:
            pass  # gone for a moment (a Secret's symlinks being swapped): the last good content holds
        except ValueError as exc:
            log.warning(
                "watched file malformed, last good content kept",
                extra={"variable": self._variable, "path": str(self.path), "error": str(exc.__cause__ or exc)},
            )
        return self._value
