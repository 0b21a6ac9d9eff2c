"""`cdpctl decisions` says what became of a send the arbiter let through: an email its channel refused
(a subject with a line break, an address the relay refused) read `sent`, as if it had gone out (second
security trial)."""

from __future__ import annotations

from cdpctl.journeys_render import show_decisions


def test_a_send_the_channel_refused_reads_refused_with_its_reason_and_one_it_took_reads_accepted(capsys):
    documents = [
        {
            "kind": "DECISION_KIND_SENT", "channel": "email", "actionId": "a-2", "journeyId": "cart",
            "decidedAt": "2026-12-06T05:00:00Z", "delivery": "rejected", "deliveryReason": "invalid_message",
        },
        {
            "kind": "DECISION_KIND_SENT", "channel": "inapp", "actionId": "a-1", "journeyId": "cart",
            "decidedAt": "2026-12-06T04:59:00Z", "delivery": "accepted",
        },
    ]  # fmt: skip
    show_decisions("p_ada", documents, filtered=False)
    shown = capsys.readouterr().out
    refused = next(line for line in shown.splitlines() if "a-2" in line)
    assert "sent: rejected" in refused and "invalid_message" in refused
    took = next(line for line in shown.splitlines() if "a-1" in line)
    assert "sent: accepted" in took
