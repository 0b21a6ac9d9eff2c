"""Outcome events: what each kind of provider feedback becomes on its way back in through the collector."""

from __future__ import annotations

from datetime import UTC, datetime

from cdp_orchestration.channels.base import Action, Content, Outcome
from cdp_orchestration.channels.outcomes import (
    EVENT_NAMES,
    Feedback,
    feedback_from_bounce,
    feedback_from_outcome,
    track_event,
)

ACTION = Action("act-1", "person-1", "sms", Content(body="Hi"), "+14155550199", attributes={"journey_id": "j-1"})


def test_a_send_outcome_becomes_sent_bounced_or_failed_and_retryable_failures_wait_for_the_last_try():
    assert feedback_from_outcome(ACTION, Outcome.accepted("SM1")) == Feedback("act-1", "sent", "sms", provider_id="SM1")
    assert feedback_from_outcome(ACTION, Outcome.rejected("twilio_21610")).outcome == "bounced"
    assert feedback_from_outcome(ACTION, Outcome.failed("twilio_20003", retryable=False)).outcome == "failed"
    assert feedback_from_outcome(ACTION, Outcome.failed("http_503", retryable=True), final=False) is None
    assert feedback_from_outcome(ACTION, Outcome.failed("http_503", retryable=True)).reason == "http_503"


def test_the_track_event_carries_the_action_and_a_message_id_that_makes_repeats_land_once():
    at = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    sent = track_event(
        Feedback("act-1", "sent", "sms", provider_id="SM1", at=at),
        person_id="person-1",
        user_id="u-42",
        attributes={"journey_id": "j-1"},
    )
    assert sent == {
        "type": "track",
        "event": "Message Sent",
        "messageId": "outcome:act-1:sent",
        "timestamp": "2026-12-04T10:00:00+00:00",
        "userId": "u-42",
        "properties": {
            "journey_id": "j-1",
            "action_id": "act-1",
            "channel": "sms",
            "person_id": "person-1",
            "provider_id": "SM1",
        },
        "context": {"library": {"name": "cdp-orchestration", "version": "1"}},
    }
    first = track_event(Feedback("act-1", "clicked", "email", occurrence="https://shop/a"), person_id="person-1")
    second = track_event(Feedback("act-1", "clicked", "email", occurrence="https://shop/b"), person_id="person-1")
    assert first["messageId"] != second["messageId"] and first["event"] == "Message Clicked"
    # The journey's attributes cannot overwrite what identifies the outcome.
    forged = track_event(Feedback("act-1", "sent", "sms"), person_id="p", attributes={"action_id": "other"})
    assert forged["properties"]["action_id"] == "act-1"


def test_every_outcome_has_a_documented_event_name():
    import cdp_orchestration.channels as channels

    for name in EVENT_NAMES.values():
        assert f"``{name}``" in channels.__doc__


def test_mail_that_is_not_a_delivery_report_is_not_a_bounce():
    plain = b"From: a@b.c\r\nTo: d@e.f\r\nSubject: out of office\r\nMessage-ID: <act-1@cdp.local>\r\n\r\nAway.\r\n"
    assert feedback_from_bounce(plain) == []
    assert feedback_from_bounce(b"") == []
