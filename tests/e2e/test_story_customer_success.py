"""Customer success: a customer drifts away, a success manager is told, and her answer comes back.

Grace has used the shop for two months, five sessions a day, and bought now and then. In the last week
her daily activity drops by 40 % (three sessions a day) and she opens support ticket after ticket. Henry,
her twin in every other way, carries on as before.

1. Scoring rescores both as the events arrive (the shipped `churn_risk` model); Grace's risk rises
   above the threshold the operator set, Henry's does not.
2. The "at risk" segment (risk above the threshold, three tickets or more in a month) takes Grace in.
3. A journey entered from that segment opens a Service Cloud case in Salesforce for a success manager:
   on Grace's contact, the subject naming her, the description carrying her top signals.
4. The manager works the case and closes it in Salesforce; the connector reads the change back and
   `CRM Case Closed` lands on Grace's profile, with the case's status.

The threshold is the operator's, fixed in advance: a churn risk above 0.5, more likely than not to have
lapsed a month from now (the shipped `churn_risk` is the probability of no activity at all in the 60 days
after the next 30). On the simulated held-out customers it flags about 1 % of those active in the last
week, two thirds of whom lapse. Grace's drop with her tickets puts her above it; the drop alone, or
Henry's steady use, does not.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from stories import Story, days_ago, eventually, iso, kind, start_platform

PAGES = ("Home", "Catalog", "Product", "Search", "Account")
HISTORY_DAYS = 60
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    platform = start_platform(tmp_path_factory.mktemp("customer-success"))
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


def two_months(user: str, first_name: str, *, drop: bool) -> list[dict]:
    """Sign-up, sessions every day (five a day; three in the last week when `drop`), three orders."""
    events: list[dict] = [
        {"type": "identify", "userId": user, "timestamp": iso(days_ago(HISTORY_DAYS + 30)),
         "traits": {"email": f"{user}@example.com", "first_name": first_name, "last_name": "Hopper", "plan": "pro"}},
        {"type": "track", "userId": user, "event": "Signed Up", "timestamp": iso(days_ago(HISTORY_DAYS + 30))},
    ]  # fmt: skip
    for day in range(HISTORY_DAYS, 0, -1):
        per_day = 3 if drop and day <= 7 else 5
        events += [
            {"type": "page", "userId": user, "name": PAGES[k], "timestamp": iso(days_ago(day, hour=9 + k))}
            for k in range(per_day)
        ]
    events += [
        {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": 80},
         "timestamp": iso(days_ago(day))}
        for day in (75, 45, 15)
    ]  # fmt: skip
    return events


def connections_with_cases(story: Story) -> dict:
    """The dev connections, plus what this team configures in Salesforce: a case for each `case` action of
    a journey, on the person's contact."""
    document = yaml.safe_load((story.platform.home / "crm" / "connections.yaml").read_text())
    document = copy.deepcopy(document)
    salesforce = next(c for c in document["connections"] if c["id"] == "salesforce")
    salesforce["mappings"].append(
        {
            "id": "success-case",
            "object": "Case",
            "action": "case",
            "idempotency_field": "CDP_Idempotency_Key__c",
            "about": {"mapping": "contacts", "field": "ContactId"},
            "fields": {
                "Subject": "action.subject",
                "Description": "action.body",
                "Priority": {"value": "High"},
                "Origin": {"value": "Web"},
            },
        }
    )
    return document


AT_RISK_JOURNEY = {
    "id": "save-at-risk",
    "version": 1,
    "name": "A success manager calls customers at risk",
    "priority": 80,
    "category": "service",
    "timezone": "UTC",
    "entry": {"segment": "at_risk", "on": "entered"},
    "reentry": {"cooldown": "30d"},
    "nodes": [
        {
            "id": "open-case",
            "type": "action",
            "channel": "crm",
            # Service work, not marketing: the customer's consent purpose for it is the contract itself.
            "purpose": "Service",
            "category": "transactional",
            "template": {
                "kind": "case",
                "subject": "Churn risk: {{ traits.first_name }} {{ traits.last_name }}",
                "body": (
                    "Top signals\n"
                    "churn_risk: {{ '%.3f' | format(scores.churn_risk) }}\n"
                    "support tickets (90 days): {{ computed.tickets_90d | int }}\n"
                    "sessions last 7 days: {{ computed.sessions_7d | int }} (last 30 days: {{ computed.sessions_30d | int }})\n"
                    "plan: {{ traits.plan }}"
                ),
            },
        }
    ],
}


