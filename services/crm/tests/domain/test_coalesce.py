"""Coalescing: one write per record per batch, at each field's latest value; keys stable across restarts."""

from __future__ import annotations

from cdp_crm.domain.coalesce import REMOVE, Change, Coalescer, record_key, task_key

KEY = (("cdp_id", "person-1"),)


def test_changes_to_one_record_become_one_write_with_the_latest_values_in_any_arrival_order():
    batch = Coalescer()
    batch.add(Change("hs/contacts", KEY, {"firstname": "Ada", "cdp_churn_risk": 0.5}, stamp=1))
    batch.add(Change("hs/contacts", KEY, {"cdp_churn_risk": 0.9}, stamp=3))
    batch.add(Change("hs/contacts", KEY, {"cdp_churn_risk": 0.7, "city": "London"}, stamp=2))  # late, older
    batch.add(Change("hs/contacts", (("cdp_id", "person-2"),), {"firstname": "Bo"}, stamp=1))
    assert len(batch) == 2
    first, second = batch.take()
    assert first.fields == {"firstname": "Ada", "cdp_churn_risk": 0.9, "city": "London"} and first.stamp == 3
    assert second.fields == {"firstname": "Bo"}
    assert len(batch) == 0


def test_the_latest_operation_wins_entered_then_exited_is_one_removal():
    batch = Coalescer()
    batch.add(Change("hs/vip", KEY, {}, stamp=1))
    batch.add(Change("hs/vip", KEY, {}, stamp=2, op=REMOVE))
    (only,) = batch.take()
    assert only.op == REMOVE


def test_take_respects_the_limit_and_the_mapping():
    batch = Coalescer()
    for i in range(5):
        batch.add(Change("hs/contacts", (("cdp_id", f"p{i}"),), {"n": i}))
    batch.add(Change("hs/tasks", (("cdp_idempotency_key", "k"),), {}))
    assert [c.fields["n"] for c in batch.take(2, mapping="hs/contacts")] == [0, 1]
    assert batch.mappings() == ["hs/contacts", "hs/tasks"]
    assert len(batch.take(mapping="hs/contacts")) == 3 and len(batch) == 1


def test_keys_are_stable_hashes_that_do_not_carry_the_identifier():
    assert task_key("hs", "churn-task", "act-1") == task_key("hs", "churn-task", "act-1")
    assert task_key("hs", "churn-task", "act-1") != task_key("hs", "churn-task", "act-2")
    assert task_key("hs", "churn-task", "act-1") != task_key("hs", "churn-tas", "kact-1")
    assert task_key("hs", "churn-task", "act-1").startswith("cdp-") and len(task_key("a", "b", "c")) == 36
    email_key = (("email", "Ada@Example.com"),)
    assert record_key("hs/contacts", email_key) == record_key("hs/contacts", (("email", "ada@example.com"),))
    assert "ada" not in record_key("hs/contacts", email_key)
    assert record_key("hs/contacts", email_key) != record_key("sf/contacts", email_key)
