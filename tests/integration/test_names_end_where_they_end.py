"""A name an operator gives (a computed trait, a model and its version, an identifier type, a lease's
identity, a journey's time of day) is refused with a trailing newline, naming the field.

The name patterns were anchored with `$`, which also matches before a final newline: `cdpctl traits
define $'nl_trait\\n'` was accepted, kept the newline in the definition, and went round through
`cdpctl definitions export` and `import` (found on a running platform). A name holding a newline is a
name no query, header or log line can hold safely; each pattern now ends at the end of the string (`\\Z`).
"""

from __future__ import annotations

import pytest

from cdp_identity.domain.rules import MergeRules
from cdp_kit.errors import InvalidArgument
from cdp_kit.ownership import nats_kv
from cdp_profile.domain.computed import ComputedTrait
from cdp_scoring.domain.spec import ModelSpec


def model(name: str = "churn_risk", version: str = "1") -> dict:
    return {
        "name": name,
        "version": version,
        "features": [{"name": "orders", "path": "computed.orders_90d"}],
        "outputs": [{"score": "churn_risk", "output": "p"}],
    }


def test_a_computed_trait_named_with_a_trailing_newline_is_refused_naming_the_field():
    ComputedTrait("nl_trait", "count", event_names=("Order Completed",))  # the name without it is fine
    with pytest.raises(InvalidArgument) as caught:
        ComputedTrait("nl_trait\n", "count", event_names=("Order Completed",))
    assert caught.value.field == "name"


def test_a_shared_pseudo_path_with_a_trailing_newline_is_refused():
    ComputedTrait("shared", "count", event_names=("Order Completed",), property="$shared.email")
    with pytest.raises(InvalidArgument):
        ComputedTrait("shared", "count", event_names=("Order Completed",), property="$shared.email\n")


@pytest.mark.parametrize(
    ("name", "version", "field"), [("churn_risk\n", "1", "spec.name"), ("churn_risk", "1.0\n", "spec.version")]
)
def test_a_model_name_or_version_with_a_trailing_newline_is_refused_naming_the_field(name, version, field):
    ModelSpec.from_dict(model())
    with pytest.raises(InvalidArgument) as caught:
        ModelSpec.from_dict(model(name, version))
    assert caught.value.field == field


def test_an_identifier_type_named_with_a_trailing_newline_is_refused_naming_the_field():
    MergeRules.from_dict({"types": [{"name": "loyalty_id", "paths": ["traits.loyalty_id"]}]})
    with pytest.raises(InvalidArgument) as caught:
        MergeRules.from_dict({"types": [{"name": "loyalty_id\n", "paths": ["traits.loyalty_id"]}]})
    assert caught.value.field == "types[0].name"


def test_a_lease_identity_with_a_trailing_newline_is_refused():
    # A KV key part: nats-server refuses a key with a newline, so the lease could never be taken.
    assert nats_kv._KEY_PART.match("identity-0")
    assert not nats_kv._KEY_PART.match("identity-0\n")


def test_a_time_of_day_with_a_trailing_newline_is_refused():
    from cdp_orchestration.domain.clock import time_of_day

    assert time_of_day("08:00") == (8, 0)
    with pytest.raises(ValueError, match="HH:MM"):
        time_of_day("08:00\n")
