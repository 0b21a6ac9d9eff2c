"""Risk: four new accounts, one phone, one IP, one card, within minutes - a hold and a case seconds
after the last order.

A fraud ring opens four accounts from the same phone (one device id, one IP address) and places a
$900 order from each with the same card, issued in another country than the one they order from.

1. Identity joins the accounts by the device they share: one person, four user ids. This deployment's
   identity rules allow that (`user_id` up to 5 per person, `CDP_IDENTITY_RULES_FILE`): with the
   defaults (one user id per person) the accounts stay four strangers, and the shipped `fraud_risk`
   model, whose strongest signal is "accounts that joined this person in a day", scores each one as
   an ordinary new customer (about 0.002; see docs/stories.md).
2. The profile counts four sign-ups, four orders, one card, one device in 24 hours; `fraud_risk`
   rises above the fraud team's threshold, 0.25, and the person enters `fraud_review`. The threshold is
   the one the shipped model's report gives for catching four fraudsters in five on held-out customers
   (`threshold_at_that_recall` in report.json: 0.2514, at a precision of 0.78).
3. The journey `fraud-hold` posts a hold to the payments system's webhook (the local receiver) and
   opens a case in Salesforce for the fraud team, on the person's contact, with the signals.
4. Seen from outside: one hold naming the person, a few seconds after the last order (the test prints
   how many), and one case; a legitimate new customer who ordered in the same minutes gets neither.
"""

from __future__ import annotations

import copy
import json
import re
import time

import pytest
import yaml
from stories import Story, eventually, kind, start_platform

IDENTITY_RULES = {
    "types": [
        {"name": "user_id", "limit": 5, "paths": ["user_id"]},
        {"name": "email", "normalize": "email", "limit": 5, "paths": ["traits.email", "context.traits.email"]},
        {"name": "device_id", "limit": 20, "paths": ["context.device.id"]},
        {"name": "anonymous_id", "quarantine_after": 5, "paths": ["anonymous_id"]},
    ]
}

THRESHOLD = 0.25

JOURNEY = {
    "id": "fraud-hold",
    "version": 1,
    "name": "Hold orders of likely fraud and open a case",
    "priority": 100,
    "category": "transactional",
    "timezone": "UTC",
    "entry": {"segment": "fraud_review", "on": "entered"},
    "reentry": "never",
    "nodes": [
        {
            "id": "hold",
            "type": "action",
            "channel": "webhook",
            "purpose": "Fraud prevention",
            "next": "case",
            "template": {
                "subject": "HOLD",
                "body": "Hold every open order of this customer: fraud_risk {{ '%.2f' | format(scores.fraud_risk) }}",
            },
        },
        {
            "id": "case",
            "type": "action",
            "channel": "crm",
            "purpose": "Fraud prevention",
            "template": {
                "kind": "case",
                "subject": "Fraud review: {{ computed.accounts_24h | int }} accounts on one device",
                "body": (
                    "fraud_risk: {{ '%.2f' | format(scores.fraud_risk) }}\n"
                    "accounts in 24 h: {{ computed.accounts_24h | int }}\n"
                    "orders in 24 h: {{ computed.orders_24h | int }}\n"
                    "cards in 24 h: {{ computed.cards_24h | int }}\n"
                    "devices in 24 h: {{ computed.devices_24h | int }}"
                ),
            },
        },
    ],
}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("risk")
    rules = workdir / "identity-rules.json"
    rules.write_text(json.dumps(IDENTITY_RULES))
    platform = start_platform(workdir, env={"CDP_IDENTITY_RULES_FILE": str(rules)})
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


def connections_with_cases(story: Story) -> dict:
    document = copy.deepcopy(yaml.safe_load((story.platform.home / "crm" / "connections.yaml").read_text()))
    salesforce = next(c for c in document["connections"] if c["id"] == "salesforce")
    salesforce["mappings"].append(
        {
            "id": "fraud-case",
            "object": "Case",
            "action": "case",
            "idempotency_field": "CDP_Idempotency_Key__c",
            "about": {"mapping": "contacts", "field": "ContactId"},
            "fields": {"Subject": "action.subject", "Description": "action.body", "Priority": {"value": "High"}},
        }
    )
    return document


