"""The computed traits the shipped models read, and each model's features (profile field paths).

One definition per name for every model: the scoring service asks the profile service to define the
traits of every active model, and two models must never disagree on what `orders_90d` means.
"""

from __future__ import annotations

from typing import Any

from cdp_kit.profile_fields import COMPUTED, CONSENT, TRAITS, field_key, split_key
from cdp_training.simulator import CHANNELS, SESSION_PAGES, Kind

SESSION_NAMES = list(SESSION_PAGES)
ORDER = ["Order Completed"]
# What the person's own browser or app sends: its context is where they are. (Email, SMS and support
# events arrive from other systems, whose context says little about the person's device or place.)
CLIENT_EVENTS = [*SESSION_NAMES, "Login", "Signed Up", "Product Viewed", "Product Added", "Order Completed"]


def _count(name: str, events: list[str], window: str | None = None, event_type: str = "track") -> dict[str, Any]:
    trait: dict[str, Any] = {"name": name, "op": "count", "event_type": event_type, "event_names": events}
    if window:
        trait["window"] = window
    return trait


def _op(
    name: str,
    op: str,
    prop: str,
    events: list[str] | None,
    window: str | None = None,
    event_type: str = "track",
    **more: Any,
) -> dict:
    trait: dict[str, Any] = {"name": name, "op": op, "event_type": event_type if events else "any", "property": prop}
    if events:
        trait["event_names"] = events
    if window:
        trait["window"] = window
    trait.update(more)
    return trait


COMPUTED_TRAITS: dict[str, dict[str, Any]] = {
    trait["name"]: trait
    for trait in [
        # engagement: a session opens with one page (web) or screen (app) view
        _count("sessions_7d", SESSION_NAMES, "7d", "any"),
        _count("sessions_30d", SESSION_NAMES, "30d", "any"),
        _count("sessions_90d", SESSION_NAMES, "90d", "any"),
        _count("app_sessions_30d", SESSION_NAMES, "30d", "screen"),
        {"name": "last_session_at", "op": "max", "event_type": "any", "event_names": SESSION_NAMES, "property": "$at"},
        _op("signed_up_at", "min", "$at", ["Signed Up"]),
        _count("logins_30d", ["Login"], "30d"),
        _count("product_views_7d", ["Product Viewed"], "7d"),
        _count("product_views_30d", ["Product Viewed"], "30d"),
        _count("cart_adds_7d", ["Product Added"], "7d"),
        _count("cart_adds_30d", ["Product Added"], "30d"),
        # orders
        _count("orders_90d", ORDER, "90d"),
        _count("orders_365d", ORDER, "365d"),
        _count("orders_total", ORDER),
        _op("revenue_365d", "sum", "total", ORDER, "365d"),
        _op("avg_order_value", "avg", "total", ORDER),
        _op("first_order_at", "min", "$at", ORDER),
        _op("last_order_at", "max", "$at", ORDER),
        # support
        _count("tickets_30d", ["Support Ticket Opened"], "30d"),
        _count("tickets_90d", ["Support Ticket Opened"], "90d"),
        _count("tickets_365d", ["Support Ticket Opened"], "365d"),
        _op("last_ticket_at", "max", "$at", ["Support Ticket Opened"]),
        # channels
        _count("email_opens_30d", ["Email Opened"], "30d"),
        _count("email_opens_90d", ["Email Opened"], "90d"),
        _count("email_clicks_90d", ["Email Clicked"], "90d"),
        _count("sms_clicks_30d", ["SMS Clicked"], "30d"),
        _count("sms_clicks_90d", ["SMS Clicked"], "90d"),
        _count("push_opens_30d", ["Push Opened"], "30d"),
        _count("push_opens_90d", ["Push Opened"], "90d"),
        _count("inapp_clicks_30d", ["In-App Clicked"], "30d"),
        _count("inapp_clicks_90d", ["In-App Clicked"], "90d"),
        _op("top_channel_30d", "most_frequent", "channel", list(Kind.RESPONSE_NAMES), "30d"),
        _op("top_channel_90d", "most_frequent", "channel", list(Kind.RESPONSE_NAMES), "90d"),
        _op("best_hour", "most_frequent", "$hour", list(Kind.ENGAGEMENT_NAMES)),
        # fraud, over the last 24 hours
        _op("max_speed_kmh_24h", "max_speed", "$context.location", CLIENT_EVENTS, "24h", "any"),
        _op("devices_24h", "unique_count", "$context.device.id", CLIENT_EVENTS, "24h", "any"),
        _op("countries_24h", "unique_count", "$context.location.country", CLIENT_EVENTS, "24h", "any"),
        _op("ips_24h", "unique_count", "$context.ip", CLIENT_EVENTS, "24h", "any"),
        _count("orders_24h", ORDER, "24h"),
        _op("cards_24h", "unique_count", "card_fingerprint", ORDER, "24h"),
        _op("card_countries_24h", "unique_count", "card_country", ORDER, "24h"),
        _op("geo_mismatch_24h", "mismatch_count", "card_country", ORDER, "24h", compare="$context.location.country"),
        _op("accounts_24h", "unique_count", "$user_id", ["Signed Up"], "24h"),
        # other accounts (persons, to identity) seen on the person's device in a day, as identity counts them:
        # on the person's own events, and on identity's "Identifier Shared" when another account joins them
        # there later (the ring's first account, alone on the phone when it ordered, learns of the others)
        _op(
            "shared_device_accounts_24h",
            "max",
            "$shared.device_id",
            [*CLIENT_EVENTS, "Identifier Shared"],
            "24h",
            "any",
        ),
        _op("max_order_total_24h", "max", "total", ORDER, "24h"),
    ]
}


