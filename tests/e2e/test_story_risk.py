"""Risk: four new accounts, one phone, one IP, one card, within minutes - a hold and a case for each,
seconds after the orders, under the platform's default identity rules.

A fraud ring opens four accounts from the same phone (one device id, one IP address) and places a
$900 order from each with the same card, issued in another country than the one they order from.

1. Identity keeps the accounts apart - its default rules allow one user id per person, so they are four
   persons - and tells each resolved event how many OTHER persons it saw on the event's device in the
   last day (`ResolvedEvent.shared_with`, counts only): the phone's first account is alone on it when it
   orders; the second sees one other, the third two, the fourth three. When an account joins the phone,
   identity also tells the accounts already on it, with an "Identifier Shared" event of their own
   (counts only): the first account is told of the second, third and fourth. (Identity quarantines the
   phone once three persons have used it: it links nobody any more, and it is still counted.)
2. Each account's profile keeps the most it saw in a day (`computed.shared_device_accounts_24h`, on its
   own events and identity's): three, for every account, beside one sign-up, one order, one card, one
   device. The shipped `fraud_risk` (1.3.0) rises above the fraud team's threshold, THRESHOLD, for every
   account - the first one as soon as identity tells it another account is on its phone - and each
   enters `fraud_review`. The threshold is the one the shipped model's report gives for catching four
   fraudsters in five on held-out customers (`threshold_at_that_recall` in report.json, 0.1998).
3. The journey `fraud-hold` posts a hold to the payments system's webhook (the local receiver) and
   opens a case in Salesforce for the fraud team, on the account's contact, naming the signal.
4. Seen from outside: a hold and a case for each of the four accounts, seconds after the orders (the
   test prints how many); a legitimate new customer who ordered in the same minutes gets neither, and
   no service dead-letters identity's events.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time

import pytest
import yaml
from stories import Story, drained, eventually, kind, sourced, start_platform

from cdp_testing.fuzz import dead_letters

THRESHOLD = 0.2

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
                "subject": "Fraud review: {{ computed.shared_device_accounts_24h | int }} other accounts on this device",
                "body": (
                    "fraud_risk: {{ '%.2f' | format(scores.fraud_risk) }}\n"
                    "other accounts on this device in 24 h: {{ computed.shared_device_accounts_24h | int }}\n"
                    "orders in 24 h: {{ computed.orders_24h | int }}\n"
                    "cards in 24 h: {{ computed.cards_24h | int }}\n"
                    "card country not where they order: {{ computed.geo_mismatch_24h | int }}"
                ),
            },
        },
    ],
}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("risk")
    platform = start_platform(workdir)  # the default identity rules: one user id per person
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


def shared_on_device(profile) -> int:
    trait = profile.computed.get("shared_device_accounts_24h")
    return int(trait.number_value) if trait is not None and trait.HasField("number_value") else 0


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

    # Holds reach the payments system seconds after the orders: one for every account of the ring.
    def at_least(count: int, read):
        return lambda: found if len(found := read()) >= count else None

    holds = eventually(at_least(4, story.webhooks), timeout=30, every=0.05)
    print(f"\nlast order -> fourth hold webhook: {holds[3]['received_at'] - last_order:.2f} s")

    # Four accounts, four persons; each profile says how many other accounts used the phone in a day -
    # the three others, for each: the later accounts on their own events, the earlier ones from identity's
    # "Identifier Shared" events, one for each account that joined them on the phone.
    profiles = {
        user: story.wait_profile(
            user, lambda p: p.computed.get("orders_24h") and "fraud_risk" in p.scores and shared_on_device(p) == 3
        )
        for user in ring
    }
    persons = {user: profile.person_id for user, profile in profiles.items()}
    assert len(set(persons.values())) == 4, "the default rules keep the accounts apart"
    told = {user: [e for e in story.timeline(persons[user]) if e.name == "Identifier Shared"] for user in ring}
    print("identity told: " + ", ".join(f"{u} {len(told[u])}" for u in ring))
    # The phone's first account is told of three accounts, the second of two, the third of one, the last of
    # none (which account is first is up to the order identity applies them in).
    assert sorted(len(events) for events in told.values()) == [0, 1, 2, 3]
    for user, profile in profiles.items():
        counts = {k: int(profile.computed[k].number_value) for k in ("accounts_24h", "orders_24h", "cards_24h")}
        assert counts == {"accounts_24h": 1, "orders_24h": 1, "cards_24h": 1}, user
        risk = profile.scores["fraud_risk"].value
        assert risk > THRESHOLD, f"{user}: fraud_risk {risk:.3f}, told of {len(told[user])} accounts"
    print("fraud_risk: " + ", ".join(f"{u} {profiles[u].scores['fraud_risk'].value:.3f}" for u in ring))
    first = next(user for user in ring if len(told[user]) == 3)

    # One hold per account, naming it: the phone's first account too.
    holds = story.webhooks()
    assert sorted(h["json"]["person_id"] for h in holds) == sorted(persons.values())
    assert {h["json"]["subject"] for h in holds} == {"HOLD"}

    # The fraud team's cases in Salesforce, one per account, on its contact, naming the signal.
    def cases():
        return [
            c for c in story.soql("SELECT Id, Subject, Description, ContactId FROM Case") if "Fraud" in c["Subject"]
        ]

    found = eventually(at_least(len(ring), cases), timeout=30)
    assert len(found) == len(ring)
    for user in ring:
        (contact,) = story.soql(f"SELECT Id FROM Contact WHERE CDP_Id__c = '{persons[user]}'")
        (case,) = [c for c in found if c["ContactId"] == contact["Id"]]
        # What was known the moment the risk crossed its threshold: at least one other account.
        seen = int(re.fullmatch(r"Fraud review: (\d) other accounts on this device", case["Subject"]).group(1))
        assert 1 <= seen <= 3, case["Subject"]
        assert f"other accounts on this device in 24 h: {seen}" in case["Description"]
        assert (
            "orders in 24 h: 1" in case["Description"] and "card country not where they order: 1" in case["Description"]
        )
        assert sorted((d.channel, kind(d)) for d in story.decisions(persons[user], "fraud-hold")) == [
            ("crm", "sent"),
            ("webhook", "sent"),
        ]
    print(f"the phone's first account ({first}) was held too")

    # Nina is a customer like any other: low risk, no hold, no case, nothing from identity.
    nina = story.profile("nina")
    print(f"Nina's fraud_risk: {nina.scores['fraud_risk'].value:.4f}")
    assert shared_on_device(nina) == 0
    assert [e for e in story.timeline(nina.person_id) if e.name == "Identifier Shared"] == []
    assert nina.scores["fraud_risk"].value < THRESHOLD and nina.person_id not in story.members("fraud_review")
    assert story.decisions(nina.person_id, "fraud-hold") == []
    # Whatever orchestration was to send is sent, and the connector has read every action sourced to it.
    story.orchestration_caught_up()
    eventually(lambda: sourced(story.platform, "CRM"), 30)
    eventually(lambda: drained(story.platform, "CRM", r"crm-p\d+"), 30)
    assert len(story.webhooks()) == len(ring) and len(cases()) == len(ring)
    # Every service read identity's events: none of them was dead-lettered.
    assert asyncio.run(dead_letters(story.platform.nats_url, b"Identifier Shared")) == []
