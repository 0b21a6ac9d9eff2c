"""Profiles as flat fields, for the services that follow `profiles.changed` (scoring, segmentation).

A person's profile is read as one flat mapping of field keys to plain values: "traits.plan" -> "pro",
"computed.orders_90d" -> 3.0, "consent.purpose:email" -> True, "scores.churn_risk" -> 0.12. These
turn the profile service's protobufs into that form.
"""

from __future__ import annotations

from typing import Any

from cdp.profile.v1 import profile_pb2


def value_to_python(value) -> Any:
    """A google.protobuf.Value as a plain value (numbers stay floats)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: value_to_python(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [value_to_python(v) for v in value.list_value.values]
    return None


def change_fields(change: profile_pb2.ProfileChanged) -> dict[str, Any]:
    """The flat field updates a profile change carries (None: the field is gone)."""
    updates: dict[str, Any] = {}
    for root, values in (("computed.", change.computed), ("traits.", change.traits)):
        if values:
            for name, value in values.items():
                kind = value.WhichOneof("kind")
                if kind == "number_value":
                    updates[root + name] = value.number_value
                elif kind == "string_value":
                    updates[root + name] = value.string_value
                else:
                    updates[root + name] = value_to_python(value)
    if change.consent:
        for key, granted in change.consent.items():
            updates["consent." + key] = granted
    if change.scores:
        for name, score in change.scores.items():
            updates["scores." + name] = score
    return updates


def profile_fields(profile: profile_pb2.Profile) -> dict[str, Any]:
    """The flat fields of a whole profile (a person read from the profile service)."""
    fields: dict[str, Any] = {}
    for name, trait in profile.traits.items():
        fields["traits." + name] = value_to_python(trait.value)
    for name, value in profile.computed.items():
        fields["computed." + name] = value_to_python(value)
    for key, consent in profile.consent.items():
        fields["consent." + key] = consent.granted
    for name, score in profile.scores.items():
        fields["scores." + name] = score.value
    return {k: v for k, v in fields.items() if v is not None}
