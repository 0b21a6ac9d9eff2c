"""Growth: the top decile by lifetime value becomes a Salesforce campaign's members, and a member's
response comes back and moves her into the next segment.

1. Twenty customers with a year of orders (from one small order to a weekly habit). The shipped `clv`
   model scores each as their orders arrive (`scores.clv_value_365d`, expected value over the next year).
2. The marketer takes the top decile: `top_clv` is
   `scores.clv_value_365d >= percentile(scores.clv_value_365d, 90)`, the 90th percentile of the population
   segmentation holds, computed exactly when the segment is built (of twenty, between the second and the
   third highest): two members, the two biggest buyers.
3. The CRM connector mirrors `top_clv` into the Salesforce campaign "Top decile" (campaign membership,
   mode mirror): two campaign members, on the two customers' contacts, and no one else.
4. One of them answers the campaign; marketing marks her `Responded` in Salesforce. The connector reads
   the change back (`CRM Campaign Engagement` on her profile) and she moves into `top_clv_engaged`
   (`in_segment("top_clv") and performed("CRM Campaign Engagement", within 30d)`); the other does not.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from stories import Story, days_ago, eventually, iso, start_platform

CUSTOMERS = 20


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    platform = start_platform(tmp_path_factory.mktemp("growth"))
    story = Story(platform)
    try:
        yield story
    finally:
        story.close()
        platform.stop()


def a_year_of_orders(i: int) -> list[dict]:
    """Customer i: signed up a year ago, i + 1 orders spread over the year (the last a few days ago),
    bigger baskets for the bigger buyers."""
    user = f"g-{i:02d}"
    events: list[dict] = [
        {"type": "identify", "userId": user, "timestamp": iso(days_ago(365)),
         "traits": {"email": f"{user}@example.com", "first_name": f"Customer{i}", "last_name": "Growth"}},
        {"type": "track", "userId": user, "event": "Signed Up", "timestamp": iso(days_ago(365))},
    ]  # fmt: skip
    orders = i + 1
    for k in range(orders):
        day = 360 - k * (355 // orders)
        events.append(
            {"type": "track", "userId": user, "event": "Order Completed", "timestamp": iso(days_ago(day)),
             "properties": {"total": 30 + 5 * i, "order_id": f"{user}-{k}"}}
        )  # fmt: skip
    return events


def connections_with_campaign(story: Story, campaign_id: str) -> dict:
    document = copy.deepcopy(yaml.safe_load((story.platform.home / "crm" / "connections.yaml").read_text()))
    salesforce = next(c for c in document["connections"] if c["id"] == "salesforce")
    salesforce["mappings"].append(
        {
            "id": "top-decile",
            "object": "Contact",
            "segment": "top_clv",
            "list": campaign_id,
            "match": {"CDP_Id__c": "person.id"},
            "mode": "mirror",
        }
    )
    return document


@pytest.mark.timeout(300)
def test_the_top_decile_becomes_campaign_members_and_a_response_moves_the_segment(story: Story):
    # Marketing's campaign in Salesforce, and the connector told to keep its members = the top decile.
    campaign = story.salesforce("/sobjects/Campaign", {"Name": "Top decile", "Status": "In Progress"})["id"]
    story.configure_crm(connections_with_campaign(story, campaign))

    users = [f"g-{i:02d}" for i in range(CUSTOMERS)]
    story.send_many([event for i in range(CUSTOMERS) for event in a_year_of_orders(i)])
    for i, user in enumerate(users):
        story.wait_profile(
            user, lambda p, n=i + 1: p.computed["orders_total"].number_value == n and "clv_value_365d" in p.scores
        )
    story.wait_scored()  # the scores of their last changes, not those of an earlier one
    clv = {user: story.profile(user).scores["clv_value_365d"].value for user in users}
    ranked = sorted(clv, key=clv.get, reverse=True)
    assert ranked[:2] == ["g-19", "g-18"], "the biggest buyers are worth the most"
    assert clv[ranked[1]] > clv[ranked[2]], "a decile of twenty is two customers"

    story.create_segment(
        "top_clv",
        "scores.clv_value_365d >= percentile(scores.clv_value_365d, 90)",
        name="Top decile by lifetime value",
    )
    story.create_segment(
        "top_clv_engaged",
        'in_segment("top_clv") and performed("CRM Campaign Engagement", within 30d)',
        name="Top decile, answered the campaign",
    )
    top = {story.person_id(user): user for user in ranked[:2]}
    assert story.members("top_clv") == set(top)

    # Salesforce: the campaign holds the two, on their contacts, and no one else.
    def members():
        rows = story.soql("SELECT Id, CampaignId, ContactId, Status FROM CampaignMember")
        return [r for r in rows if r["CampaignId"] == campaign]

    eventually(lambda: len(members()) == 2, timeout=30)
    contacts = {c["Id"]: c["CDP_Id__c"] for c in story.soql("SELECT Id, CDP_Id__c FROM Contact")}
    assert {contacts[m["ContactId"]] for m in members()} == set(top)

    # g-19 answers the campaign: marketing marks her Responded in Salesforce.
    (answered,) = [m for m in members() if top[contacts[m["ContactId"]]] == "g-19"]
    story.salesforce(f"/sobjects/CampaignMember/{answered['Id']}", {"Status": "Responded"}, method="PATCH")

    # Her engagement comes back onto her profile and moves her into the next segment.
    g19, g18 = story.person_id("g-19"), story.person_id("g-18")
    (engaged,) = eventually(lambda: [e for e in story.timeline(g19) if e.name == "CRM Campaign Engagement"], timeout=30)
    assert dict(engaged.properties)["CampaignId"] == campaign
    assert dict(engaged.properties)["Status"] == "Responded"
    eventually(lambda: story.members("top_clv_engaged") == {g19}, timeout=30)
    assert g18 in story.members("top_clv") and g18 not in story.members("top_clv_engaged")
    # Still two campaign members: the response changed one, the connector added no other.
    assert len(members()) == 2
