"""Training features are production features: hand-written Segment events go through the collector's
parser, the profile service's conversion and the profile domain, and the scoring domain's assembler turns
the flat profile fields into exactly the rows worked out here by hand. A simulated fraud ring's events go
through identity's default rules too, and the profile its last order lands on gives the simulator's row."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson
import pytest

from cdp.events.v1 import events_pb2
from cdp_collector.domain.segment import parse_request
from cdp_identity.codec import encode_resolved, event_time_ms, identifier_shared
from cdp_identity.domain.graph import IdentityGraph
from cdp_identity.domain.normalize import Normalizer
from cdp_identity.domain.rules import MergeRules
from cdp_identity.extract import Extractor
from cdp_profile.domain import ComputedTraits
from cdp_profile.events import to_profile_event
from cdp_scoring.domain import FeatureAssembler, ModelSpec
from cdp_training.dataset import fields_at, matrix
from cdp_training.simulator import Population
from cdp_training.traits import (
    CLV_FEATURES,
    COMPUTED_TRAITS,
    ENGAGEMENT_FEATURES,
    FRAUD_FEATURES,
    NBC_FEATURES,
    traits_for,
)

CUTOFF = datetime(2025, 6, 1, tzinfo=UTC).timestamp()
DAY, HOUR = 86_400.0, 3_600.0
PARIS = {"country": "FR", "city": "Paris", "latitude": 48.8566, "longitude": 2.3522}
NEW_YORK = {"country": "US", "city": "New York", "latitude": 40.7128, "longitude": -74.0060}


def _context(device: str, ip: str, location: dict, timezone: str = "Europe/Paris") -> dict:
    return {"ip": ip, "timezone": timezone, "device": {"id": device}, "location": location}


WEB = _context("browser-1", "90.12.1.1", PARIS)
APP = _context("phone-1", "90.12.9.9", PARIS)
ABROAD = _context("laptop-x", "24.41.7.7", NEW_YORK, "America/New_York")


def _at(seconds_before_cutoff: float) -> str:
    return datetime.fromtimestamp(CUTOFF - seconds_before_cutoff, UTC).isoformat().replace("+00:00", "Z")


def _track(n: int, user: str, event: str, before: float, context: dict, **properties) -> dict:
    return {
        "type": "track",
        "messageId": f"m{n}",
        "userId": user,
        "event": event,
        "properties": properties,
        "context": context,
        "timestamp": _at(before),
    }


def _view(n: int, kind: str, name: str, before: float, context: dict) -> dict:
    return {
        "type": kind,
        "messageId": f"m{n}",
        "userId": "u-1",
        "name": name,
        "context": context,
        "timestamp": _at(before),
    }


# 2025-05-12 16:30 UTC is 18:30 in Paris (CEST); 2025-05-22 16:10 UTC 18:10; 2025-05-27 07:00 UTC 09:00.
EVENTS = [
    {
        "type": "identify",
        "messageId": "m1",
        "userId": "u-1",
        "traits": {"email": "ada@example.com", "plan": "plus", "country": "FR"},
        "context": {**WEB, "consent": {"channelPreferences": {"email": True, "sms": False}}},
        "timestamp": _at(100 * DAY),
    },
    _track(2, "u-1", "Signed Up", 100 * DAY - 2, WEB, method="email"),
    _view(3, "page", "Home", 40 * DAY, WEB),
    _track(
        4,
        "u-1",
        "Order Completed",
        40 * DAY - 300,
        WEB,
        order_id="o1",
        total=50.0,
        currency="USD",
        card_fingerprint="card-1",
        card_country="FR",
        items=1,
    ),
    _track(5, "u-1", "Email Opened", 20 * DAY - 16.5 * HOUR, WEB, campaign_id="email-1", channel="email"),
    _track(6, "u-1", "Email Opened", 10 * DAY - (16 + 1 / 6) * HOUR, WEB, campaign_id="email-2", channel="email"),
    _track(7, "u-1", "Push Opened", 5 * DAY - 7 * HOUR, APP, campaign_id="push-1", channel="push"),
    _view(8, "screen", "Home", 3 * DAY, APP),
    _view(9, "page", "Catalog", 2 * HOUR, WEB),
    # an hour later the account orders from New York on a Brazilian card, and two accounts sign up there
    _track(
        10,
        "u-1",
        "Order Completed",
        1 * HOUR,
        ABROAD,
        order_id="o2",
        total=150.0,
        currency="USD",
        card_fingerprint="card-2",
        card_country="BR",
        items=2,
    ),
    _track(11, "u-3", "Signed Up", 40 * 60, ABROAD, method="email"),
    _track(12, "u-2", "Signed Up", 30 * 60, ABROAD, method="email"),
]


def _haversine_km(a: dict, b: dict) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a["latitude"], a["longitude"], b["latitude"], b["longitude"]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


@pytest.fixture(scope="module")
def fields() -> dict:
    profile_events = []
    for segment in EVENTS:
        parsed = parse_request(
            "batch", orjson.dumps({"batch": [segment]}), received_at=datetime(2026, 1, 1, tzinfo=UTC), source_id="web"
        )
        (event,) = [e for _, e in parsed.valid()]
        resolved = events_pb2.ResolvedEvent(
            event=event,
            person_id="p-1",
            identifiers=[f"user_id:{event.user_id}"],
            # identity saw two other persons on the New York laptop (see ResolvedEvent.shared_with)
            shared_with={"device_id": 2} if event.message_id == "m10" else {},
        )
        profile_events.append(to_profile_event(resolved, needs_context=True))
    defs = ComputedTraits.from_dicts(list(COMPUTED_TRAITS.values()))
    (at_cutoff,) = fields_at("p-1", profile_events, defs, [CUTOFF])
    return at_cutoff


def _row(features: list, fields: dict) -> dict[str, float]:
    spec = ModelSpec.from_dict(
        {
            "name": "parity",
            "version": "1",
            "features": features,
            "outputs": [{"score": "s", "output": "o"}],
            "computed_traits": traits_for(features),
        }
    )
    assembler = FeatureAssembler(spec)
    return dict(zip(assembler.names, assembler.row(fields, CUTOFF), strict=True))


def _same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_engagement_features(fields):
    _same(
        _row(ENGAGEMENT_FEATURES, fields),
        {
            "sessions_7d": 2,  # the app screen 3 days ago and the page 2 hours ago
            "sessions_30d": 2,
            "sessions_90d": 3,
            "app_sessions_30d": 1,
            "logins_30d": 0,
            "days_since_last_session": 2 / 24,
            "days_since_signup": 100 - 2 / DAY,
            "product_views_7d": 0,
            "product_views_30d": 0,
            "cart_adds_7d": 0,
            "cart_adds_30d": 0,
            "orders_90d": 2,
            "orders_365d": 2,
            "orders_total": 2,
            "revenue_365d": 200.0,
            "avg_order_value": 100.0,
            "days_since_first_order": 40 - 300 / DAY,
            "days_since_last_order": 1 / 24,
            "tickets_30d": 0,
            "tickets_90d": 0,
            "tickets_365d": 0,
            "days_since_last_ticket": math.nan,  # never
            "email_opens_30d": 2,
            "email_opens_90d": 2,
            "email_clicks_90d": 0,
            "sms_clicks_90d": 0,
            "push_opens_90d": 1,
            "inapp_clicks_90d": 0,
            "consent_email": 1,
            "consent_sms": 0,
            "consent_push": 0,  # never given: the default
            "plan": 1,  # free, plus, pro
        },
    )


def test_clv_features(fields):
    _same(
        _row(CLV_FEATURES, fields),
        {
            "orders_total": 2,
            "days_since_first_order": 40 - 300 / DAY,
            "days_since_last_order": 1 / 24,
            "avg_order_value": 100.0,
            "days_since_signup": 100 - 2 / DAY,
        },
    )


def test_fraud_features(fields):
    # last 24 hours of the browser or app: the Paris page, then New York (order, two sign-ups)
    _same(
        _row(FRAUD_FEATURES, fields),
        {
            "max_speed_kmh_24h": _haversine_km(PARIS, NEW_YORK) / 1.0,  # 2 h and 1 h before the cutoff
            "devices_24h": 2,
            "countries_24h": 2,
            "ips_24h": 2,
            "orders_24h": 1,
            "cards_24h": 1,
            "card_countries_24h": 1,
            "geo_mismatch_24h": 1,  # a BR card ordering from the US
            "accounts_24h": 2,  # u-3 and u-2; u-1 signed up 100 days ago
            "shared_device_accounts_24h": 2,  # identity's count on the New York order
            "max_order_total_24h": 150.0,
            "account_age_days": 100 - 2 / DAY,
            "orders_total": 2,
        },
    )


def test_next_best_channel_features(fields):
    _same(
        _row(NBC_FEATURES, fields),
        {
            "email_opens_30d": 2,
            "email_opens_90d": 2,
            "email_clicks_90d": 0,
            "sms_clicks_30d": 0,
            "sms_clicks_90d": 0,
            "push_opens_30d": 1,
            "push_opens_90d": 1,
            "inapp_clicks_30d": 0,
            "inapp_clicks_90d": 0,
            "sessions_30d": 2,
            "app_sessions_30d": 1,
            "days_since_last_session": 2 / 24,
            "consent_email": 1,
            "consent_sms": 0,
            "consent_push": 0,
            "consent_in_app": 0,
            "best_hour": 18,  # 18:30 and 18:10 in Paris beat 09:00
            "top_channel_30d": 0,  # email
            "top_channel_90d": 0,
            "plan": 1,
        },
    )


def _through_identity(events: list[dict]) -> list[events_pb2.ResolvedEvent]:
    """Segment events as production resolves them: the collector's parser, identity's extraction and
    default rules, the resolved event's bytes as identity writes them - and identity's "Identifier Shared"
    events for the persons an event's person joined on an identifier, as it publishes them."""
    rules = MergeRules.default()
    extractor, normalizer, graph = Extractor(rules), Normalizer(rules), IdentityGraph(rules)
    out = []
    for n, segment in enumerate(events):
        parsed = parse_request(
            "batch", orjson.dumps({"batch": [segment]}), received_at=datetime(2026, 1, 1, tzinfo=UTC), source_id="web"
        )
        (event,) = [e for _, e in parsed.valid()]
        identifiers, _rejected = normalizer.normalize(extractor.extract(event))
        at = event_time_ms(event)
        resolution = graph.resolve(identifiers, event_id=f"e{n}", at=at)
        encoded = encode_resolved(
            event.SerializeToString(), resolution.person, (), [i.key for i in identifiers], resolution.shared
        )
        out.append(events_pb2.ResolvedEvent.FromString(encoded))
        for person, shared in resolution.told.items():
            batch = identifier_shared(person, shared, message_id=f"sh-{n}-{person}", at=at, received=at)
            out.extend(events_pb2.ResolvedEventBatch.FromString(batch).events)
    return out


