"""Experiment read-out from counts: rates, uplift against control, the z-test's p-value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.experiments import Counts, experiment, split_stats, tally, z_test
from cdp_orchestration.domain.instance import Enter, EventArrived, new_instance, step
from cdp_orchestration.domain.view import Event, PersonView


def test_uplift_and_p_value_against_control() -> None:
    treated, control = experiment({"discount": Counts(1000, 250), "control": Counts(1000, 200)}, "control")
    assert (treated.variant, treated.control, control.control) == ("discount", False, True)
    assert treated.rate == 0.25 and control.rate == 0.2
    assert treated.uplift == pytest.approx(0.05) and treated.relative_uplift == pytest.approx(0.25)
    # Reference: the pooled two-proportion z-test (e.g. statsmodels' proportions_ztest) gives these.
    assert treated.z == pytest.approx(2.6774, abs=1e-4)
    assert treated.p_value == pytest.approx(0.007419, abs=1e-5)
    assert treated.reliable
    assert control.uplift is None and control.p_value is None


def test_no_difference_is_not_significant_and_small_samples_are_flagged() -> None:
    (same, _) = experiment({"a": Counts(500, 50), "c": Counts(500, 50)}, "c")
    assert same.uplift == 0.0 and same.z == 0.0 and same.p_value == pytest.approx(1.0)
    (small, _) = experiment({"a": Counts(10, 3), "c": Counts(10, 1)}, "c")
    assert small.p_value is not None and not small.reliable


def test_undefined_figures_are_none_not_invented() -> None:
    (empty, _) = experiment({"a": Counts(0, 0), "c": Counts(10, 2)}, "c")
    assert empty.rate is None and empty.uplift is None and empty.p_value is None
    (all_convert, _) = experiment({"a": Counts(10, 10), "c": Counts(10, 10)}, "c")
    assert all_convert.uplift == 0.0 and all_convert.p_value is None
    (zero_base, _) = experiment({"a": Counts(10, 2), "c": Counts(10, 0)}, "c")
    assert zero_base.uplift == 0.2 and zero_base.relative_uplift is None
    assert [s.uplift for s in experiment({"a": Counts(10, 1), "b": Counts(10, 2)}, None)] == [None, None]
    with pytest.raises(ValueError):
        Counts(5, 6)


@given(n1=st.integers(1, 10_000), n2=st.integers(1, 10_000), data=st.data())
def test_the_p_value_is_a_probability_and_symmetric(n1: int, n2: int, data: st.DataObject) -> None:
    a = Counts(n1, data.draw(st.integers(0, n1)))
    b = Counts(n2, data.draw(st.integers(0, n2)))
    forward, backward = z_test(a, b), z_test(b, a)
    if forward is None:
        assert backward is None
        return
    assert 0.0 <= forward[1] <= 1.0
    assert forward[0] == pytest.approx(-backward[0]) and forward[1] == pytest.approx(backward[1])


def test_counts_come_from_the_instances_commands_per_split() -> None:
    journey = parse_journey(
        {
            "id": "j",
            "entry": {"api": True},
            "goal": {"event": "Paid", "within": "7d"},
            "nodes": [
                {
                    "id": "s",
                    "type": "split",
                    "variants": [{"name": "a", "weight": 1, "next": "x"}, {"name": "c", "weight": 1, "control": True}],
                },
                {"id": "x", "type": "exit"},
            ],
        }
    )
    counts: dict = {}
    expected = {"a": Counts(), "c": Counts()}
    for n in range(400):
        view = PersonView(f"person-{n}")
        instance, commands = step(new_instance(journey, view.person_id, "t"), journey, Enter(), view, 0.0)
        tally(commands, counts)
        variant = instance.variants["s"]
        # Variant a converts every other person, the control every fourth.
        converts = n % 2 == 0 if variant == "a" else n % 4 == 0
        expected[variant] = Counts(expected[variant].entries + 1, expected[variant].conversions + converts)
        if converts:
            _, commands = step(instance, journey, EventArrived(Event(f"e{n}", "Paid", 10.0)), view, 10.0)
            tally(commands, counts)
    treated, control = split_stats(journey, counts)["s"]
    assert (treated.variant, control.variant, control.control) == ("a", "c", True)
    assert (treated.entries, treated.conversions) == (expected["a"].entries, expected["a"].conversions)
    assert (control.entries, control.conversions) == (expected["c"].entries, expected["c"].conversions)
    assert treated.entries + control.entries == 400 and treated.uplift > 0


def test_a_split_nobody_reached_yet_reads_as_zeros() -> None:
    journey = parse_journey(
        {
            "id": "j",
            "entry": {"api": True},
            "nodes": [
                {
                    "id": "s",
                    "type": "split",
                    "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
                }
            ],
        }
    )
    stats = split_stats(journey, {})["s"]
    assert [(v.variant, v.entries, v.rate, v.uplift) for v in stats] == [("a", 0, None, None), ("b", 0, None, None)]
