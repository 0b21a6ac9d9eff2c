"""A CRM's data as input, under `make up`: what a support agent types in HubSpot and what anyone reaching
the connector's webhook port sends it cannot stop the feedback loop.

1. Ada is identified; the connector writes her contact to the local HubSpot.
2. A support agent opens a ticket whose subject, category and priority are an email thread pasted three
   times over (60,000 emoji each: 240 KB apiece, far past the collector's 32 KB an event and 500 KB a
   request), then an ordinary ticket, then corrects Ada's first name on her contact.
3. Both tickets come back as `CRM Ticket Opened` (the long one cut to fit, naming what was cut), and Ada's
   profile takes the first name the agent wrote, with HubSpot as its source. Before, the long ticket made
   every poll of the connection fail with the collector's 413, for ever: nothing an agent did in HubSpot
   after it reached the CDP again.
4. A caller on the webhook port with a timestamp of 5,000 digits is refused (401) like any stale one; it
   used to get a 500 and leave a traceback in the connector's log.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from stories import Story, eventually, start_platform

HUGE = "\U0001f600" * 60_000


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    platform = start_platform(tmp_path_factory.mktemp("attack2-crm"))
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


def _anonymous(story: Story, record_id: str):
    """The profile of a HubSpot record no contact is linked to (identity keeps it under its CRM id)."""
    return story.profile(f"hubspot:62515:{record_id}", identifier_type="anonymous_id")


@pytest.mark.timeout(300)
def test_a_ticket_too_large_for_an_event_stops_nothing_an_agent_does_after_it(story: Story):
    story.send({"type": "identify", "userId": "ada-a2", "traits": {"email": "ada-a2@example.com", "first_name": "Ada"}})
    ada = story.wait_profile("ada-a2", lambda p: p.person_id).person_id
    contact = eventually(lambda: next((r.crm_id for r in story.crm_record(ada).records
                                       if r.connection_id == "hubspot" and r.crm_id), None), timeout=60)  # fmt: skip

    big = story.hubspot("/_emulator/user/tickets", {"properties": {
        "subject": HUGE, "hs_ticket_category": HUGE, "hs_ticket_priority": HUGE, "hs_pipeline_stage": "1"}})  # fmt: skip
    small = story.hubspot(
        "/_emulator/user/tickets", {"properties": {"subject": "printer on fire", "hs_pipeline_stage": "1"}}
    )
    story.hubspot(f"/crm/v3/objects/contacts/{contact}", {"properties": {"firstname": "Ada-Marie"}}, method="PATCH")

    # The agent's correction reaches Ada's profile, with HubSpot's collector source as its provenance.
    profile = story.wait_profile("ada-a2", lambda p: p.traits["first_name"].value.string_value == "Ada-Marie", 90)
    assert profile.traits["first_name"].provenance.source == "crm"

    def opened(record_id: str):
        try:
            timeline = story.timeline(_anonymous(story, record_id).person_id)
        except grpc.RpcError:  # not resolved to a person yet
            return None
        return next((e for e in timeline if e.name == "CRM Ticket Opened"), None)

    assert eventually(lambda: opened(small["id"]), timeout=60)
    cut = eventually(lambda: opened(big["id"]), timeout=60)
    properties = MessageToDict(cut.properties)
    assert sorted(properties["truncated"]) == ["hs_ticket_category", "hs_ticket_priority", "subject"]
    assert 0 < len(properties["subject"]) <= 1024


def test_a_webhook_timestamp_of_thousands_of_digits_is_refused_not_an_error(story: Story):
    url = story.platform.service("crm")["http"].rstrip("/") + "/webhooks/hubspot/hubspot"
    request = urllib.request.Request(
        url,
        b"[]",
        {"X-HubSpot-Request-Timestamp": "9" * 5000, "X-HubSpot-Signature-v3": "AAAA"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
