"""Properties every fitted model must have, on arbitrary records (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

names = st.one_of(
    st.none(),
    st.sampled_from(["Robert", "Bob", "Smith", "José", "Zoë", "O'Brien", "LIZ", "elizabeth", ""]),
    st.text(min_size=1, max_size=12),
)
records = st.fixed_dictionaries(
    {
        "first_name": names,
        "last_name": names,
        "email": st.one_of(st.none(), st.emails(), st.sampled_from(["a.b@x.org", "ab@x.org", "AB@X.ORG"])),
        "phone": st.one_of(st.none(), st.from_regex(r"\+?1?[ (]?\d{3}[) .-]?\d{3}[ .-]?\d{4}", fullmatch=True)),
        "dob": st.one_of(st.none(), st.dates().map(lambda day: day.isoformat()), st.just("19850307")),
        "city": names,
        "zip": st.one_of(st.none(), st.from_regex(r"\d{5}", fullmatch=True)),
        "address": st.one_of(st.none(), st.sampled_from(["12 Maple Avenue", "12 maple ave", "3 Elm St Apt 2"])),
    }
)
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fast
@given(left=records, right=records)
def test_scores_are_symmetric(fitted, left, right):
    matcher, _ = fitted
    forward = matcher.score_pair({"id": "l", **left}, {"id": "r", **right})
    backward = matcher.score_pair({"id": "r", **right}, {"id": "l", **left})
    assert forward.match_weight == backward.match_weight
    assert forward.probability == backward.probability
    assert forward.levels == backward.levels


@fast
@given(record=records)
def test_an_exact_copy_of_an_identifiable_record_is_a_match(fitted, record):
    # A pair's weight is not the sum of its level weights (housemates agree on their shared fields
    # together) and a rare agreement (swapped names) may outweigh a common exact one, so what holds for
    # every record is this: a copy agreeing on a first name and a date of birth is a confident match.
    matcher, _ = fitted
    copy = matcher.score_pair({"id": 1, **record}, {"id": 2, **record})
    present = [name for name, label in copy.levels.items() if label != "null"]
    assert all(copy.levels[name] == "exact" for name in present)
    assume({"first_name", "dob"} <= set(present))
    assert copy.probability >= matcher.config.upper_threshold
