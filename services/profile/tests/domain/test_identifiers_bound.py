"""The identifiers a profile lists are inside the record's bound: the profile's newest that fit in
IDENTIFIERS_MAX_BYTES, across its parts, a person's own identifiers (user ids, emails, CRM ids) before browser
and device ids.

A part keeps the first MAX_PART_IDENTIFIERS (identity's bound for a person linked by events), but explicit
merges (the API, matching, the review queue) are not held to identity's bound, and a profile lists every
part's: a server integration making an anonymous id of the collector's longest (256 characters) per call
fills a part's 2,000 with ~550 KB as stored, so a person merged from 16 such accounts was a record past the
store's 8 MiB, and every later event of theirs failed its partition's batch."""

from __future__ import annotations

import orjson

from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_profile.domain import ComputedTraits, Profile
from cdp_profile.domain.aggregates import stored_size
from cdp_profile.domain.profile import IDENTIFIERS_MAX_BYTES, MAX_PART_IDENTIFIERS, RECORD_MAX_BYTES, Part
from cdp_profile.records import decode_profile, encode_profile

DAY = 86400.0
NOW = 1000 * DAY
ACCOUNTS = 16
NO_DEFS = ComputedTraits()
# The collector's longest anonymous id (cdp_collector.domain.limits.MAX_ID_CHARS); identity normalises
# values of up to 512 characters (MAX_VALUE_CHARS), but an anonymous id comes from the event's field.
ID_CHARS = 256


def _anonymous(account: int, n: int) -> str:
    return f"anonymous_id:{account:02d}-{n:05d}-".ljust(len("anonymous_id:") + ID_CHARS, "a")


def _account(account: int, ev) -> Profile:
    """One account of a server integration: an event a minute under its user id, each with an anonymous id of
    its own, until its part holds MAX_PART_IDENTIFIERS; the accounts' events interleave in time."""
    profile = Profile.new(f"p{account}")
    for n in range(MAX_PART_IDENTIFIERS - 1):
        at = NOW - 30 * DAY + n * 60 + account
        identifiers = (f"user_id:u{account}", _anonymous(account, n))
        profile.apply(ev(f"server:{account}-{n}", "track", "Ping", at, identifiers=identifiers), NO_DEFS, now=NOW)
    return profile


def _merged(ev) -> Profile:
    person = _account(0, ev)
    for account in range(1, ACCOUNTS):
        person.merge(_account(account, ev), merge_id=f"m{account}", at=NOW - DAY, defs=NO_DEFS, now=NOW)
    return person


def _stored_identifiers(record: bytes) -> list[str]:
    return [key for part in orjson.loads(record)["parts"] for key in part["identifiers"]]