@pytest.mark.timeout(300)
def test_a_customer_drifting_away_gets_a_success_manager_whose_outcome_comes_back(story: Story):
    # The connector learns to open cases in Salesforce (the operator's connections document).
    story.configure_crm(connections_with_cases(story))

    # Two months of history for Grace (whose last week is 40 % quieter) and for Henry (steady).
    story.send_many(two_months("grace", "Grace", drop=True))
    story.send_many(two_months("henry", "Henry", drop=False))
    sessions = {"grace": 5 * (HISTORY_DAYS - 7) + 3 * 7, "henry": 5 * HISTORY_DAYS}
    for user in ("grace", "henry"):
        story.wait_profile(user, lambda p, u=user: p.computed["sessions_90d"].number_value == sessions[u], timeout=60)
    grace_id, henry_id = story.person_id("grace"), story.person_id("henry")
    # Scores settle once the last change is scored.
    story.wait_profile("henry", lambda p: "churn_risk" in p.scores)
    story.wait_profile("grace", lambda p: "churn_risk" in p.scores)
    story.wait_scored()
    healthy, quieter = (story.profile(user).scores["churn_risk"].value for user in ("henry", "grace"))
    threshold = THRESHOLD
    assert healthy < threshold and quieter < threshold, "a quieter week alone is not a verdict"

    # The operator: "at risk" is a risk above the threshold and tickets piling up; the journey opens a case.
    story.create_segment(
        "at_risk",
        f'scores.churn_risk > {threshold} and count(event = "Support Ticket Opened", within 30d) >= 3',
        name="At risk of churning",
    )
    story.publish_journey(AT_RISK_JOURNEY)
    assert grace_id not in story.members("at_risk"), "no tickets yet: Grace is not at risk"

    # Grace's support tickets pile up over her quiet week.
    story.send(
        *[
            {"type": "track", "userId": "grace", "event": "Support Ticket Opened",
             "properties": {"subject": subject}, "timestamp": iso(days_ago(day, hour=15))}
            for day, subject in ((5, "Export fails"), (3, "Export fails again"), (1, "Slow dashboard"), (0, "Refund?"))
        ]
    )  # fmt: skip

    # Her churn risk crosses the threshold and she is in the segment; Henry is not.
    grace = story.wait_profile("grace", lambda p: p.scores["churn_risk"].value > threshold, timeout=30)
    eventually(lambda: grace_id in story.members("at_risk"), timeout=30)
    assert story.profile("henry").scores["churn_risk"].value <= threshold
    print(
        f"\nchurn_risk: Henry {healthy:.4f}, Grace after her quieter week {quieter:.4f}, "
        f"threshold {threshold}, Grace with her tickets {grace.scores['churn_risk'].value:.4f}"
    )
    assert henry_id not in story.members("at_risk")

    # The success manager's view: one case in Salesforce, on Grace's contact, with her top signals.
    def grace_case():
        cases = story.soql(
            "SELECT Id, Subject, Description, Priority, Status, ContactId, CDP_Idempotency_Key__c FROM Case"
        )
        return [c for c in cases if c["Subject"] == "Churn risk: Grace Hopper"]

    (case,) = eventually(grace_case, timeout=30)
    (contact,) = story.soql(f"SELECT Id, Email FROM Contact WHERE CDP_Id__c = '{grace_id}'")
    assert case["ContactId"] == contact["Id"] and contact["Email"] == "grace@example.com"
    assert case["Priority"] == "High" and case["Status"] == "New"
    signals = dict(line.split(": ", 1) for line in case["Description"].splitlines()[1:])
    assert float(signals["churn_risk"]) > threshold
    assert signals["support tickets (90 days)"] == "4"
    computed = story.profile("grace").computed
    sessions_7d, sessions_30d = int(computed["sessions_7d"].number_value), int(computed["sessions_30d"].number_value)
    assert signals["sessions last 7 days"] == f"{sessions_7d} (last 30 days: {sessions_30d})"
    assert sessions_7d / 7 < 0.65 * (sessions_30d - sessions_7d) / 23, "the drop is what the manager reads"
    # The operator's view: the decision says the case was sent, for Grace, by this journey.
    (decision,) = story.decisions(grace_id, "save-at-risk")
    assert (decision.channel, kind(decision)) == ("crm", "sent")
    assert not story.decisions(henry_id, "save-at-risk")

    # The manager calls Grace and closes the case in Salesforce.
    story.salesforce(f"/sobjects/Case/{case['Id']}", {"Status": "Closed"}, method="PATCH")

    # The outcome comes back onto Grace's profile (the connector reads Salesforce every 5 s).
    def closed_on_profile():
        return [e for e in story.timeline(grace_id) if e.name == "CRM Case Closed"]

    (closed,) = eventually(closed_on_profile, timeout=30)
    properties = dict(closed.properties)
    assert properties["crm_id"] == case["Id"] and properties["Status"] == "Closed"
    assert properties["object"] == "Case" and properties["cdp_person_id"] == grace_id
    # Still one case: the connector did not open another for the same action.
    assert len(grace_case()) == 1
    assert grace.person_id == grace_id
