"""The 2 a.m. cart: a reminder that waits for the morning, a purchase that ends it, an offer that is
not made to someone who just asked for help.

Cleo lives in a zone where it is 2 a.m. right now (her profile's `timezone` trait; the platform runs on
the real clock, so the test picks the zone rather than waiting for the night). The operator's rules
(`CDP_ORCHESTRATION_RULES_FILE`): no marketing email, SMS or push between 21:00 and 08:00 in the
person's zone, and no offer within a day of a support ticket.

1. On her phone, at 2 a.m. her time, Cleo abandons her cart. The abandoned-cart journey's reminder is
   due a moment later, but it is night for her: the arbiter defers it to 08:00 her time. It is held,
   not dropped: the decision says until when, and the instance waits.
2. She opens a support ticket ("payment failed"). Her renewal comes due and the renewal-offer journey
   proposes an offer: suppressed by the rule, and the decision history says so.
3. She comes back on her laptop and buys. The cart journey ends at once (exit rule "purchased"), the
   held reminder is withdrawn, and nothing is ever sent to her: the mailbox stays empty.

The purchase in the story comes three hours later; here it comes a few seconds later, still inside the
quiet hours, which is what matters: the reminder was held and is withdrawn, never sent.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from stories import Story, eventually, kind, start_platform

RULES = {
    "timezone": "UTC",
    "quiet_hours": {"from": "21:00", "to": "08:00", "channels": ["email", "sms", "push"]},
    "suppressions": [
        {"id": "no-offer-after-ticket", "categories": ["offer"], "after_event": "Support Ticket Opened", "within": "1d"}
    ],
}

CART = {
    "id": "abandoned-cart",
    "version": 1,
    "name": "Abandoned cart",
    "priority": 50,
    "category": "reminder",
    "timezone": "UTC",
    "entry": {"event": "Cart Abandoned"},
    "reentry": "always",
    "exit": [{"id": "purchased", "event": "Order Completed"}],
    "goal": {"event": "Order Completed", "within": "3d"},
    "nodes": [
        {"id": "wait", "type": "delay", "duration": "2s", "next": "remind"},
        {
            "id": "remind",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "template": {
                "subject": "{{ traits.first_name }}, your cart is waiting",
                "body": "Pick up where you left off: {{ entry.cart_url }}",
            },
        },
    ],
}

RENEWAL = {
    "id": "renewal-offer",
    "version": 1,
    "name": "Renewal offer",
    "priority": 40,
    "category": "offer",
    "timezone": "UTC",
    "entry": {"event": "Renewal Due"},
    "reentry": "always",
    "nodes": [
        {
            "id": "offer",
            "type": "action",
            "channel": "email",
            "purpose": "Marketing",
            "category": "offer",
            "template": {"subject": "20 % off your renewal, {{ traits.first_name }}", "body": "Renew now."},
        }
    ],
}


def zone_where_it_is(hour: int) -> str:
    """An IANA zone (Etc/GMT±N) whose local time is `hour`:xx now."""
    offset = (hour - datetime.now(UTC).hour) % 24
    if offset > 14:
        offset -= 24
    # Etc/GMT-9 is nine hours AHEAD of UTC (POSIX signs).
    return "Etc/GMT" + (f"-{offset}" if offset > 0 else f"+{-offset}" if offset < 0 else "")


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cart")
    rules = workdir / "rules.json"
    rules.write_text(json.dumps(RULES))
    platform = start_platform(workdir, env={"CDP_ORCHESTRATION_RULES_FILE": str(rules)})
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


@pytest.mark.timeout(240)
def test_a_cart_abandoned_at_two_in_the_morning_waits_for_the_morning_and_a_purchase_ends_it(story: Story):
    story.publish_journey(CART)
    story.publish_journey(RENEWAL)
    zone = zone_where_it_is(2)
    phone = {"device": {"id": "cleo-phone", "type": "ios"}, "os": {"name": "iOS"}, "timezone": zone,
             "consent": {"categoryPreferences": {"Marketing": True}}}  # fmt: skip
    laptop = {"device": {"id": "cleo-laptop", "type": "macos"}, "os": {"name": "Mac OS"}, "timezone": zone}
    story.send(
        {"type": "identify", "userId": "cleo", "context": phone,
         "traits": {"email": "cleo@example.com", "first_name": "Cleo", "timezone": zone}},
    )  # fmt: skip
    cleo = story.wait_profile("cleo", lambda p: "purpose:Marketing" in p.consent).person_id

    # 2 a.m. her time, on her phone: the cart is abandoned.
    story.send(
        {"type": "track", "userId": "cleo", "event": "Cart Abandoned", "context": phone,
         "properties": {"cart_url": "https://shop.example/cart/cleo", "total": 129}},
    )  # fmt: skip

    # The reminder comes due two seconds later: deferred to 08:00 her time, held, not dropped.
    (deferred,) = eventually(lambda: story.decided(cleo, "abandoned-cart"), timeout=30)
    assert kind(deferred) == "deferred" and "quiet hours" in deferred.reason
    local_now = datetime.now(ZoneInfo(zone))
    eight = local_now.replace(hour=8, minute=0, second=0, microsecond=0)
    assert deferred.until.ToSeconds() == int(eight.timestamp())
    assert timedelta(hours=4, minutes=55) < eight - local_now <= timedelta(hours=6), "2 a.m. now, 8 a.m. then"
    (cart,) = story.instances(cleo)
    assert cart.end_reason == "" and not cart.HasField("ended_at"), "the instance waits with its reminder"

    # She opens a support ticket; then her renewal comes due: the offer is suppressed, and says why.
    story.send({"type": "track", "userId": "cleo", "event": "Support Ticket Opened", "context": phone,
                "properties": {"subject": "Payment failed"}})  # fmt: skip
    eventually(lambda: any(e.name == "Support Ticket Opened" for e in story.timeline(cleo)), timeout=10)
    story.send({"type": "track", "userId": "cleo", "event": "Renewal Due", "properties": {"plan": "pro"}})
    (offer,) = eventually(lambda: story.decided(cleo, "renewal-offer"), timeout=30)
    assert (kind(offer), offer.rule) == ("suppressed", "no-offer-after-ticket")

    # Back on her laptop, she buys: the cart journey ends at once, the held reminder is withdrawn.
    story.send({"type": "track", "userId": "cleo", "event": "Order Completed", "context": laptop,
                "properties": {"total": 129}})  # fmt: skip

    def ended():
        instance = next(i for i in story.instances(cleo) if i.journey_id == "abandoned-cart")
        return instance if instance.end_reason else None

    cart = eventually(ended, timeout=30)
    assert cart.end_reason == "exit_rule:purchased" and cart.converted
    # Newest first: the reminder's deferral, then its withdrawal; never a send.
    eventually(lambda: [kind(d) for d in story.decisions(cleo, "abandoned-cart")] == ["withdrawn", "deferred"], 10)

    # Nothing was ever sent to Cleo (whatever orchestration was to send is sent by now).
    story.orchestration_caught_up()
    assert story.mail() == []
    assert not any(e.name == "Message Sent" for e in story.timeline(cleo))