def test_a_person_merged_from_many_accounts_lists_their_newest_identifiers_within_the_bound(ev):
    person = _merged(ev)
    held = person.identifiers()
    record = person.to_json()
    # Before: 32,000 identifiers, 8.79 MB as stored, past the store's limit.
    assert stored_size(record) <= RECORD_MAX_BYTES < MAX_DOCUMENT_BYTES
    stored = _stored_identifiers(record)
    times = [at for part in orjson.loads(record)["parts"] for at in part["identifiers_at"]]
    assert stored_size(orjson.dumps(stored)) + len(orjson.dumps(times)) <= IDENTIFIERS_MAX_BYTES
    # (their events' ids, which retention took off the timelines, are bounded too: `seen`)
    assert person.take_trimmed().get("identifiers") == 1
    # The person's own identifiers all stay (a suppression hashes them); of the anonymous ids, the newest of the
    # profile, whichever part they belong to.
    assert {f"user_id:u{account}" for account in range(ACCOUNTS)} <= set(stored)
    anonymous = sorted(
        ((at, key) for part in person.parts.values() for key, at in part.identifiers.items() if key in held),
        reverse=True,
    )
    kept = [key for key in stored if key.startswith("anonymous_id:")]
    assert len(kept) > MAX_PART_IDENTIFIERS  # more than one account's worth
    newest = sorted(
        (
            (at, key)
            for account in range(ACCOUNTS)
            for n in range(MAX_PART_IDENTIFIERS - 1)
            for at, key in [(NOW - 30 * DAY + n * 60 + account, _anonymous(account, n))]
        ),
        reverse=True,
    )
    assert sorted(kept) == sorted(key for _, key in newest[: len(kept)])
    assert [key for _, key in anonymous if key.startswith("anonymous_id:")] == [key for _, key in newest[: len(kept)]]
    # The export names what the profile lists (identity keeps every link).
    assert person.export()["identifiers"] == sorted(person.identifiers()) == sorted(stored)
    # The profile in memory is what the store holds: a reload lists the same identifiers, seen at the same times.
    loaded = decode_profile(encode_profile(person), [], person.retention)
    assert {k: p.identifiers for k, p in loaded.parts.items()} == {k: p.identifiers for k, p in person.parts.items()}
    # An event of a kept identifier goes to the part that saw it; a write within the bound trims nothing more.
    account, n = 7, MAX_PART_IDENTIFIERS - 2
    person.apply(ev("late", "track", "Ping", NOW - DAY, identifiers=(_anonymous(account, n),)), NO_DEFS, now=NOW)
    assert "late" in person.parts[f"p{account}"].seen
    person.to_json()
    assert person.take_trimmed() == {}
    # An identifier seen again after it was dropped is listed again, as the newest.
    again = _anonymous(3, 0)
    assert again not in person.identifiers()
    person.apply(ev("again", "track", "Ping", NOW - 1, identifiers=(again,)), NO_DEFS, now=NOW)
    person.to_json()
    assert again in person.identifiers() and person.take_trimmed() == {}


def test_a_single_account_at_identitys_bound_keeps_every_identifier(ev):
    # The bound takes nothing from one account: 2,000 identifiers of the collector's longest fit.
    account = _account(0, ev)
    record = account.to_json()
    assert len(_stored_identifiers(record)) == MAX_PART_IDENTIFIERS
    assert account.take_trimmed() == {}


def test_a_record_written_before_identifiers_had_times_reads_them_as_seen_at_the_parts_last_event():
    doc = {
        "v": 1,
        "person_id": "p0",
        "parts": [{"origin": "p0", "identifiers": ["user_id:u0", "email:a@x.io"], "last_seen": 10.0}],
    }
    profile = Profile.from_doc(doc)
    assert profile.parts["p0"].identifiers == {"user_id:u0": 10.0, "email:a@x.io": 10.0}
    stored = orjson.loads(profile.to_json())["parts"][0]
    # Listed as before (a build that does not know the times reads the list), the times beside them.
    assert stored["identifiers"] == ["email:a@x.io", "user_id:u0"]
    assert stored["identifiers_at"] == [10.0, 10.0]


def test_a_write_far_below_the_bound_measures_no_identifier_and_encodes_them_once_an_hour(ev, monkeypatch):
    """The bound costs a normal person's writes a length: their identifiers are measured only in a record past
    half the bound, and encoded again only when one is added or its time moves on (an hour later)."""
    measured: list[str] = []
    encoded: list[str] = []
    measure, encode = Part.identifiers_stored_bytes, Part._identifiers_doc
    monkeypatch.setattr(Part, "identifiers_stored_bytes", lambda part: measured.append(part.origin) or measure(part))
    monkeypatch.setattr(Part, "_identifiers_doc", lambda part: encoded.append(part.origin) or encode(part))
    profile = Profile.new("p")
    for n in range(120):  # an event a minute for two hours, a new anonymous id every 50 events
        identifiers = ("user_id:u1", f"anonymous_id:a{n // 50}", "device_id:d1")
        profile.apply(ev(f"web:{n}", "track", "Ping", NOW + n * 60, identifiers=identifiers), NO_DEFS, now=NOW)
        profile.to_json()
    assert measured == []
    # The first event, two new anonymous ids, the times moved on past the hour (once, by the first event after it).
    assert len(encoded) == 4
    stored = orjson.loads(profile.to_json())["parts"][0]
    assert dict(zip(stored["identifiers"], stored["identifiers_at"], strict=True)) == profile.parts["p"].identifiers
    assert profile.parts["p"].identifiers["user_id:u1"] == NOW + 61 * 60
