"""How the store holds a person's timeline: the newest entries in the person's record, the rest in pages.

A person's record is written again for every event it applies, so an entry rides along with it instead of
being a row of its own: each part (origin person) keeps its newest entries in the record of the person
holding the part (its *head*, the record's `timeline_head`), and once the head holds PAGE_ENTRIES entries
or HEAD_MAX_BYTES of JSON it moves to the timeline collection as ONE row (a *page*, `records.page_key`:
the origin, the oldest entry's time and id), in the same write as the record that no longer holds it. An
event then costs the record's write and a 1/PAGE_ENTRIES share of a page, not the record and a row. Every
write of the service is one atomic store write (the batch with its checkpoint), so after a crash an entry
is either in the head or in a page, never in both nor lost.

Rows of the collection are keyed by origin (`records.timeline_prefix`), as the one-row-per-entry format
of releases before pages was (still read, `records.row_entries`, and rewritten only when an entry in it
leaves): merging or splitting profiles moves no row, and the head moves with its part from record to
record, because the part's record is written whole. An entry retention drops (by count or age), a merge
retracts or a split moves elsewhere leaves its page: the page is written again without it, or deleted
once empty.

`StoredTimeline` is what this replica knows the store holds of one part (`Part.stored`, built when the
profile is loaded, `HotProfiles._adopt`): its head and the rows with their entries. It is updated when a
write is built (`timeline_writes`, right before the write is queued, like the record's versioned put), so
it runs ahead of the store by the writes in flight; a failed write drops it with the whole cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cdp_kit.storage import Delete, Put, WriteOp
from cdp_profile.domain import TimelineEntry
from cdp_profile.domain.profile import Part
from cdp_profile.records import TIMELINE, encode_entry, encode_page, entry_json, page_key, timeline_key

#: Entries a part's head holds before they move out as one page. An event costs its record's write plus
#: 1/PAGE_ENTRIES of a page's; the record carries at most PAGE_ENTRIES - 1 entries (see README).
PAGE_ENTRIES = 16
#: The most a head may hold (its entries' JSON) before it moves out early: entries with large properties
#: must not take a record past the store's limit (RECORD_MAX_BYTES keeps the rest of it within 7 MiB).
HEAD_MAX_BYTES = 64 * 1024

EntryKey = tuple[str, float, str]  # (origin, at, event_id): one stored entry


def entry_key(entry: TimelineEntry) -> EntryKey:
    return (entry.origin, entry.at, entry.event_id)


class StoredTimeline:
    """Where the store holds one part's timeline entries (see the module docstring)."""

    __slots__ = ("head", "head_json", "rows", "where")

    def __init__(self) -> None:
        self.head: dict[EntryKey, tuple[TimelineEntry, bytes]] = {}  # entry -> it and its JSON
        # The head as the record holds it (a JSON array's items): an entry added is appended, so a write
        # of the record copies it rather than joining the entries again.
        self.head_json = b""
        self.rows: dict[str, dict[EntryKey, TimelineEntry]] = {}  # row key -> its entries
        self.where: dict[EntryKey, str] = {}  # entry in a row -> that row's key

    def adopt_row(self, key: str, entries: Iterable[TimelineEntry]) -> bool:
        """Note that row `key` holds `entries` (those held already elsewhere stay there); whether any was new."""
        held = self.rows.setdefault(key, {})
        adopted = False
        for entry in entries:
            k = entry_key(entry)
            if k not in self.where and k not in self.head:
                held[k] = entry
                self.where[k] = key
                adopted = True
        return adopted

    def adopt_head(self, entries: Iterable[TimelineEntry]) -> None:
        for entry in entries:
            self.add(entry)  # an entry a row holds too stays there (the record's next write drops its copy)

    def add(self, entry: TimelineEntry) -> bool:
        """Put `entry` in the head unless it is held already (a merge lists the entries it brings); whether
        it was added."""
        k = (entry.origin, entry.at, entry.event_id)
        if k in self.head or k in self.where:
            return False
        encoded = entry_json(entry)
        self.head[k] = (entry, encoded)
        self.head_json = b"%s,%s" % (self.head_json, encoded) if self.head_json else encoded
        return True

    def remove(self, entry: TimelineEntry, dirty: Dirty) -> bool:
        """Take `entry` out of the head or its row (noted in `dirty`); False if it is not held here."""
        k = entry_key(entry)
        if self.head.pop(k, None) is not None:
            self.head_json = b",".join(encoded for _, encoded in self.head.values())
            return True
        key = self.where.pop(k, None)
        if key is None:
            return False
        del self.rows[key][k]
        dirty[key] = (self, None)
        return True

    def page_out(self, dirty: Dirty) -> None:
        """Move the head's oldest entries out as pages while it is full: each page of one origin, at most
        PAGE_ENTRIES entries and HEAD_MAX_BYTES (or a single entry); the newest stay in the head."""
        held = sorted(self.head.values(), key=lambda item: item[0])
        size = sum(len(encoded) + 1 for _, encoded in held)
        start = 0
        while len(held) - start >= PAGE_ENTRIES or size > HEAD_MAX_BYTES:
            origin = held[start][0].origin
            end, taken = start, 0
            while (
                end < len(held)
                and end - start < PAGE_ENTRIES
                and held[end][0].origin == origin
                and (end == start or taken + len(held[end][1]) + 1 <= HEAD_MAX_BYTES)
            ):
                taken += len(held[end][1]) + 1
                end += 1
            self._store_page(held[start:end], dirty)
            size -= taken
            start = end
        kept = held[start:]
        self.head = {entry_key(entry): (entry, encoded) for entry, encoded in kept}
        self.head_json = b",".join(encoded for _, encoded in kept)

    def _store_page(self, page: list[tuple[TimelineEntry, bytes]], dirty: Dirty) -> None:
        attempt = 0
        while self.rows.get(key := page_key(page[0][0], attempt)):
            attempt += 1  # a row holding entries already has this key (made from the same first entry)
        self.rows[key] = held = {entry_key(entry): entry for entry, _ in page}
        for k in held:
            self.where[k] = key
        dirty[key] = (self, [encoded for _, encoded in page])  # written as made: no entry encoded again

    def row_write(self, key: str, encoded: list[bytes] | None) -> WriteOp:
        """The write of row `key` as this part now holds it: the page (`encoded`, if it was just made), or its
        deletion once empty."""
        held = self.rows.get(key)
        if not held:
            self.rows.pop(key, None)
            return Delete(TIMELINE, key)
        if encoded is None:
            encoded = [entry_json(entry) for entry in sorted(held.values())]
        return Put(TIMELINE, key, encode_page(encoded))


