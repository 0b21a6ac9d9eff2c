"""Segment JSON events and the per-type rules: the parser judges the common event on the values it built it
from and calls validate_event only when something may be wrong. Whatever it accepts, validate_event must
find nothing wrong with; whatever validate_event refuses, it refuses with validate_event's problems."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest.mock import patch

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_collector.domain import Limits, parse_request, segment, validate_event
from cdp_collector.domain.events import JSON_NAMES

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
# Tight limits, so that values on either side of each one are cheap to draw.
LIMITS = Limits(max_message_id_chars=10, max_id_chars=8, max_event_name_chars=12)
ABSENT = object()

ids = st.sampled_from([ABSENT, None, "", " ", "u", "x" * 8, "x" * 9, "é" * 9, 42, 123456789])
items = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["track", "identify", "alias", "page", "screen", "group"]),
        "messageId": st.sampled_from(
            [ABSENT, None, "", "m-1", " m-1", "m-1\t", "m\n1", "x" * 10, "x" * 11, "a\u00adb", "\u2028m"]
        ),
        "userId": ids,
        "anonymousId": ids,
        "previousId": ids,
        "groupId": ids,
        "event": st.sampled_from([ABSENT, None, "", "  ", "\u3000", "Order", "x" * 12, "x" * 13]),
        "context": st.sampled_from(
            [ABSENT, {}, {"groupId": "x" * 8}, {"groupId": "x" * 9}, {"group_id": 123456789}, {"groupId": 7}]
        ),
    }
).map(lambda item: {key: value for key, value in item.items() if value is not ABSENT})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(items, min_size=1, max_size=4))
def test_the_shortcut_accepts_and_refuses_as_validate_event_does(batch):
    body = orjson.dumps({"batch": batch})
    parsed = parse_request("batch", body, received_at=RECEIVED, source_id="src", limits=LIMITS)
    for index, event in enumerate(parsed.events):
        if event is not None:
            assert validate_event(event, limits=LIMITS, base=f"batch[{index}]", names=JSON_NAMES) == []
    with patch.object(segment, "_plainly_valid", lambda *_: False):  # validate_event on every event
        checked = parse_request("batch", body, received_at=RECEIVED, source_id="src", limits=LIMITS)
    assert parsed.all_errors == checked.all_errors
    assert [event is None for event in parsed.events] == [event is None for event in checked.events]
