"""Durations as people write them in configuration: 3600, "90s", "15m", "12h", "30d", "2w"."""

from __future__ import annotations

import math
import re
from typing import Any

from cdp_kit.errors import InvalidArgument

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: Any, field_name: str) -> float:
    """Seconds from a positive number of seconds or a string like '30d'; InvalidArgument names the field."""
    if isinstance(value, bool):
        raise InvalidArgument(field_name, f"{value!r} is not a duration: use seconds or a string like '7d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := DURATION_RE.match(value)):
        seconds = float(match.group(1)) * UNITS[match.group(2)]
    else:
        raise InvalidArgument(
            field_name, f"{value!r} is not a duration: use seconds or a string like '90s', '15m', '12h', '30d'"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(field_name, f"{value!r} must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str | float:
    """The shortest exact text for a duration ("30d"), so configuration reads back as people wrote it."""
    for unit in ("w", "d", "h", "m"):
        size = UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s" if seconds == int(seconds) else seconds
