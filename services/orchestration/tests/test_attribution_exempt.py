"""A person's first identifier sends an attribution message for each recent send, on its channel's
subject. An exempt (transactional) send is kept without a channel (no cap counts it), and its attribution
went to `actions..<p>`, which no stream takes: the engine retried that publish for ever and the
partition stalled (found while writing test_dispatch_consent, a segment entry landing before the
identify). It is now left out; the others are attributed as before."""

from __future__ import annotations

from cdp_kit.bus import subjects
from cdp_orchestration.actions import attribute_sends
from cdp_orchestration.domain.arbiter import PersonState, Sent
from cdp_orchestration.state import Batch, Person


def test_an_exempt_send_gets_no_attribution_on_a_subject_no_stream_takes():
    person = Person(
        "p-1",
        state=PersonState("p-1", sent=(Sent(1.0, "", "a-exempt"), Sent(2.0, "email", "a-mail"))),
    )
    person.ids["user_id"] = "u-1"
    batch = Batch(partition=0)
    attribute_sends(batch, person)
    assert [(m.subject, m.msg_id) for m in batch.messages] == [(subjects.actions("email", 0), "attribute:a-mail")]