# row key -> the part holding it and, for a page just made, its entries' JSON (None: encode the row again)
Dirty = dict[str, tuple[StoredTimeline, list[bytes] | None]]


def head_of(parts: Iterable[Part]) -> bytes:
    """The head the record of a profile with these parts holds (a JSON array's items)."""
    heads = [part.stored.head_json for part in parts if part.stored is not None and part.stored.head_json]
    return heads[0] if len(heads) == 1 else b",".join(heads)


def row_keys(parts: Iterable[Part]) -> set[str]:
    """The keys of the rows these parts' entries are in, as this replica wrote or read them."""
    return {key for part in parts if part.stored is not None for key in part.stored.rows}


def timeline_writes(
    net: Iterable[tuple[bool, TimelineEntry]],
    stored_of: Callable[[TimelineEntry], StoredTimeline | None],
    fallback: list[WriteOp],
    *,
    pages: bool = True,
) -> list[WriteOp]:
    """The row writes that store what a write's changes did to timelines: `net`, per entry, whether it is
    on its part's timeline after them (added) or not (removed). `stored_of(entry)`: the StoredTimeline of
    the part holding its origin, None if no profile here holds it (the entry is then written, or deleted,
    as one row of the older format, into `fallback`). `pages=False` (CDP_PROFILE_TIMELINE_PAGES, during a
    rolling upgrade from a release before pages): every entry added is written as one row of the older
    format, which that release reads; entries removed leave their head, page or row as always."""
    dirty: Dirty = {}
    grown: dict[int, StoredTimeline] = {}
    for present, entry in net:
        stored = stored_of(entry)
        if stored is None:
            if present:
                fallback.append(Put(TIMELINE, timeline_key(entry), encode_entry(entry)))
            else:
                fallback.append(Delete(TIMELINE, timeline_key(entry)))
            continue
        if present and not pages:
            key = timeline_key(entry)
            if stored.adopt_row(key, (entry,)):
                fallback.append(Put(TIMELINE, key, encode_entry(entry)))
        elif present:
            if stored.add(entry):
                grown[id(stored)] = stored
        elif not stored.remove(entry, dirty):
            fallback.append(Delete(TIMELINE, timeline_key(entry)))  # a row this replica did not know of
    for stored in grown.values():
        if len(stored.head) >= PAGE_ENTRIES or len(stored.head_json) > HEAD_MAX_BYTES:
            stored.page_out(dirty)
    return [stored.row_write(key, encoded) for key, (stored, encoded) in dirty.items()]
