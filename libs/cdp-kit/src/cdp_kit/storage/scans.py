"""Key-ordered scans: the opaque cursor a page hands back, the key range a cursor and a prefix make, and
the page a `limit + 1` read makes."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage.model import Page, Record

_CURSOR_PREFIX = "k1."


def encode_cursor(last_key: str) -> str:
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(last_key.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: object) -> str:
    if isinstance(cursor, str) and cursor.startswith(_CURSOR_PREFIX):
        body = cursor[len(_CURSOR_PREFIX) :]
        try:
            key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            pass
        else:
            if key:
                return key
    raise InvalidArgument("cursor", "not a cursor returned by scan; start again with cursor=None")


def prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix`, so a prefix scan is the key
    range [prefix, end) - an index range, not a filter. None: nothing bounds it (all U+10FFFF)."""
    head = prefix
    while head:
        last = ord(head[-1])
        head = head[:-1]
        if last < 0x10FFFF:
            following = last + 1
            if 0xD800 <= following <= 0xDFFF:  # keys never hold surrogates; skip the block
                following = 0xE000
            return head + chr(following)
    return None


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The keys one scan page may return: above `after` (exclusive) or from `start` (inclusive), below
    `end` (exclusive); None means unbounded."""

    after: str | None
    start: str | None
    end: str | None

    def contains(self, key: str) -> bool:
        if self.after is not None and key <= self.after:
            return False
        if self.start is not None and key < self.start:
            return False
        return self.end is None or key < self.end


def scan_range(cursor: str | None, prefix: str | None) -> KeyRange:
    after = decode_cursor(cursor) if cursor is not None else None
    if not prefix:
        return KeyRange(after, None, None)
    if after is not None and after >= prefix:
        return KeyRange(after, None, prefix_end(prefix))
    return KeyRange(None, prefix, prefix_end(prefix))


def make_page(records: list[Record], limit: int) -> Page:
    """`records` holds up to limit+1 rows: the extra one only says another page exists."""
    if len(records) > limit:
        del records[limit:]
        return Page(records, encode_cursor(records[-1].key))
    return Page(records, None)
