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


def encode_profile(profile: Profile) -> dict[str, Any]:
    # to_json reuses the encodings of the computed states this change left alone (most of the document)
    merged_from = [origin for origin in profile.parts if origin != profile.person_id]
    return {"merged_from": merged_from, "profile": profile.to_json().decode()}


def decode_profile(doc: dict[str, Any], timeline: Iterable[TimelineEntry], retention: Retention) -> Profile:
    return Profile.from_doc(orjson.loads(doc["profile"]), timeline, retention=retention)


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
    return {"entry": orjson.dumps(entry.to_doc()).decode()}


def decode_entry(doc: dict[str, Any]) -> TimelineEntry:
    return TimelineEntry.from_doc(orjson.loads(doc["entry"]))


def timeline_key(entry: TimelineEntry) -> str:
    # Keyed by the part's origin person: merging and splitting profiles moves no timeline record.
    return f"{entry.origin}|{round(entry.at * 1000):015d}|{entry.event_id}"


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