def computed(name: str, default: float | None = 0.0) -> dict[str, Any]:
    return {"name": name, "path": field_key(COMPUTED, name), "transform": "number", "default": default}


def days_since(name: str, trait: str, default: float | None = None) -> dict[str, Any]:
    return {"name": name, "path": field_key(COMPUTED, trait), "transform": "days_since", "default": default}


def consent(channel: str) -> dict[str, Any]:
    path = field_key(CONSENT, f"channel:{channel}")
    return {"name": f"consent_{channel}", "path": path, "transform": "bool", "default": 0.0}


PLAN = {
    "name": "plan",
    "path": field_key(TRAITS, "plan"),
    "transform": "category",
    "categories": ["free", "plus", "pro"],
    "default": -1,
}

# Churn and purchase propensity read the same picture of a customer. Missing times are NaN ("never"):
# the trees route missing values themselves.
ENGAGEMENT_FEATURES: list[dict[str, Any]] = [
    computed("sessions_7d"),
    computed("sessions_30d"),
    computed("sessions_90d"),
    computed("app_sessions_30d"),
    computed("logins_30d"),
    days_since("days_since_last_session", "last_session_at"),
    days_since("days_since_signup", "signed_up_at"),
    computed("product_views_7d"),
    computed("product_views_30d"),
    computed("cart_adds_7d"),
    computed("cart_adds_30d"),
    computed("orders_90d"),
    computed("orders_365d"),
    computed("orders_total"),
    computed("revenue_365d"),
    computed("avg_order_value", None),
    days_since("days_since_first_order", "first_order_at"),
    days_since("days_since_last_order", "last_order_at"),
    computed("tickets_30d"),
    computed("tickets_90d"),
    computed("tickets_365d"),
    days_since("days_since_last_ticket", "last_ticket_at"),
    computed("email_opens_30d"),
    computed("email_opens_90d"),
    computed("email_clicks_90d"),
    computed("sms_clicks_90d"),
    computed("push_opens_90d"),
    computed("inapp_clicks_90d"),
    consent("email"),
    consent("sms"),
    consent("push"),
    PLAN,
]

