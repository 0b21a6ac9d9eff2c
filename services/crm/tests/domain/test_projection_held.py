"""The stream and a backfill agree on who holds none of a mapping's values: the stream marks such a
projection (`marked`, through `holds_any`) and writes it only over a record written before; a backfill
skips the same persons (`touches(mapping, held(source))`, runs.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_crm.domain.mapping import parse_connections
from cdp_crm.domain.projection import Projection, Source, held, holds_any, marked, project, touches

SOURCES = ["traits.email", "traits.first_name", "scores.churn_risk", "computed.orders", "consent.purpose:email"]
SEGMENT_SOURCES = ["segments", "segments.vip", "segments.churned"]


def _mapping(sources: list[str], segment: str | None):
    fields = {f"field_{i}": source for i, source in enumerate(sources)} or {"lifecyclestage": {"value": "customer"}}
    contacts = {"id": "contacts", "object": "contacts", "match": {"cdp_id": "person.id"}, "fields": fields}
    if segment is not None:
        contacts["segment"] = segment
    document = {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "url": "http://hubspot",
                "credentials": {"token": "T"},
                "mappings": [contacts],
            }
        ]
    }
    (connection,) = parse_connections(document)
    return connection.mappings[0]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(SOURCES + SEGMENT_SOURCES), unique=True, max_size=4),
    st.sampled_from([None, "vip", "churned"]),
    st.dictionaries(st.sampled_from([*SOURCES, "traits.other", "segments.vip"]), st.sampled_from([None, "", 0, "x"])),
    st.frozensets(st.sampled_from(["vip", "churned", "other"])),
)
def test_the_stream_marks_as_holding_nothing_exactly_whom_a_backfill_skips(sources, segment, profile, segments):
    mapping = _mapping(sources, segment)
    source = Source("person-1", profile, segments)
    skipped_by_a_backfill = not touches(mapping, held(source))
    assert holds_any(mapping, source) is not skipped_by_a_backfill
    projection = project(mapping, source)
    if isinstance(projection, Projection):
        assert marked(mapping, source, projection).holds is not skipped_by_a_backfill
