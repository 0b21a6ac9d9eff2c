"""The `profiles.changed` messages: every kind of value a change holds arrives as what it is, a decision or
score that left with a split is absent, an empty change is not published, and the same changes give the
same message id."""

from __future__ import annotations

from google.protobuf import json_format

from cdp.profile.v1 import profile_pb2
from cdp_profile.changes import change_messages
from cdp_profile.domain import ProfileChange


def published(changes: dict[str, ProfileChange]) -> list[profile_pb2.ProfileChanged]:
    messages = change_messages(changes, cause="event", now=1_790_000_000.0, partition_of=lambda person: 0)
    return [c for m in messages for c in profile_pb2.ProfileChangedBatch.FromString(m.payload).changes]


def test_every_kind_of_value_arrives_as_it_is():
    change = ProfileChange("p1")
    change.computed.update(
        {
            "orders": 3,
            "aov": 12.5,
            "big": 2**60,
            "vip": True,
            "channel": "email",
            "skus": ["a", "b"],
            "by_day": {"mon": 1},
            "gone": None,
        }
    )
    change.traits["plan"] = "pro"
    change.consent.update({"purpose:Marketing": False, "channel:email": None})
    change.scores.update({"churn": 0.25, "clv": None})
    change.event_ids.append("web:1")
    (message,) = published({"p1": change, "p2": ProfileChange("p2")})
    computed = {name: json_format.MessageToDict(value) for name, value in message.computed.items()}
    assert computed == {
        "orders": 3,
        "aov": 12.5,
        "big": float(2**60),
        "vip": True,
        "channel": "email",
        "skus": ["a", "b"],
        "by_day": {"mon": 1},
        "gone": None,
    }
    assert message.computed["vip"].WhichOneof("kind") == "bool_value"
    assert message.computed["orders"].WhichOneof("kind") == "number_value"
    assert json_format.MessageToDict(message.traits["plan"]) == "pro"
    assert dict(message.consent) == {"purpose:Marketing": False}
    assert dict(message.scores) == {"churn": 0.25}
    assert list(message.event_ids) == ["web:1"]
    assert (message.person_id, message.cause) == ("p1", "event")


def test_the_same_changes_give_the_same_message_id():
    def changes() -> dict[str, ProfileChange]:
        change = ProfileChange("p1")
        change.computed["orders"] = 3
        change.scores["churn"] = 0.5
        return {"p1": change}

    first = change_messages(changes(), cause="score", now=1.0, partition_of=lambda person: 3)
    again = change_messages(changes(), cause="score", now=1.0, partition_of=lambda person: 3)
    assert [(m.subject, m.msg_id, m.payload) for m in first] == [(m.subject, m.msg_id, m.payload) for m in again]
    assert first[0].subject == "profiles.changed.3"
