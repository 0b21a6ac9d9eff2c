"""`decode_scores` gives each person its own row of a batch's values, whatever the number of scores a model
has (one, or several taken `width` at a time)."""

from __future__ import annotations

from cdp.scoring.v1 import scoring_pb2
from cdp_profile.apply import decode_scores
from cdp_testing.fakes import Delivery


def test_each_person_gets_its_own_row_of_values_for_models_of_one_and_of_three_scores():
    message = scoring_pb2.ScoresUpdatedBatch(
        model="churn",
        version="1",
        scores=["churn"],
        person_ids=["p1", "p2", "p3"],
        values=[0.1, 0.2, 0.3],
        at_ms=[1000, 2000, 3000],
    )
    message.more.add(
        model="clv",
        version="2",
        scores=["a", "b", "c"],
        person_ids=["p1", "p2", "p3"],
        values=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        at_ms=[1000, 2000, 3000],
    )
    churn, clv = decode_scores(Delivery(message.SerializeToString(), "scores.updated.0", 1))
    assert churn.values == [{"churn": 0.1}, {"churn": 0.2}, {"churn": 0.3}]
    assert clv.values == [
        {"a": 1.0, "b": 2.0, "c": 3.0},
        {"a": 4.0, "b": 5.0, "c": 6.0},
        {"a": 7.0, "b": 8.0, "c": 9.0},
    ]
    assert clv.persons == ["p1", "p2", "p3"] and clv.at == [1.0, 2.0, 3.0]