def test_a_fraud_ring_seen_through_identitys_default_rules_gives_the_simulators_fraud_row(population: Population):
    """Each of a ring's accounts is a person to identity (one user id per person); the order at the fraud
    moment lands on its account's profile, and identity's counts of the other accounts on the device
    give the same `shared_device_accounts_24h` - and every other fraud feature - as the simulator's row."""
    spec = ModelSpec.from_dict(
        {
            "name": "parity",
            "version": "1",
            "features": FRAUD_FEATURES,
            "outputs": [{"score": "s", "output": "o"}],
            "computed_traits": traits_for(FRAUD_FEATURES),
        }
    )
    defs = ComputedTraits.from_dicts(traits_for(FRAUD_FEATURES))
    shared_column = [f["name"] for f in FRAUD_FEATURES].index("shared_device_accounts_24h")
    checked = told = 0
    for person in range(population.size):
        apart = population.fraud_events(person, population.cutoff)
        if apart is None or not population.traits["fraud_ring"][person]:
            continue
        at = float(population.fraud_at[person])
        (simulated,) = fields_at("p", apart, defs, [at])
        expected = matrix(spec, [simulated], at)[0]
        if expected[shared_column] == 0:
            continue  # a ring whose accounts never met on a device within the day
        resolved = _through_identity(population.segment_events(person, population.cutoff))
        (order,) = [
            r for r in resolved if r.event.event == "Order Completed" and event_time_ms(r.event) == round(at * 1000)
        ]
        landed = [to_profile_event(r, needs_context=True) for r in resolved if r.person_id == order.person_id]
        own = {e.user_id for e in landed if e.source != "identity"}
        assert own == {order.event.user_id}, "the profile holds one account's events (and identity's)"
        # identity's "Identifier Shared" for the account (the accounts that joined its device after it): the
        # simulator's, at the same times with the same counts
        assert [(e.at, dict(e.shared)) for e in landed if e.name == "Identifier Shared"] == [
            (e.at, dict(e.shared)) for e in apart if e.name == "Identifier Shared"
        ], person
        told += sum(e.name == "Identifier Shared" and e.at <= at for e in landed)
        (production,) = fields_at("p", landed, defs, [at])
        got = matrix(spec, [production], at)[0]
        assert got.tolist() == pytest.approx(expected.tolist(), nan_ok=True), person
        checked += 1
    assert checked >= 5, "the test population has rings whose accounts share a device"
    assert told, "and accounts told of others that joined them before their order"
