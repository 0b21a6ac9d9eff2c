"""Consent per purpose and channel with history (events, API, CRM), and model scores as profile fields."""

from __future__ import annotations

import math

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTraits, ConsentState, Profile, Score

NO_DEFS = ComputedTraits()
NOW = 1000.0


def test_consent_from_events_api_and_crm_latest_by_event_time_wins(ev):
    profile = Profile.new("p")
    change = profile.apply(
        ev("e1", at=10.0, consent={"purpose:Marketing": True, "channel:email": True}), NO_DEFS, now=NOW
    )
    assert change.consent == {"purpose:Marketing": True, "channel:email": True}
    change = profile.set_consent({"channel:email": False}, source="api", at=30.0, event_id="c1")
    assert change.consent == {"channel:email": False}
    # The CRM's decision is older than the API's: kept in history, not current.
    assert not profile.set_consent({"channel:email": True}, source="salesforce", at=20.0, event_id="c2").consent
    view = profile.view(now=NOW)
    email = view.consent["channel:email"]
    assert (email.granted, email.source, email.at, email.event_id) == (False, "api", 30.0, "c1")
    assert [(c.granted, c.source) for c in email.history] == [(True, "web"), (True, "salesforce"), (False, "api")]
    assert view.consent["purpose:Marketing"] == ConsentState(
        True, "web", 10.0, "e1", (ConsentState(True, "web", 10.0, "e1"),)
    )
    # What we knew at 25: the CRM's grant; the history up to then.
    at_25 = profile.view(now=NOW, as_of=25.0).consent["channel:email"]
    assert (at_25.granted, at_25.source, len(at_25.history)) == (True, "salesforce", 2)
    assert profile.consent_history("channel:email")[-1].event_id == "c1"


def test_consent_writes_are_idempotent_and_same_decisions_are_not_changes(ev):
    profile = Profile.new("p")
    profile.set_consent({"purpose:Analytics": True}, source="api", at=1.0, event_id="c1")
    assert not profile.set_consent({"purpose:Analytics": False}, source="api", at=2.0, event_id="c1")
    change = profile.apply(ev("e1", at=3.0, consent={"purpose:Analytics": True}), NO_DEFS, now=NOW)
    assert change.consent == {}
    assert profile.view(now=NOW).consent["purpose:Analytics"].event_id == "e1"


def test_malformed_consent_on_events_is_ignored_not_fatal(ev):
    profile = Profile.new("p")
    change = profile.apply(
        ev("e1", consent={"marketing": True, "purpose:Ads": "yes", "channel:sms": False}), NO_DEFS, now=NOW
    )
    assert change.consent == {"channel:sms": False}


@pytest.mark.parametrize(
    ("consent", "field"),
    [({}, "consent"), ({"marketing": True}, "consent"), ({"purpose:": True}, "consent"), ({"purpose:My\x00Purpose": True}, "consent"), ({"channel:sms": "no"}, "consent.channel:sms")],
)  # fmt: skip
def test_bad_consent_writes_name_the_field(consent, field):
    with pytest.raises(InvalidArgument) as caught:
        Profile.new("p").set_consent(consent, source="api", at=1.0, event_id="c1")
    assert caught.value.field == field


def test_scores_are_fields_with_model_and_version_and_the_newest_wins():
    profile = Profile.new("p")
    assert profile.set_scores({"churn": 0.8, "ltv": 120}, model="m", version="1", at=10.0).scores == {
        "churn": 0.8,
        "ltv": 120.0,
    }
    assert profile.set_scores({"churn": 0.5}, model="m", version="2", at=20.0).scores == {"churn": 0.5}
    assert not profile.set_scores({"churn": 0.9}, model="m", version="1", at=15.0)  # older: ignored
    assert not profile.set_scores({"churn": 0.5}, model="m", version="3", at=30.0)  # same value: not a change
    view = profile.view(now=NOW)
    assert view.scores["churn"] == Score(0.5, "m", "3", 30.0)
    assert view.scores["ltv"] == Score(120.0, "m", "1", 10.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scores": {"churn": True}}, "scores.churn"),
        ({"scores": {"churn": math.nan}}, "scores.churn"),
        ({"scores": {"churn": "0.5"}}, "scores.churn"),
        ({"scores": {"": 0.5}}, "scores"),
        ({"scores": {"churn": 0.5}, "model": ""}, "model"),
    ],
)
def test_bad_scores_name_the_field(kwargs, field):
    call = {"model": "m", "version": "1", "at": 1.0, **kwargs}
    with pytest.raises(InvalidArgument) as caught:
        Profile.new("p").set_scores(call.pop("scores"), **call)
    assert caught.value.field == field
