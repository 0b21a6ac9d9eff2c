"""How profile keeps its state in the store: the collections, and one record of each kind.

Profiles and timeline entries are stored as one JSON string each: they hold user data whose keys may
be anything ("$set", "a.b"), which a document store may refuse as field names, and one string is also
far cheaper for the storage port to check than a walk over every nested value.

A person's model scores written by `scores.updated` are a record of their own (`profile_scores`, keyed
by the person, the root part's scores: `encode_scores`), not a rewrite of the profile: scores arrive
once per event the person makes, and the profile record (tens of KiB with its computed traits) was
encoded and written again for a few numbers. Every other write of the profile still holds its scores;
the scores record only runs ahead of it, and loading lays it over the profile (`overlay_scores`: per
name the newest (at, model, version) wins, as `Profile.set_scores` decides), so a scores record older
than the profile changes nothing. It is deleted with the person's record when that becomes a tombstone
(merged away) or a deletion marker, so it never outlives the profile it belongs to.

A person's timeline is stored in two places (`timeline.py` says when an entry moves): the newest entries
of each of its parts in the person's record (`timeline_head`, one JSON string), and the rest in the
timeline collection as pages (`encode_page`: one row, one JSON string, of up to `PAGE_ENTRIES` entries of
one origin, keyed `page_key`). Releases before pages wrote a row per entry (`encode_entry`, keyed
`timeline_key`); such rows are still read. `row_entries` reads a row of either format, `head_entries` a
record's head, and `stored_timeline` a whole person's timeline: readers outside the service use these, not
copies of the decoding.

A checkpoint (one per consumed partition subject, `{"stream_seq": ...}`) is written by the kit's
partitioned engine with each batch; the batch's change messages wait in the engine's outbox until they
are published. Releases before the engine kept them in the checkpoint (`changes`): start-up publishes
what such a checkpoint still holds and drops the field (`encode_checkpoint` / `checkpoint_leftovers`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from cdp_kit.bus import OutMessage
from cdp_kit.bus.subjects import checkpoints_collection
from cdp_profile import SERVICE
from cdp_profile.domain import Profile, Retention, Score, TimelineEntry

PROFILES = "profiles"
TIMELINE = "profile_timeline"
CHECKPOINTS = checkpoints_collection(SERVICE)
DEFINITIONS = "profile_computed_traits"
DELETIONS = "profile_deletions"
SCORES = "profile_scores"
HEAD = "timeline_head"  # the field of a person's record holding its newest timeline entries


def encode_profile(profile: Profile, head: bytes = b"") -> dict[str, Any]:
    """The person's record; `head`: its parts' newest timeline entries, a JSON array's items (see timeline.py)."""
    # to_json reuses the encodings of the computed states this change left alone (most of the document)
    merged_from = [origin for origin in profile.parts if origin != profile.person_id]
    doc = {"merged_from": merged_from, "profile": profile.to_json().decode()}
    if head:
        doc[HEAD] = (b"[%s]" % head).decode()
    return doc


def decode_profile(
    doc: dict[str, Any],
    timeline: Iterable[TimelineEntry],
    retention: Retention,
    head: list[TimelineEntry] | None = None,
) -> Profile:
    """A live person's record with the entries of its parts' timeline rows (`row_entries`, of every origin
    in the record); the entries the record holds itself (its head, `head_entries`) are added here."""
    entries = [*timeline, *(head_entries(doc) if head is None else head)]
    return Profile.from_doc(orjson.loads(doc["profile"]), _distinct(entries), retention=retention)


def _distinct(entries: list[TimelineEntry]) -> list[TimelineEntry]:
    # Each entry is stored once (a page leaves the head in the write that stores it); a copy read twice
    # anyway is not an event twice.
    keys = {(e.origin, e.at, e.event_id) for e in entries}
    if len(keys) == len(entries):
        return entries
    seen: set[tuple[str, float, str]] = set()
    out = []
    for entry in entries:
        key = (entry.origin, entry.at, entry.event_id)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def head_entries(doc: dict[str, Any]) -> list[TimelineEntry]:
    """The timeline entries a person's record holds itself (its head; none in a record of an older release)."""
    raw = doc.get(HEAD)
    return [TimelineEntry.from_doc(item) for item in orjson.loads(raw)] if raw else []


