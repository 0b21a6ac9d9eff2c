"""What a journey document uses, read here without orchestration's code (journeys.py): the segments it enters
on, is scheduled over or reads, and the computed traits it names anywhere or its event conditions compile to."""

from __future__ import annotations

from cdp_lang import compile_condition
from cdp_segmentation.journeys import journey_reads


def test_every_place_a_journey_document_names_a_segment_or_a_computed_trait_is_read():
    counted = 'count(event = "Order Completed", within 30d) >= 1'
    [generated] = compile_condition(counted).computed_traits
    document = {
        "id": "j",
        "entry": {"event": "Visited", "if": "entry.total > computed.avg_order"},
        "exit": [{"event": "Order Completed"}, {"condition": 'in_segment("churned")'}],
        "nodes": [
            {"id": "wait", "type": "wait", "condition": {"field": "computed.visits_7d", "op": ">", "value": 2}},
            {"id": "b", "type": "branch", "branches": [{"if": counted, "next": None}, {"if": "not in_segment(\"vip\")"}]},
            {"id": "mail", "type": "action", "template": {"body": "{{ computed.last_sku }} is back"},
             "signals": ["computed.tickets_30d"], "rank_by": "scores.conversion"},
        ],
    }  # fmt: skip
    segments, computed = journey_reads(document)
    assert segments == {"churned", "vip"}
    assert computed == {"avg_order", "visits_7d", "last_sku", "tickets_30d", generated["name"]}
    assert journey_reads({"entry": {"segment": "vip", "on": "entered"}}) == ({"vip"}, frozenset())
    assert journey_reads({"entry": {"schedule": {"cron": "0 9 * * 1", "segment": "weekly"}}})[0] == {"weekly"}


def test_a_condition_that_does_not_compile_is_read_by_its_words():
    broken = {"nodes": [{"id": "b", "branches": [{"if": 'in_segment("vip") and computed.orders >'}]}]}
    assert journey_reads(broken) == ({"vip"}, {"orders"})
    # A name inside a longer word is not a field.
    assert journey_reads({"nodes": [{"id": "x", "template": {"body": "precomputed.orders"}}]}) == (
        frozenset(),
        frozenset(),
    )
