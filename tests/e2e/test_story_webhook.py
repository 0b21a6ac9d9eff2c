"""Real-time trigger to an external system: a price drop on a product Ada viewed reaches the team's
Slack channel (a Slack-compatible incoming webhook) about a second later.

1. The marketer defines what the journey reads: each person's products viewed in the last 30 days, a
   profile computed trait (`viewed_skus_30d`, op `unique` of the viewed product's id over 30 days).
2. Ada browses and views the espresso machine (sku-42); Ben's last view of it was months ago; Cy viewed
   a milk frother (sku-7) this week.
3. The shop's catalogue drops the espresso machine's price and tells the CDP for everyone it has some
   reason to (here all three: `Price Dropped` on the person, with the product and both prices).
4. The journey "price-drop-alert" decides who viewed THAT product: it enters on `Price Dropped` if
   `entry.product_id in computed.viewed_skus_30d` (the event's product among the person's recent
   views), and posts the alert through the webhook channel, in Slack's message format
   (`CDP_WEBHOOK_PAYLOAD=slack`), to the local receiver `make up` runs.
5. The receiver holds one message, for Ada, naming the product and the new price; nothing for Ben (no view
   in 30 days) nor for Cy, who viewed a product in the last 30 days, only another one: a condition on
   "any Product Viewed within 30d" would have alerted him. The test prints the time from the collector
   accepting the event to the receiver accepting the post.
"""

from __future__ import annotations

import time

import pytest
from stories import Story, days_ago, eventually, iso, kind, start_platform

from cdp.profile.v1 import profile_pb2

# The products each person viewed in the last 30 days: the link from a price drop to the persons it is for.
VIEWED = profile_pb2.ComputedTraitDefinition(
    name="viewed_skus_30d", op="unique", event_names=["Product Viewed"], property="product_id", window="30d"
)

JOURNEY = {
    "id": "price-drop-alert",
    "version": 1,
    "name": "Price drop on a product someone viewed",
    "priority": 60,
    "category": "alert",
    "timezone": "UTC",
    "entry": {"event": "Price Dropped", "if": "entry.product_id in computed.viewed_skus_30d"},
    "reentry": "always",
    "nodes": [
        {
            "id": "tell-the-team",
            "type": "action",
            "channel": "webhook",
            "purpose": "Marketing",
            "template": {
                "subject": "Price drop for {{ traits.first_name }}",
                "body": (
                    "{{ entry.product_name }} is now ${{ '%.2f' | format(entry.new_price) }}"
                    " (was ${{ '%.2f' | format(entry.old_price) }})"
                ),
            },
        }
    ],
}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    platform = start_platform(tmp_path_factory.mktemp("webhook"), env={"CDP_WEBHOOK_PAYLOAD": "slack"})
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


def viewed(profile: profile_pb2.Profile) -> list[str]:
    """The person's `computed.viewed_skus_30d`, as the journey reads it (none: no view in 30 days)."""
    value = profile.computed.get("viewed_skus_30d")
    return [] if value is None else [item.string_value for item in value.list_value.values]


@pytest.mark.timeout(240)
def test_a_price_drop_on_a_viewed_product_reaches_a_slack_webhook_at_once(story: Story):
    story.profiles.DefineComputedTrait(
        profile_pb2.DefineComputedTraitRequest(definition=VIEWED), metadata=story.metadata, timeout=10
    )
    story.publish_journey(JOURNEY)
    consent = {"consent": {"categoryPreferences": {"Marketing": True}}}
    story.send(
        *({"type": "identify", "userId": user, "traits": {"email": f"{user}@example.com", "first_name": user.title()},
           "context": consent} for user in ("ada", "ben", "cy")),
        {"type": "track", "userId": "ada", "event": "Product Viewed", "timestamp": iso(days_ago(2)),
         "properties": {"product_id": "sku-42", "name": "Espresso machine", "price": 499}},
        {"type": "track", "userId": "ben", "event": "Product Viewed", "timestamp": iso(days_ago(120)),
         "properties": {"product_id": "sku-42", "name": "Espresso machine", "price": 549}},
        {"type": "track", "userId": "cy", "event": "Product Viewed", "timestamp": iso(days_ago(3)),
         "properties": {"product_id": "sku-7", "name": "Milk frother", "price": 89}},
    )  # fmt: skip
    expected = {"ada": ["sku-42"], "ben": [], "cy": ["sku-7"]}
    for user, skus in expected.items():
        story.wait_profile(
            user, lambda p, s=skus: p.event_count >= 2 and "purpose:Marketing" in p.consent and viewed(p) == s
        )
    story.orchestration_caught_up()  # the journey's view of each has their views and consent

    # The catalogue drops the price and tells the CDP about everyone it has some reason to; the journey
    # keeps those who viewed sku-42 in the last 30 days.
    drop = {"product_id": "sku-42", "product_name": "Espresso machine", "old_price": 499, "new_price": 399}
    accepted = time.time()
    story.send(*({"type": "track", "userId": user, "event": "Price Dropped", "properties": drop} for user in expected))
    sent = time.time()

    # The team's channel gets Ada's alert, as Slack reads it: bold subject, then the text.
    (delivery,) = eventually(story.webhooks, timeout=10, every=0.05)
    assert delivery["json"] == {"text": "*Price drop for Ada*\nEspresso machine is now $399.00 (was $499.00)"}
    latency = delivery["received_at"] - accepted
    print(f"\nprice drop -> webhook: {latency * 1000:.0f} ms after the batch was posted "
          f"({(delivery['received_at'] - sent) * 1000:.0f} ms after the collector answered)")  # fmt: skip

    # The operator's view: one decision, sent, for Ada; Ben (no recent view) and Cy (a recent view of
    # another product) never entered, and their decisions say why: the entry's `if` was false.
    ada = story.person_id("ada")
    assert [(d.channel, kind(d)) for d in story.decisions(ada, "price-drop-alert")] == [("webhook", "sent")]
    assert delivery["idempotency_key"] == story.decisions(ada, "price-drop-alert")[0].action_id
    for user in ("ben", "cy"):
        person = story.person_id(user)
        # Their price drops are decided beside Ada's, not before her post: Ben's on another partition, and
        # an entry whose `if` is false on fields lagging behind the event waits for the profile's change.
        eventually(lambda person=person: story.decided(person, "price-drop-alert"), timeout=30)
        turned_away = [(kind(d), d.rule) for d in story.decisions(person, "price-drop-alert")]
        assert turned_away == [("not_entered", "entry_if")] and story.instances(person) == [], user
    # The send's outcome comes back onto Ada's profile like any event.
    eventually(lambda: any(e.name == "Message Sent" for e in story.timeline(ada)), timeout=10)
    story.orchestration_caught_up()  # whatever else it was to send is sent by now
    assert len(story.webhooks()) == 1, "one post, nothing for Ben or Cy"
