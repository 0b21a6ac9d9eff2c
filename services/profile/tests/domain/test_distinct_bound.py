"""Past MAX_DISTINCT_VALUES distinct values (a bot's random ids, a very busy person): the state stays
bounded, `unique` still holds the values seen last, and `unique_count` is a lower bound that counts again
as values leave a window - never an answer frozen at the values seen first.

States stored by the code before this bound changed read as they did (the encoding is the same)."""

from __future__ import annotations

import orjson

from cdp_profile.domain.aggregates import MAX_DISTINCT_VALUES, UNIQUE_LIMIT, WINDOW_BUCKETS, ComputedState

PAST = MAX_DISTINCT_VALUES + 2_000
WINDOW = 1_000_000.0


def _fill(state: ComputedState, count: int, *, start: int = 0) -> None:
    """Value i at time i, each new; `now` keeps them all inside a window."""
    for i in range(start, start + count):
        state.add(float(i), f"e{i}", f"v{i:05d}", now=float(start + count))


def _latest(upto: int) -> list[str]:
    return [f"v{i:05d}" for i in range(upto - UNIQUE_LIMIT, upto)]


def test_unique_keeps_the_values_seen_last_past_the_bound_in_a_bounded_state():
    state = ComputedState("unique", None, "sig")
    _fill(state, PAST)
    assert state.result() == _latest(PAST)  # not the 100 seen last before the bound was reached
    assert len(state.agg.counts) <= MAX_DISTINCT_VALUES
    state.add(float(PAST + 5), "again", "v00003", now=float(PAST + 5))  # a forgotten value seen again
    assert "v00003" in state.result() and len(state.result()) == UNIQUE_LIMIT


def test_unique_in_a_window_past_the_bound_keeps_a_value_seen_again_when_its_old_views_age_out():
    state = ComputedState("unique", WINDOW, "sig")
    _fill(state, PAST)
    assert state.result() == _latest(PAST)
    # v00000 was forgotten to keep the state bounded; seen again, then its first view ages out
    state.add(float(PAST + 10), "again", "v00000", now=float(PAST + 10))
    state.prune(WINDOW + 0.5)
    assert "v00000" in state.result() and len(state.result()) == UNIQUE_LIMIT


def test_merging_two_parts_past_the_bound_keeps_the_values_seen_last_of_both():
    older, newer = ComputedState("unique", None, "a"), ComputedState("unique", None, "b")
    _fill(older, MAX_DISTINCT_VALUES)
    _fill(newer, 500, start=MAX_DISTINCT_VALUES)
    merged = older.agg.copy()
    merged.combine(newer.agg)
    assert merged.result("unique") == _latest(MAX_DISTINCT_VALUES + 500)
    assert len(merged.counts) <= MAX_DISTINCT_VALUES


def test_unique_count_is_the_bound_past_it_and_counts_again_as_a_window_empties():
    lifetime = ComputedState("unique_count", None, "sig")
    _fill(lifetime, PAST)
    assert lifetime.result() == MAX_DISTINCT_VALUES  # documented: at least this many
    windowed = ComputedState("unique_count", WINDOW, "sig")
    _fill(windowed, PAST)
    assert windowed.result() == MAX_DISTINCT_VALUES
    windowed.prune(WINDOW + 4_999.5)  # values 0..4999 aged out: 7,000 distinct values are left, but...
    # ...12,000 contributions are past MAX_WINDOW_ENTRIES: the oldest were coalesced into buckets of
    # WINDOW / WINDOW_BUCKETS, each leaving with its oldest value, so up to a bucket's width more have left.
    assert PAST - 5_000 - WINDOW / WINDOW_BUCKETS <= windowed.result() <= PAST - 5_000


def test_states_stored_before_read_as_they_did():
    stored = [  # as the code before this change encoded them (ComputedState.to_doc, orjson)
        b'{"op":"unique","window":86400.0,"sig":"sig-u","agg":[["sku-0",1,1000.0,"e0"],["sku-1",2,1006.0,"e9"],'
        b'["sku-2",1,1002.0,"e2"],["sku-3",1,1003.0,"e3"],["sku-4",1,1004.0,"e4"]],"entries":[[1000.0,"e0","sku-0"],'
        b'[1001.0,"e1","sku-1"],[1002.0,"e2","sku-2"],[1003.0,"e3","sku-3"],[1004.0,"e4","sku-4"],'
        b'[1006.0,"e9","sku-1"]]}',
        b'{"op":"unique","window":null,"sig":"sig-l","agg":[[0,1,10.0,"l0"],[1,1,11.0,"l1"],[2,1,12.0,"l2"]]}',
        b'{"op":"unique","window":null,"sig":"sig-o","agg":[["b",3],["a",1]]}',  # before values had times
        b'{"op":"unique_count","window":null,"sig":"sig-c","agg":[["a",2],["b",1],[3,1]]}',
        b'{"op":"most_frequent","window":null,"sig":"sig-m","agg":[["a",2],["b",1],[3,1]]}',
    ]
    states = [ComputedState.from_doc(orjson.loads(doc)) for doc in stored]
    assert [state.result() for state in states] == [
        ["sku-0", "sku-1", "sku-2", "sku-3", "sku-4"],
        [0, 1, 2],
        ["a", "b"],
        3,
        "a",
    ]
    for doc, state in zip(stored, states, strict=True):
        assert orjson.loads(orjson.dumps(state.encoded())) == orjson.loads(doc)  # written back the same
    windowed = states[0]
    windowed.prune(1001.0 + 86400.0)  # sku-0 and sku-1's first view age out
    assert windowed.result() == ["sku-1", "sku-2", "sku-3", "sku-4"]
