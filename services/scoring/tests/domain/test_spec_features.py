"""The spec a model carries is checked field by field, and features are assembled from profile fields by it."""

from __future__ import annotations

import math

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_scoring.domain import FeatureAssembler, ModelSpec, epoch_seconds

NOW = 1_790_000_000.0
DAY = 86_400.0


def spec(**overrides):
    data = {
        "name": "churn_risk",
        "version": "1.0.0",
        "features": [
            {"name": "orders", "path": "computed.orders_90d", "default": 0},
            {"name": "recency", "path": "computed.last_order_at", "transform": "days_since", "default": 365},
            {"name": "email_ok", "path": "consent.channel:email", "transform": "bool", "default": None},
            {
                "name": "plan",
                "path": "traits.plan",
                "transform": "category",
                "categories": ["free", "pro"],
                "default": "free",
            },
            {"name": "propensity", "path": "scores.purchase_propensity", "default": None},
        ],
        "outputs": [{"score": "churn_risk", "output": "probabilities", "index": 1}],
    }
    data.update(overrides)
    return data


def test_a_valid_spec_round_trips_through_json():
    parsed = ModelSpec.from_dict(spec())
    assert ModelSpec.from_json(parsed.to_json()) == parsed
    assert parsed.paths == {
        "computed.orders_90d",
        "computed.last_order_at",
        "consent.channel:email",
        "traits.plan",
        "scores.purchase_propensity",
    }
    assert parsed.score_names == ("churn_risk",)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"name": "Churn Risk"}, "spec.name", "not a valid model name"),
        ({"version": ""}, "spec.version", "must be a version"),
        ({"features": []}, "spec.features", "must list"),
        ({"features": [{"name": "x", "path": "orders"}]}, "spec.features[0].path", "not a profile field"),
        ({"features": [{"name": "x", "path": "traits."}]}, "spec.features[0].path", "names no field"),
        (
            {"features": [{"name": "x", "path": "traits.a", "transform": "log"}]},
            "spec.features[0].transform",
            "not one of",
        ),
        (
            {"features": [{"name": "x", "path": "traits.a", "transform": "category"}]},
            "spec.features[0].categories",
            "non-empty",
        ),
        (
            {"features": [{"name": "x", "path": "traits.a", "default": "high"}]},
            "spec.features[0].default",
            "must be a number",
        ),
        (
            {"features": [{"name": "x", "path": "traits.a", "default": float("inf")}]},
            "spec.features[0].default",
            "finite",
        ),
        ({"features": [{"name": "x", "path": "traits.a", "colour": 1}]}, "spec.features[0].colour", "unknown key"),
        (
            {"features": [{"name": "x", "path": "traits.a"}, {"name": "x", "path": "traits.b"}]},
            "spec.features[1].name",
            "listed twice",
        ),
        ({"outputs": []}, "spec.outputs", "at least one score"),
        ({"outputs": [{"score": "s", "output": "p", "index": -1}]}, "spec.outputs[0].index", "column number"),
        (
            {"outputs": [{"score": "s", "output": "p"}, {"score": "s", "output": "q"}]},
            "spec.outputs[1].score",
            "produced twice",
        ),
        (
            {"features": [{"name": "x", "path": "scores.churn_risk"}]},
            "spec.features[0].path",
            "own output",
        ),
        (
            {"computed_traits": [{"name": "sessions_30d", "op": "count"}]},
            "spec.features[0].path",
            "do not define",
        ),
        ({"test_vector": {"features": [1, 2]}}, "spec.test_vector.features", "list of 5 numbers"),
        (
            {"test_vector": {"features": [0, 0, 0, 0, 0], "expected": {"other": 1}}},
            "spec.test_vector.expected",
            "map score names",
        ),
        ({"flavour": "x"}, "spec.flavour", "unknown key"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(overrides, field, words):
    with pytest.raises(InvalidArgument) as caught:
        ModelSpec.from_dict(spec(**overrides))
    assert caught.value.field == field
    assert words in caught.value.description


def test_missing_metadata_and_bad_json_are_explained():
    with pytest.raises(InvalidArgument, match=r"carries no 'cdp\.model' metadata"):
        ModelSpec.from_metadata({})
    with pytest.raises(InvalidArgument, match="not JSON"):
        ModelSpec.from_metadata({"cdp.model": "{nope"})


def test_features_come_from_profile_fields_by_the_spec():
    assembler = FeatureAssembler(ModelSpec.from_dict(spec()))
    fields = {
        "computed.orders_90d": 4,
        "computed.last_order_at": NOW - 3 * DAY,
        "consent.channel:email": True,
        "traits.plan": "pro",
        "scores.purchase_propensity": 0.25,
    }
    assert assembler.row(fields, NOW) == pytest.approx([4.0, 3.0, 1.0, 1.0, 0.25])


def test_missing_or_unusable_values_take_the_spec_default():
    assembler = FeatureAssembler(ModelSpec.from_dict(spec()))
    row = assembler.row({}, NOW)
    assert row[:2] == [0.0, 365.0]
    assert math.isnan(row[2]) and math.isnan(row[4])
    assert row[3] == 0.0  # the default category "free" is index 0
    odd = {
        "computed.orders_90d": "many",
        "computed.last_order_at": "last tuesday",
        "consent.channel:email": "maybe",
        "traits.plan": "enterprise",
    }
    row = assembler.row(odd, NOW)
    assert row[:2] == [0.0, 365.0] and math.isnan(row[2])
    assert row[3] == -1.0  # a category the model never saw


def test_values_convert_the_way_profiles_hold_them():
    assembler = FeatureAssembler(ModelSpec.from_dict(spec()))
    fields = {
        "computed.orders_90d": "7",
        "computed.last_order_at": "2026-09-20T10:00:00Z",
        "consent.channel:email": "false",
        "traits.plan": "free",
    }
    row = assembler.row(fields, epoch_seconds("2026-09-30T10:00:00Z"))
    assert row[:4] == pytest.approx([7.0, 10.0, 0.0, 0.0])
    # Epoch milliseconds are told from seconds by their size.
    assert epoch_seconds(NOW * 1000) == pytest.approx(NOW)
    assert epoch_seconds(True) is None


def test_a_row_reads_each_value_as_its_transform_does_whatever_form_it_comes_in():
    """Rows take a shortcut for the forms profiles hold most (float epoch seconds, booleans, strings): every
    other form of the same field still reads as the transform reads it."""
    assembler = FeatureAssembler(ModelSpec.from_dict(spec()))
    at = NOW - 3 * DAY
    seconds = assembler.row({"computed.last_order_at": at}, NOW)[1]
    for held in (at * 1000, int(at), int(at * 1000), "2026-09-18T14:13:20+00:00"):
        assert assembler.row({"computed.last_order_at": held}, NOW)[1] == pytest.approx(seconds)
    for unreadable in (math.nan, math.inf, -math.inf, True, "soon"):
        assert assembler.row({"computed.last_order_at": unreadable}, NOW)[1] == 365.0
    for granted, value in ((True, 1.0), (False, 0.0), (1, 1.0), (0.0, 0.0), ("yes", 1.0), ("off", 0.0)):
        assert assembler.row({"consent.channel:email": granted}, NOW)[2] == value
    assert math.isnan(assembler.row({"consent.channel:email": math.nan}, NOW)[2])
    for plan, value in (("pro", 1.0), ("free", 0.0), ("gold", -1.0), (1, 0.0), (True, 0.0)):
        assert assembler.row({"traits.plan": plan}, NOW)[3] == value  # not a string: the default "free"


def test_named_and_raw_vectors_are_checked():
    assembler = FeatureAssembler(ModelSpec.from_dict(spec()))
    with pytest.raises(InvalidArgument, match="takes 5 features"):
        assembler.from_values([1.0])
    with pytest.raises(InvalidArgument) as caught:
        assembler.from_named({"colour": 1.0})
    assert caught.value.field == "named_features.colour"
    row = assembler.from_named({"orders": 2.0})
    assert row[0] == 2.0 and row[1] == 365.0