# A trend is a share: the sessions of the last week out of the last month's, and of the last month out of
# the last three. Trees split on values, not on ratios of two of them, and a share reads the same at five
# sessions a day as at five a month. The engagement models compute them in their graph (`models.trends`)
# from these features, as (numerator, denominator) names; a share of nothing is missing (NaN).
ENGAGEMENT_TRENDS: list[tuple[str, str]] = [("sessions_7d", "sessions_30d"), ("sessions_30d", "sessions_90d")]

# BG/NBD + Gamma-Gamma: no order means orders_total 0, and then the order times are not read.
CLV_FEATURES: list[dict[str, Any]] = [
    computed("orders_total"),
    days_since("days_since_first_order", "first_order_at", 0.0),
    days_since("days_since_last_order", "last_order_at", 0.0),
    computed("avg_order_value"),
    days_since("days_since_signup", "signed_up_at", 0.0),
]

FRAUD_FEATURES: list[dict[str, Any]] = [
    computed("max_speed_kmh_24h"),
    computed("devices_24h"),
    computed("countries_24h"),
    computed("ips_24h"),
    computed("orders_24h"),
    computed("cards_24h"),
    computed("card_countries_24h"),
    computed("geo_mismatch_24h"),
    computed("accounts_24h"),
    computed("shared_device_accounts_24h"),
    computed("max_order_total_24h"),
    days_since("account_age_days", "signed_up_at", 0.0),
    computed("orders_total"),
]

NBC_FEATURES: list[dict[str, Any]] = [
    computed("email_opens_30d"),
    computed("email_opens_90d"),
    computed("email_clicks_90d"),
    computed("sms_clicks_30d"),
    computed("sms_clicks_90d"),
    computed("push_opens_30d"),
    computed("push_opens_90d"),
    computed("inapp_clicks_30d"),
    computed("inapp_clicks_90d"),
    computed("sessions_30d"),
    computed("app_sessions_30d"),
    days_since("days_since_last_session", "last_session_at"),
    consent("email"),
    consent("sms"),
    consent("push"),
    consent("in_app"),
    computed("best_hour", -1.0),
    {
        "name": "top_channel_30d",
        "path": field_key(COMPUTED, "top_channel_30d"),
        "transform": "category",
        "categories": list(CHANNELS),
        "default": -1,
    },
    {
        "name": "top_channel_90d",
        "path": field_key(COMPUTED, "top_channel_90d"),
        "transform": "category",
        "categories": list(CHANNELS),
        "default": -1,
    },
    PLAN,
]


# Behavioural clusters (`clusters`): how much and how a person uses the shop, every value a number >= 0
# (the graph reads log(1 + x)). "Never" is two years ago for recency; an unknown sign-up is tenure 0.
NEVER_DAYS = 730.0
CLUSTER_FEATURES: list[dict[str, Any]] = [
    computed("sessions_30d"),
    computed("app_sessions_30d"),
    computed("product_views_30d"),
    computed("cart_adds_30d"),
    computed("orders_365d"),
    computed("revenue_365d"),
    computed("avg_order_value"),
    days_since("days_since_last_session", "last_session_at", NEVER_DAYS),
    days_since("days_since_last_order", "last_order_at", NEVER_DAYS),
    days_since("days_since_signup", "signed_up_at", 0.0),
    computed("tickets_365d"),
    computed("email_opens_90d"),
    computed("sms_clicks_90d"),
    computed("push_opens_90d"),
    computed("inapp_clicks_90d"),
]


def traits_for(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The computed-trait definitions a feature list reads, in first-use order."""
    names: dict[str, None] = {}
    for feature in features:
        root, name = split_key(feature["path"])
        if root == COMPUTED:
            names[name] = None
    return [COMPUTED_TRAITS[name] for name in names]


def all_features() -> list[list[dict[str, Any]]]:
    return [ENGAGEMENT_FEATURES, CLV_FEATURES, FRAUD_FEATURES, NBC_FEATURES]