def stored_timeline(doc: dict[str, Any], rows: Iterable[dict[str, Any]]) -> list[TimelineEntry]:
    """A live person's whole stored timeline, oldest first: the head its record `doc` holds and the entries of
    `rows`, its parts' timeline rows (found by `timeline_prefix` of each origin), in either format."""
    entries = [entry for row in rows for entry in row_entries(row)]
    return sorted(_distinct(entries + head_entries(doc)))


def encode_scores(profile: Profile) -> dict[str, Any]:
    """The scores record of a live profile: its own part's scores (where `set_scores` writes them), one
    JSON string like the profile (the port checks a string, not a walk over every score)."""
    # Kept with the part until a score changes (this runs for every person of every scores batch).
    return {"scores": profile.parts[profile.person_id].scores_json()[0].decode()}


def overlay_scores(profile: Profile, doc: dict[str, Any]) -> None:
    """Lay a stored scores record over a profile just decoded: per name the newer score stays."""
    part = profile.parts[profile.person_id]
    part.scores_changed()
    held = part.scores
    for name, stored in orjson.loads(doc["scores"]).items():
        score = Score.from_doc(stored)
        current = held.get(name)
        if current is None or score.key() > current.key():
            held[name] = score


def encode_entry(entry: TimelineEntry) -> dict[str, Any]:
    """One entry as one row (how releases before pages stored every entry; still read)."""
    return {"entry": orjson.dumps(entry.to_doc()).decode()}


def decode_entry(doc: dict[str, Any]) -> TimelineEntry:
    return TimelineEntry.from_doc(orjson.loads(doc["entry"]))


def encode_page(entries: Iterable[bytes]) -> dict[str, Any]:
    """A page of one origin's entries (each its JSON, `entry_json`) as one row."""
    return {"entries": (b"[%s]" % b",".join(entries)).decode()}


def entry_json(entry: TimelineEntry) -> bytes:
    return orjson.dumps(entry.to_doc())


def row_entries(doc: dict[str, Any]) -> list[TimelineEntry]:
    """The entries of one timeline row, a page or (written by an older release) a single entry."""
    raw = doc.get("entries")
    if raw is None:
        return [decode_entry(doc)]
    return [TimelineEntry.from_doc(item) for item in orjson.loads(raw)]


def timeline_key(entry: TimelineEntry) -> str:
    """The key of `entry`'s row as releases before pages wrote it."""
    # Keyed by the part's origin person: merging and splitting profiles moves no timeline record.
    return f"{entry.origin}|{round(entry.at * 1000):015d}|{entry.event_id}"


def page_key(first: TimelineEntry, attempt: int = 0) -> str:
    """The key of a page whose oldest entry, when it was made, was `first` (the origin, a time and an event
    id: no identifier value); `attempt` tells it from a row already holding that key."""
    return f"{timeline_key(first)}|page{attempt or ''}"


def timeline_pages(entries: Iterable[TimelineEntry], per_page: int) -> list[tuple[str, dict[str, Any]]]:
    """Rows holding `entries` (of any origins) as pages of at most `per_page`, for a store written at once."""
    by_origin: dict[str, list[TimelineEntry]] = {}
    for entry in sorted(entries):
        by_origin.setdefault(entry.origin, []).append(entry)
    return [
        (page_key(held[i]), encode_page(entry_json(e) for e in held[i : i + per_page]))
        for held in by_origin.values()
        for i in range(0, len(held), per_page)
    ]


def timeline_prefix(origin: str) -> str:
    """The key prefix of every timeline entry of one origin person."""
    return f"{origin}|"


def encode_checkpoint(stream_seq: int, at: float, messages: Iterable[OutMessage] = ()) -> dict[str, Any]:
    """A checkpoint as releases before the partitioned engine wrote it (tests of the upgrade)."""
    return {
        "stream_seq": stream_seq,
        "at": at,
        "changes": [{"subject": m.subject, "payload": m.payload.hex(), "msg_id": m.msg_id} for m in messages],
    }


def checkpoint_leftovers(doc: dict[str, Any]) -> list[OutMessage]:
    """The change messages a checkpoint still holds: written with their position, not yet published."""
    return [
        OutMessage(subject=m["subject"], payload=bytes.fromhex(m["payload"]), msg_id=m["msg_id"])
        for m in doc.get("changes", [])
    ]
