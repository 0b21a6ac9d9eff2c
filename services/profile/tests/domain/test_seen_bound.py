"""The ids of applied events a profile remembers without their timeline entry (`seen`) are inside the
record's bound: the profile's newest that fit in SEEN_MAX_BYTES, across its parts.

Each part remembers the ids of its newest max(max_events, 1,000) events and writes; those whose entries
retention dropped (by age, or pushed out by the other parts' newer events) are stored in the record, and
there was no bound on their bytes: ~150 KB a part with 100-character message ids, so a person merged from
56 such accounts was a record past the store's 8 MiB, and every later event of theirs failed its
partition's batch."""

from __future__ import annotations

import orjson

from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_profile.domain import ComputedTraits, Profile
from cdp_profile.domain.aggregates import stored_size
from cdp_profile.domain.profile import MIN_SEEN_IDS, RECORD_MAX_BYTES, SEEN_MAX_BYTES
from cdp_profile.records import decode_profile, encode_profile

DAY = 86400.0
NOW = 1000 * DAY
PARTS = 56
IDS = MIN_SEEN_IDS + MIN_SEEN_IDS // 4  # a part's `seen` just before its trim


def _event_id(part: int, n: int) -> str:
    # `<source>:<messageId>`, the message id at the collector's 100 characters
    return f"web:{part:03d}-{n:05d}-" + "x" * 90


def _merged_record() -> Profile:
    """What the store holds of a person merged from PARTS accounts whose timelines retention emptied (their
    events over a year old): every part's ids are stored in its `seen`."""
    parts = [
        {
            "origin": f"p{i}",
            "seen": [[_event_id(i, n), NOW - 400 * DAY + n * 60 + i] for n in range(IDS)],
            "event_count": IDS,
        }
        for i in range(PARTS)
    ]
    doc = {
        "v": 1,
        "person_id": "p0",
        "merged_from": [f"p{i}" for i in range(1, PARTS)],
        "merges": [{"merge_id": f"m{i}", "winner": "p0", "loser": f"p{i}", "at": NOW - DAY} for i in range(1, PARTS)],
        "parts": parts,
    }
    return Profile.from_doc(doc)


def _stored_seen(record: bytes) -> list[list]:
    return [item for part in orjson.loads(record)["parts"] for item in part["seen"]]


def test_a_person_merged_from_many_accounts_keeps_the_newest_ids_within_the_bound(ev):
    profile = _merged_record()
    held = {origin: dict(part.seen) for origin, part in profile.parts.items()}
    record = profile.to_json()
    # Before: 70,000 ids, 8.55 MB as stored, past the store's limit.
    assert stored_size(record) <= RECORD_MAX_BYTES < MAX_DOCUMENT_BYTES
    seen = _stored_seen(record)
    assert sum(len(orjson.dumps(item)) + 2 for item in seen) <= SEEN_MAX_BYTES
    # The newest ids of the profile, whichever part they belong to, are the ones kept.
    everything = sorted(((at, event_id) for seen in held.values() for event_id, at in seen.items()), reverse=True)
    assert sorted(((at, event_id) for event_id, at in seen), reverse=True) == everything[: len(seen)]
    assert len(seen) > IDS  # more than one account's worth
    assert profile.take_trimmed() == {"seen": 1}
    # The profile in memory is what the store holds: a reload remembers the same ids.
    loaded = decode_profile(encode_profile(profile), [], profile.retention)
    assert {k: p.seen for k, p in loaded.parts.items()} == {k: p.seen for k, p in profile.parts.items()}
    # A kept id's event coming again changes nothing.
    newest_at, newest_id = everything[0]
    again = profile.apply(ev(newest_id, "track", "Order Completed", newest_at), ComputedTraits(), now=NOW)
    assert not again and again.relisted == [newest_id]
    # A write within the bound trims nothing more.
    profile.to_json()
    assert profile.take_trimmed() == {}


def test_a_single_account_at_the_defaults_keeps_every_id(ev):
    # The bound takes nothing at the defaults from one account: 1,250 ids of 100-character message ids.
    profile = Profile.from_doc(
        {"v": 1, "person_id": "p0", "parts": [{"origin": "p0", "seen": [[_event_id(0, n), n] for n in range(IDS)]}]}
    )
    record = profile.to_json()
    assert len(_stored_seen(record)) == IDS
    assert profile.take_trimmed() == {}
    oldest = profile.apply(ev(_event_id(0, 0), "track", "Order Completed", 0.0), ComputedTraits(), now=NOW)
    assert not oldest and oldest.relisted == [_event_id(0, 0)]
