"""The Segment HTTP API fuzzed on the whole running platform: what the edge accepts, every service downstream
can read.

hypothesis builds requests as a careless or hostile client would: batches of valid and invalid events
mixed, every field sometimes the wrong JSON type, properties and traits nested up to and past the limit,
strings of 40 KB, every unicode category (lone surrogates, NUL, right-to-left overrides), integers past
64 bits, NaN and Infinity as bare words, timestamps in year 1 and year 9999 and not timestamps at all,
messageIds repeated within a batch and across requests, and sometimes a gzip body. Each request goes to
/v1/batch or a single-call endpoint with the platform's write key.

What must hold:
  - the answer is 200, 400 or 413 (or the documented 429 / 503 to retry): never another 5xx;
  - a 400 for some events lists each rejected one with its index and the field at fault, and a whole
    request refused says why (`code`, `message`);
  - every event the answer counts as accepted is stored and readable downstream: identity resolves it and
    it is on its person's profile timeline (the real processes, read through ProfileService), and nothing
    the fuzz sent was dead-lettered by any service.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gzip
import http.client
import itertools
import json
import time
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_testing.fuzz import budget, dead_letters, nasty_text, time_limit

EXAMPLES = 40  # requests in `make test`; `make fuzz` multiplies it
RETRY = {429, 503}
# An alias's previousId, replaced by one of the user's own: an anonymous id two users both alias to joins
# them, and their events land on one of them only (identity keeps one user id per person).
ANONYMOUS = "<anonymous id of this user>"
KINDS = ("track", "identify", "page", "screen", "group", "alias")

TIMESTAMPS = (
    "2024-06-11T12:00:00Z",
    "2024-06-11T12:00:00.123456+05:30",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999Z",
    "1970-01-01T00:00:00Z",
    "2024-02-30T00:00:00Z",
    "not a time",
    "",
    "9999-12-31T23:59:60Z",
    "+275760-09-13T00:00:00Z",
)

text = nasty_text(surrogates=True)
keys = nasty_text().map(lambda s: s[:40])  # object keys without surrogates: otherwise every body is invalid JSON
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
    st.text(max_size=10).map(lambda s: s * 4000),  # ~40 KB: past the event size limit
)
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)


def nested(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"n": value}
    return value


wrong_types = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2), st.just({"a": 1}))  # fmt: skip


small_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), text)  # fmt: skip
plausible_values = st.recursive(
    small_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def shapes(draw) -> dict:
    """One event as the client writes it, before the test gives it its ids: `fields` are the JSON keys,
    `user` / `message` say what the ids are to be ("ok", "dup", or a hostile value). Half are plausible
    (odd unicode and numbers in their properties, nothing a downstream store cannot hold), so most batches
    mix accepted and rejected events; the other half are hostile in any field."""
    hostile = draw(st.booleans())

    def pick(plausible, bad=None):
        if hostile and draw(st.integers(0, 2)) == 0:
            return draw(bad if bad is not None else st.one_of(text, wrong_types))
        return draw(plausible)

    kind = pick(st.sampled_from(KINDS), st.one_of(text, wrong_types))
    fields: dict = {"type": kind}
    kind = kind if kind in KINDS else "track"
    if kind == "track":
        fields["event"] = pick(st.sampled_from(("Order Completed", "Viewed", "Ünïcødé \u202e", "")).filter(bool))
    if kind in ("page", "screen"):
        fields["name"] = pick(st.sampled_from(("Home", "Cart", "\u05e9\u05dc\u05d5\u05dd")))
    if kind == "group":
        fields["groupId"] = pick(st.sampled_from(("acme", "42")))
    if kind == "alias":
        fields["previousId"] = pick(st.just(ANONYMOUS))  # the test makes it the user's own
    payload = "traits" if kind in ("identify", "group") else "properties"
    if draw(st.booleans()):
        fields[payload] = pick(
            st.dictionaries(keys, plausible_values, max_size=5),
            st.one_of(st.dictionaries(keys, json_values, max_size=5), wrong_types, st.integers(1, 40).map(nested)),
        )
    if draw(st.booleans()):
        fields["timestamp"] = pick(st.sampled_from(TIMESTAMPS[:5]), st.one_of(st.sampled_from(TIMESTAMPS), wrong_types))
    if draw(st.integers(0, 4)) == 0:
        fields["context"] = pick(st.fixed_dictionaries({"ip": st.just("10.0.0.1"), "locale": text}))
    if hostile and draw(st.integers(0, 5)) == 0:
        fields[draw(keys)] = draw(json_values)  # an unknown key
    user = pick(st.just("ok"), st.one_of(text, wrong_types, st.just("missing")))
    message = pick(st.sampled_from(("ok", "ok", "dup")), st.one_of(text, wrong_types, st.just("missing")))
    return {"fields": fields, "user": user, "message": message}


requests = st.fixed_dictionaries(
    {
        "path": st.sampled_from(("batch", "batch", "batch", "single")),
        "events": st.lists(shapes(), min_size=1, max_size=6),
        "gzip": st.booleans(),
        "nan": st.integers(0, 9).map(lambda n: n == 0),  # NaN / Infinity as bare words: not JSON
        "sent_at": st.one_of(st.none(), st.sampled_from(TIMESTAMPS)),
    }
)


@dataclass
class Ledger:
    """What the fuzz expects downstream: every accepted event of a user id it made up, by user id."""

    run: str
    counter: itertools.count = field(default_factory=itertools.count)
    expected: dict[str, set[str]] = field(default_factory=dict)
    requests: int = 0
    accepted: int = 0
    retried: int = 0  # answers 429/503 that were sent again
    sent: dict[str, str] = field(default_factory=dict)  # message id -> the event as sent, for the report


def post(platform, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    host, _, port = platform.service("collector")["http"].removeprefix("http://").partition(":")
    auth = base64.b64encode(f"{platform.write_key}:".encode()).decode()
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}", **headers},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def build(ledger: Ledger, request: dict) -> tuple[list[dict], list[tuple[str, str] | None]]:
    """The events with their ids, and for each the (user id, message id) it should land as, if tracked."""
    user = f"{ledger.run}-u{next(ledger.counter)}"
    events, tracked = [], []
    previous_message = None  # of an earlier event of this user: a "dup" repeats only the user's own
    for shape in request["events"]:
        event = dict(shape["fields"])
        if event.get("previousId") == ANONYMOUS:
            event["previousId"] = f"{user}-anonymous"
        message = f"{ledger.run}-m{next(ledger.counter)}"
        if shape["message"] == "dup" and previous_message is not None:
            message = previous_message
        elif shape["message"] == "missing":
            message = None
        elif shape["message"] != "ok" and shape["message"] != "dup":
            message = shape["message"]
        if message is not None:
            event["messageId"] = message
        if shape["user"] == "ok":
            event["userId"] = user
        elif shape["user"] != "missing":
            event["userId"] = shape["user"]
        events.append(event)
        ok_ids = shape["user"] == "ok" and isinstance(message, str) and message.startswith(ledger.run)
        tracked.append((user, message) if ok_ids else None)
        if ok_ids:
            previous_message = message
            ledger.sent[message] = json.dumps(event)[:400]
    return events, tracked


@pytest.fixture(scope="module")
def ledger(platform) -> Ledger:
    return Ledger(run=f"fzh{int(time.time()) % 100_000}")


@pytest.mark.timeout(time_limit(900))
def test_every_request_is_answered_as_documented_and_every_accepted_event_is_stored_once(platform, ledger):
    """Each hostile request gets a documented answer naming the field it refuses; afterwards every event
    the edge accepted is on its person's timeline exactly once and none was dead-lettered downstream (one
    test: the second half checks what the first half got accepted)."""

    @budget(EXAMPLES)
    @given(request=requests)
    def fuzz(request):
        events, tracked = build(ledger, request)
        if request["path"] == "batch":
            document: dict = {"batch": events}
            if request["sent_at"] is not None:
                document["sentAt"] = request["sent_at"]
            path = "/v1/batch"
        else:
            document, tracked = events[0], tracked[:1]
            kind = document.get("type")
            path = f"/v1/{kind if kind in KINDS else 'track'}"
        if request["nan"]:
            document["properties"] = {"nan": float("nan"), "inf": float("inf")}
        body = json.dumps(document, allow_nan=True).encode()
        headers = {}
        if request["gzip"]:
            body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
        for attempt in range(5):  # as an SDK does: 429 and 503 are retried after a pause
            status, answer = post(platform, path, body, headers)
            if status not in RETRY:
                break
            ledger.retried += 1
            time.sleep(0.2 * 2**attempt)
        ledger.requests += 1
        assert status in (200, 400, 413, *RETRY), f"{status} {answer}"
        if status in RETRY:
            return
        if status == 200:
            assert answer["success"] is True
            assert answer["accepted"] + answer["duplicates"] + answer["suppressed"] == len(tracked), answer
            rejected: set[int] = set()
        else:
            assert answer["success"] is False and answer["code"] and answer["message"], answer
            if answer["code"] != "invalid_events":
                return  # the request as a whole was refused: nothing stored
            assert answer["rejected"], answer
            for item in answer["rejected"]:
                # "" is the body itself: a single call's event as a whole (its size)
                whole = item["field"] == "" and item["code"] == "event_too_large" and path != "/v1/batch"
                assert (item["field"] or whole) and item["message"], f"a rejection names no field: {item}"
            rejected = {item["index"] for item in answer["rejected"]}
        for index, ids in enumerate(tracked):
            if ids is not None and index not in rejected:
                ledger.expected.setdefault(ids[0], set()).add(ids[1])
                ledger.accepted += 1

    fuzz()
    assert ledger.requests >= EXAMPLES
    assert ledger.accepted > 10, f"the fuzz should get plenty of events accepted ({ledger.retried} answers retried)"
    every_accepted_event_is_stored_once(platform, ledger)


def timeline(platform, stub, user: str) -> collections.Counter:
    """The message ids on the user's person's timeline, with how often each is there."""
    try:
        profile = stub.LookupProfile(
            profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value=user),
            metadata=platform.admin_metadata,
            timeout=10,
        )
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return collections.Counter()
        raise
    seen, token = collections.Counter(), ""
    while True:
        page = stub.ListEvents(
            profile_pb2.ListEventsRequest(person_id=profile.person_id, page_size=1000, page_token=token),
            metadata=platform.admin_metadata,
            timeout=10,
        )
        seen.update(event.event_id.partition(":")[2] for event in page.events)
        token = page.next_page_token
        if not token:
            return seen


def every_accepted_event_is_stored_once(platform, ledger: Ledger) -> None:
    """Every event the ledger says the edge accepted is on its person's timeline once; none dead-lettered."""
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(platform.grpc_address("profile")) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        missing = dict(ledger.expected)
        while missing and time.monotonic() < deadline:
            seen = {user: timeline(platform, stub, user) for user in missing}
            missing = {user: lost for user, ids in missing.items() if (lost := ids - set(seen[user]))}
            if missing:
                time.sleep(1.0)
        twice = {m: n for user in ledger.expected for m, n in timeline(platform, stub, user).items() if n > 1}
    assert not missing, "accepted but not on the profile timeline:\n" + "\n".join(
        f"{user}: {ledger.sent.get(message)}" for user, ids in missing.items() for message in ids
    )
    assert not twice, f"on a timeline more than once: {twice}"
    dead = asyncio.run(dead_letters(platform.nats_url, ledger.run.encode()))
    assert not dead, f"dead-lettered: {dead}"


@pytest.mark.timeout(time_limit(120))
def test_a_batch_sent_again_is_all_duplicates_and_stored_once(platform, ledger):
    """As an SDK retries after a lost answer: the same batch again, byte for byte, later."""
    user = f"{ledger.run}-again"
    events = [
        {"type": "track", "userId": user, "messageId": f"{user}-{i}", "event": "Viewed", "properties": {"i": i}}
        for i in range(5)
    ]
    body = json.dumps({"batch": events}).encode()
    assert post(platform, "/v1/batch", body, {}) == (
        200,
        {"success": True, "accepted": 5, "duplicates": 0, "suppressed": 0},
    )
    assert post(platform, "/v1/batch", body, {}) == (
        200,
        {"success": True, "accepted": 0, "duplicates": 5, "suppressed": 0},
    )
    ids = {event["messageId"] for event in events}
    with grpc.insecure_channel(platform.grpc_address("profile")) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        deadline = time.monotonic() + 60
        while not ids <= set(seen := timeline(platform, stub, user)) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert {m: n for m, n in seen.items() if m in ids} == dict.fromkeys(ids, 1)
