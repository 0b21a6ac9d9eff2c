"""A source's limits as written in the sources file, and the token bucket that enforces its rate, on the
test's own clock."""

from __future__ import annotations

import json

import pytest

from cdp_collector.domain.rate import SourceLimits, TokenBucket, check_source_batch, parse_source_limits
from cdp_collector.sources import SourceRegistry


def test_limits_as_written_and_the_burst_defaulting_to_one_seconds_worth():
    assert parse_source_limits(None, "l") is None
    assert parse_source_limits({}, "l") is None  # an empty object limits nothing
    assert parse_source_limits({"events_per_second": 50, "burst": 500, "max_batch": 100}, "l") == SourceLimits(
        50.0, 500, 100
    )
    assert parse_source_limits({"events_per_second": 12.5}, "l").bucket_size == 13
    assert parse_source_limits({"events_per_second": 0.2}, "l").bucket_size == 1
    assert parse_source_limits({"max_batch": 10}, "l").bucket_size is None  # no rate, no bucket


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ([50], "sources[1].limits must be an object"),
        ({"event_per_second": 50}, "unknown keys ['event_per_second']"),
        ({"events_per_second": 0}, "events_per_second must be a positive number"),
        ({"events_per_second": -5}, "events_per_second must be a positive number"),
        ({"events_per_second": "50"}, "events_per_second must be a positive number"),
        ({"events_per_second": True}, "events_per_second must be a positive number"),
        ({"events_per_second": 10, "burst": 0}, "burst must be a whole number of at least 1"),
        ({"events_per_second": 10, "burst": 2.5}, "burst must be a whole number of at least 1"),
        ({"max_batch": False}, "max_batch must be a whole number of at least 1"),
        ({"burst": 10}, "burst is set without events_per_second"),
    ],
)
def test_a_limit_that_is_not_one_is_refused_naming_its_field(limits, words):
    with pytest.raises(ValueError) as caught:
        parse_source_limits(limits, "sources[1].limits")
    assert words in str(caught.value)


def test_the_sources_file_refuses_two_entries_of_one_source_with_different_limits(tmp_path):
    path = tmp_path / "sources.json"
    entry = {"id": "app", "write_key": "wk_app_current_0001", "limits": {"events_per_second": 10}}
    rotated = {**entry, "write_key": "wk_app_previous_0001"}
    path.write_text(json.dumps({"sources": [entry, rotated]}))  # a key being rotated: same limits, fine
    assert SourceRegistry(path).authenticate("wk_app_previous_0001").limits == SourceLimits(10.0)
    path.write_text(json.dumps({"sources": [entry, {**rotated, "limits": {"events_per_second": 99}}]}))
    with pytest.raises(ValueError) as caught:
        SourceRegistry(path)
    assert "sources[1].limits differ from those of another entry of source 'app'" in str(caught.value)
    assert "wk_app" not in str(caught.value)


def test_max_batch_refuses_a_larger_request_naming_the_source_and_the_limit():
    limits = SourceLimits(max_batch=100)
    assert check_source_batch(100, limits, "app", field="batch") is None
    assert check_source_batch(5000, None, "app", field="batch") is None
    problem = check_source_batch(101, limits, "app", field="events")
    assert problem.code == "too_many_events" and problem.field == "events"
    assert "request has 101 events; source 'app' may send at most 100 events per request" in problem.message


def test_a_bucket_admits_its_burst_then_its_rate_whole_requests_or_none():
    bucket = TokenBucket(rate=4, size=8, now=0.0)
    assert bucket.take(8, 0.0) == 0  # the burst
    assert bucket.take(1, 0.0) == 0.25  # refused, a quarter second from a token
    assert bucket.take(2, 0.25) == 0.25  # one token there, two needed: none taken
    assert bucket.take(2, 0.5) == 0
    assert bucket.take(1, 1000.0) == 0  # a long quiet time refills it to its size, no more
    assert bucket.tokens == 7


def test_a_request_larger_than_the_burst_empties_a_full_bucket_into_debt():
    bucket = TokenBucket(rate=2, size=4, now=0.0)
    assert bucket.take(10, 0.0) == 0
    assert bucket.tokens == -6
    assert bucket.empty_for(0.0) == 3.5  # seven tokens to one
    assert bucket.take(1, 3.0) == 0.5
    assert bucket.empty_for(3.5) == 0 and bucket.take(1, 3.5) == 0


def test_changed_limits_keep_what_the_bucket_holds_and_a_refused_requests_tokens_come_back():
    bucket = TokenBucket(rate=1, size=10, now=0.0)
    assert bucket.take(6, 0.0) == 0
    bucket.configure(rate=2, size=20, now=2.0)  # refilled at the old rate up to the change
    assert bucket.tokens == 6
    bucket.configure(rate=2, size=3, now=2.0)  # a smaller burst: no more than it
    assert bucket.tokens == 3
    assert bucket.take(3, 2.0) == 0
    bucket.give_back(3)
    assert bucket.tokens == 3
    bucket.give_back(3)
    assert bucket.tokens == 3  # never above the burst
