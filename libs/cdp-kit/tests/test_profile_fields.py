"""Flat profile fields: the keys segment rules and model features address, from changes and whole profiles."""

import pytest
from google.protobuf.struct_pb2 import Value

from cdp.profile.v1 import profile_pb2
from cdp_kit.profile_fields import (
    COMPUTED,
    CONSENT,
    SCORES,
    TRAITS,
    change_fields,
    field_key,
    profile_fields,
    split_key,
)


def test_a_change_reads_as_flat_updates_and_a_removed_trait_as_none():
    change = profile_pb2.ProfileChanged(person_id="p1")
    change.traits["plan"].string_value = "pro"
    change.traits["nickname"].null_value = 0
    change.computed["orders_90d"].number_value = 3
    change.consent["purpose:email"] = True
    change.scores["churn_risk"] = 0.25
    assert change_fields(change) == {
        "traits.plan": "pro",
        "traits.nickname": None,
        "computed.orders_90d": 3.0,
        "consent.purpose:email": True,
        "scores.churn_risk": 0.25,
    }


def test_a_whole_profile_reads_as_the_same_keys_a_change_updates():
    profile = profile_pb2.Profile(person_id="p1")
    profile.traits["plan"].value.CopyFrom(Value(string_value="pro"))
    profile.computed["orders_90d"].number_value = 3
    profile.consent["purpose:email"].granted = False
    profile.scores["churn_risk"].value = 0.25
    assert profile_fields(profile) == {
        "traits.plan": "pro",
        "computed.orders_90d": 3.0,
        "consent.purpose:email": False,
        "scores.churn_risk": 0.25,
    }


def test_keys_are_built_and_split_by_their_root():
    assert [field_key(root, "x") for root in (TRAITS, COMPUTED, CONSENT, SCORES)] == [
        "traits.x",
        "computed.x",
        "consent.x",
        "scores.x",
    ]
    assert split_key("consent.purpose:a.b") == (CONSENT, "purpose:a.b")
    with pytest.raises(ValueError, match="traits"):
        field_key("trait", "plan")
    for bad in ("plan", "context.traits.plan", "traits."):
        with pytest.raises(ValueError, match=repr(bad)):
            split_key(bad)
