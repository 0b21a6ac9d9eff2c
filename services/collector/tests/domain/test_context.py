"""context → the typed Context: what fits goes into typed fields, everything else is kept in context.extra."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from google.protobuf.json_format import MessageToDict

from cdp_collector.domain import Code, parse_request

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def context_of(context: dict):
    payload = {"messageId": "m-1", "userId": "u-1", "event": "E", "context": context}
    parsed = parse_request("track", orjson.dumps(payload), received_at=RECEIVED, source_id="src")
    assert parsed.all_errors == [()], parsed.all_errors
    return parsed.events[0].context


# Shaped like what analytics-ios / analytics-android and analytics.js put in context.
MOBILE_AND_WEB_CONTEXT = {
    "active": True,
    "app": {"name": "InitechGlobal", "version": "545", "build": "3.0.1.545", "namespace": "com.production.segment"},
    "campaign": {"name": "TPS Innovation Newsletter", "source": "Newsletter", "medium": "email", "term": "tps reports", "content": "image link"},
    "device": {
        "id": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB",
        "advertisingId": "7A3CBEA0-BDF5-11E4-8DFC-AA07A5B093DB",
        "adTrackingEnabled": True,
        "manufacturer": "Apple",
        "model": "iPhone7,2",
        "name": "maguro",
        "type": "ios",
        "token": "ff15bc0c20c4aa6cd50854ff165fd265c838e5405bfeb9571066395b8c9da449",
    },
    "ip": "8.8.8.8",
    "library": {"name": "analytics.js", "version": "2.11.1"},
    "locale": "en-US",
    "location": {"city": "San Francisco", "country": "United States", "latitude": 40.2964197, "longitude": -76.9411617, "region": "CA", "speed": 0},
    "network": {"bluetooth": False, "carrier": "T-Mobile US", "cellular": True, "wifi": False},
    "os": {"name": "iPhone OS", "version": "8.1.3"},
    "page": {"path": "/academy/", "referrer": "", "search": "", "title": "Analytics Academy", "url": "https://segment.com/academy/"},
    "referrer": {"id": "ABC123", "type": "dataxu"},
    "screen": {"width": 320, "height": 568, "density": 2},
    "groupId": "12345",
    "timezone": "Europe/Stockholm",
    "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 9_1 like Mac OS X) AppleWebKit/601.1.46",
    "traits": {"email": "peter@example.com", "plan": "premium"},
    "consent": {"categoryPreferences": {"Advertising": True, "Analytics": False}},
}  # fmt: skip


def test_the_documented_context_fields_land_in_typed_fields():
    context = context_of(MOBILE_AND_WEB_CONTEXT)
    assert (context.ip, context.locale, context.timezone) == ("8.8.8.8", "en-US", "Europe/Stockholm")
    assert context.user_agent.startswith("Mozilla/5.0 (iPhone")
    assert context.group_id == "12345"
    assert MessageToDict(context.app) == MOBILE_AND_WEB_CONTEXT["app"]
    assert MessageToDict(context.campaign) == MOBILE_AND_WEB_CONTEXT["campaign"]
    assert MessageToDict(context.library) == MOBILE_AND_WEB_CONTEXT["library"]
    assert MessageToDict(context.os) == MOBILE_AND_WEB_CONTEXT["os"]
    assert MessageToDict(context.page, always_print_fields_with_no_presence=True) == MOBILE_AND_WEB_CONTEXT["page"]
    device = context.device
    assert (device.id, device.advertising_id, device.ad_tracking_enabled) == (
        "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB",
        "7A3CBEA0-BDF5-11E4-8DFC-AA07A5B093DB",
        True,
    )
    assert (device.manufacturer, device.model, device.name, device.type) == (
        "Apple",
        "iPhone7,2",
        "maguro",
        "ios",
    )
    assert device.token.startswith("ff15bc")
    location = context.location
    assert (location.city, location.country, location.region) == ("San Francisco", "United States", "CA")
    assert (location.latitude, location.longitude, location.speed) == (40.2964197, -76.9411617, 0)
    assert (context.network.carrier, context.network.cellular, context.network.wifi) == (
        "T-Mobile US",
        True,
        False,
    )
    assert (context.screen.width, context.screen.height, context.screen.density) == (320, 568, 2.0)
    assert MessageToDict(context.traits) == {"email": "peter@example.com", "plan": "premium"}
    assert dict(context.consent.category_preferences) == {"Advertising": True, "Analytics": False}
    # Keys the proto has no field for are kept as sent.
    assert MessageToDict(context.extra) == {"active": True, "referrer": {"id": "ABC123", "type": "dataxu"}}


def test_unknown_keys_inside_known_objects_are_kept_next_to_them():
    context = context_of({"campaign": {"name": "spring", "source": "google", "utm_id": "abc", "gclid": "x1"}})
    assert (context.campaign.name, context.campaign.source) == ("spring", "google")
    assert MessageToDict(context.extra) == {"campaign": {"utm_id": "abc", "gclid": "x1"}}


def test_values_that_do_not_fit_the_typed_field_are_kept_as_sent():
    context = context_of(
        {
            "app": {"name": "Shop", "build": 3},  # an int where the proto has a string
            "screen": {"width": 1080.0, "height": 2400.5, "density": "3x"},
            "location": {"latitude": "52.37", "longitude": 4.89},
            "network": {"wifi": "yes", "cellular": False},
            "device": "iPhone",  # not an object at all
            "ip": 167772161,
            "userAgent": ["Mozilla"],
        }
    )
    assert context.app.name == "Shop" and context.app.build == ""
    assert context.screen.width == 1080  # 1080.0 is the same number
    assert (context.screen.height, context.screen.density) == (0, 0)
    assert context.location.longitude == 4.89 and context.location.latitude == 0
    assert context.network.cellular is False
    assert (context.ip, context.user_agent) == ("", "")
    assert MessageToDict(context.extra) == {
        "app": {"build": 3},
        "screen": {"height": 2400.5, "density": "3x"},
        "location": {"latitude": "52.37"},
        "network": {"wifi": "yes"},
        "device": "iPhone",
        "ip": 167772161,
        "userAgent": ["Mozilla"],
    }


def test_int32_overflow_in_screen_size_is_kept_in_extra():
    context = context_of({"screen": {"width": 2**31, "height": -(2**31)}})
    assert (context.screen.width, context.screen.height) == (0, -(2**31))
    assert MessageToDict(context.extra) == {"screen": {"width": float(2**31)}}


def test_nulls_mean_not_set():
    context = context_of({"ip": None, "device": {"id": None, "model": "Pixel"}, "traits": None, "consent": None})
    assert context.ip == "" and context.device.model == "Pixel" and context.device.id == ""
    assert not context.HasField("traits") and not context.HasField("consent") and not context.HasField("extra")
    # ...but a key we do not know is kept with its null: its presence may mean something to someone.
    context = context_of({"custom": None, "device": {"model": "Pixel", "rooted": None}})
    assert MessageToDict(context.extra) == {"custom": None, "device": {"rooted": None}}


def test_snake_case_spellings_are_read_and_camel_case_wins_when_both_are_sent():
    context = context_of(
        {
            "user_agent": "curl/8.0",
            "group_id": 77,
            "device": {"advertising_id": "ad-1", "ad_tracking_enabled": True},
            "consent": {"category_preferences": {"Analytics": True}, "channel_preferences": {"email": False}},
        }
    )
    assert (context.user_agent, context.group_id) == ("curl/8.0", "77")
    assert (context.device.advertising_id, context.device.ad_tracking_enabled) == ("ad-1", True)
    assert dict(context.consent.category_preferences) == {"Analytics": True}
    assert dict(context.consent.channel_preferences) == {"email": False}

    both = context_of(
        {"userAgent": "camel", "user_agent": "snake", "device": {"advertising_id": "s", "advertisingId": "c"}}
    )
    assert (both.user_agent, both.device.advertising_id) == ("camel", "c")
    assert MessageToDict(both.extra) == {"user_agent": "snake", "device": {"advertising_id": "s"}}


def test_consent_preferences_that_are_not_booleans_are_kept_in_extra():
    context = context_of(
        {
            "consent": {
                "categoryPreferences": {"Advertising": True, "Functional": "yes", "Unknown": None},
                "channelPreferences": {"sms": False},
                "domain": "example.com",
            }
        }
    )
    assert dict(context.consent.category_preferences) == {"Advertising": True}
    assert dict(context.consent.channel_preferences) == {"sms": False}
    assert MessageToDict(context.extra) == {
        "consent": {"categoryPreferences": {"Functional": "yes", "Unknown": None}, "domain": "example.com"}
    }


def test_context_traits_and_extra_are_checked_like_any_struct():
    payload = {"userId": "u", "event": "E", "context": {"traits": {"account": 2**60}}}
    parsed = parse_request("track", orjson.dumps(payload), received_at=RECEIVED, source_id="src")
    assert [(e.code, e.field) for e in parsed.all_errors[0]] == [(Code.INTEGER_OUT_OF_RANGE, "context.traits.account")]
    payload = {"userId": "u", "event": "E", "context": {"app": {"build": 2**60}}}
    parsed = parse_request("track", orjson.dumps(payload), received_at=RECEIVED, source_id="src")
    assert [(e.code, e.field) for e in parsed.all_errors[0]] == [(Code.INTEGER_OUT_OF_RANGE, "context.app.build")]