def new_account(user: str, *, device: str, ip: str, card: str, card_country: str, country: str) -> list[dict]:
    context = {"device": {"id": device, "type": "android"}, "ip": ip, "location": {"country": country}}
    return [
        {"type": "identify", "userId": user, "context": context,
         "traits": {"email": f"{user}@example.net", "first_name": user.title(), "last_name": "Account"}},
        {"type": "track", "userId": user, "event": "Signed Up", "context": context},
        {"type": "track", "userId": user, "event": "Product Viewed", "context": context,
         "properties": {"product_id": "gift-card-500"}},
        {"type": "track", "userId": user, "event": "Order Completed", "context": context,
         "properties": {"total": 900, "card_fingerprint": card, "card_country": card_country}},
    ]  # fmt: skip


@pytest.mark.timeout(300)
def test_accounts_sharing_a_device_ip_and_card_are_held_and_get_a_case_within_seconds(story: Story):
    story.configure_crm(connections_with_cases(story))
    story.create_segment("fraud_review", f"scores.fraud_risk > {THRESHOLD}", name="Orders to review for fraud")
    story.publish_journey(JOURNEY)

    # A real new customer orders in the same minutes, from her own phone and card.
    story.send(*new_account("nina", device="nina-phone", ip="198.51.100.23", card="card-nina",
                            card_country="US", country="US"))  # fmt: skip
    # The ring: four accounts, one phone, one IP, one card from abroad, a minute apart (sent at once here).
    ring = [f"ring-{k}" for k in range(4)]
    for user in ring:
        story.send(*new_account(user, device="ring-phone", ip="203.0.113.7", card="card-777",
                                card_country="NG", country="US"))  # fmt: skip
    last_order = time.time()

    # The hold reaches the payments system seconds after the last order.
    (hold,) = eventually(story.webhooks, timeout=30, every=0.05)
    print(f"\nlast order -> hold webhook: {hold['received_at'] - last_order:.2f} s")
    person = story.person_id("ring-0")
    assert {story.person_id(user) for user in ring} == {person}, "identity joined the accounts by their device"
    assert hold["json"]["person_id"] == person and hold["json"]["subject"] == "HOLD"
    profile = story.profile("ring-3")
    assert profile.scores["fraud_risk"].value > THRESHOLD
    assert {k: int(profile.computed[k].number_value) for k in ("accounts_24h", "orders_24h", "cards_24h")} == {
        "accounts_24h": 4,
        "orders_24h": 4,
        "cards_24h": 1,
    }

    # The fraud team's case in Salesforce, on the person's contact, with the signals.
    def cases():
        return [
            c for c in story.soql("SELECT Id, Subject, Description, ContactId FROM Case") if "Fraud" in c["Subject"]
        ]

    (case,) = eventually(cases, timeout=30)
    # The case says what was known the moment the risk crossed its threshold. The ring's accounts arrive
    # together, so which order tipped it (the third's or the fourth's, in the runs seen) is up to how the
    # services batch them; it is always several accounts on the one phone, and one case, not one per order.
    seen = int(re.fullmatch(r"Fraud review: (\d) accounts on one device", case["Subject"]).group(1))
    assert 2 <= seen <= 4, case["Subject"]
    assert f"orders in 24 h: {seen}" in case["Description"] and "cards in 24 h: 1" in case["Description"]
    (contact,) = story.soql(f"SELECT Id FROM Contact WHERE CDP_Id__c = '{person}'")
    assert case["ContactId"] == contact["Id"]
    assert sorted((d.channel, kind(d)) for d in story.decisions(person, "fraud-hold")) == [
        ("crm", "sent"),
        ("webhook", "sent"),
    ]

    # Nina is a customer like any other: low risk, no hold, no case.
    nina = story.profile("nina")
    print(f"fraud_risk: the ring {profile.scores['fraud_risk'].value:.3f}, Nina {nina.scores['fraud_risk'].value:.4f}")
    assert nina.scores["fraud_risk"].value < THRESHOLD and nina.person_id not in story.members("fraud_review")
    time.sleep(2)
    assert len(story.webhooks()) == 1 and len(cases()) == 1
    assert story.decisions(nina.person_id, "fraud-hold") == []
