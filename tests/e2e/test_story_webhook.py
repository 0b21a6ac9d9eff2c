"""Real-time trigger to an external system: a price drop on a product Ada viewed reaches the team's
Slack channel (a Slack-compatible incoming webhook) about a second later.

1. Ada browses and views the espresso machine (sku-42); Ben's last view was months ago.
2. The shop's catalogue drops the price and tells the CDP for each person watching the product
   (`Price Dropped` on the person, with the product and both prices).
3. The journey "price-drop-alert" enters people who viewed a product in the last 30 days and posts the
   alert through the webhook channel, in Slack's message format (`CDP_WEBHOOK_PAYLOAD=slack`), to the
   local receiver `make up` runs.
4. The receiver holds one message, for Ada, naming the product and the new price; nothing for Ben. The
   test prints the time from the collector accepting the event to the receiver accepting the post.

The journey cannot say "a product *this* person viewed": conditions compare a field with a constant,
not with the entry event's product (see docs/stories.md). The catalogue's list of watchers is that link.
"""

from __future__ import annotations

import time

import pytest
from stories import Story, days_ago, eventually, iso, kind, start_platform

JOURNEY = {
    "id": "price-drop-alert",
    "version": 1,
    "name": "Price drop on a product someone viewed",
    "priority": 60,
    "category": "alert",
    "timezone": "UTC",
    "entry": {"event": "Price Dropped", "if": 'performed("Product Viewed", within 30d)'},
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


@pytest.mark.timeout(240)
def test_a_price_drop_on_a_viewed_product_reaches_a_slack_webhook_at_once(story: Story):
    story.publish_journey(JOURNEY)
    consent = {"consent": {"categoryPreferences": {"Marketing": True}}}
    story.send(
        {"type": "identify", "userId": "ada", "traits": {"email": "ada@example.com", "first_name": "Ada"},
         "context": consent},
        {"type": "identify", "userId": "ben", "traits": {"email": "ben@example.com", "first_name": "Ben"},
         "context": consent},
        {"type": "track", "userId": "ada", "event": "Product Viewed", "timestamp": iso(days_ago(2)),
         "properties": {"product_id": "sku-42", "name": "Espresso machine", "price": 499}},
        {"type": "track", "userId": "ben", "event": "Product Viewed", "timestamp": iso(days_ago(120)),
         "properties": {"product_id": "sku-42", "name": "Espresso machine", "price": 549}},
    )  # fmt: skip
    for user in ("ada", "ben"):
        story.wait_profile(user, lambda p: p.event_count >= 2 and "purpose:Marketing" in p.consent)
    time.sleep(1)  # the journey's view of both has their views and consent

    # The catalogue drops the price and tells the CDP about everyone watching sku-42.
    drop = {"product_id": "sku-42", "product_name": "Espresso machine", "old_price": 499, "new_price": 399}
    accepted = time.time()
    story.send(
        {"type": "track", "userId": "ada", "event": "Price Dropped", "properties": drop},
        {"type": "track", "userId": "ben", "event": "Price Dropped", "properties": drop},
    )
    sent = time.time()

    # The team's channel gets Ada's alert, as Slack reads it: bold subject, then the text.
    (delivery,) = eventually(story.webhooks, timeout=10, every=0.05)
    assert delivery["json"] == {"text": "*Price drop for Ada*\nEspresso machine is now $399.00 (was $499.00)"}
    latency = delivery["received_at"] - accepted
    print(f"\nprice drop -> webhook: {latency * 1000:.0f} ms after the batch was posted "
          f"({(delivery['received_at'] - sent) * 1000:.0f} ms after the collector answered)")  # fmt: skip

    # The operator's view: one decision, sent, for Ada; Ben (no recent view) never entered.
    ada, ben = story.person_id("ada"), story.person_id("ben")
    assert [(d.channel, kind(d)) for d in story.decisions(ada, "price-drop-alert")] == [("webhook", "sent")]
    assert delivery["idempotency_key"] == story.decisions(ada, "price-drop-alert")[0].action_id
    assert story.decisions(ben, "price-drop-alert") == [] and story.instances(ben) == []
    # The send's outcome comes back onto Ada's profile like any event.
    eventually(lambda: any(e.name == "Message Sent" for e in story.timeline(ada)), timeout=10)
    time.sleep(1)
    assert len(story.webhooks()) == 1, "one post, nothing for Ben"
