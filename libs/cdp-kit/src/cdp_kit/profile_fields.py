"""Profiles as flat fields: the one place that names them, for every service that reads profiles flat.

A person's profile is read as one flat mapping of field keys to plain values: "traits.plan" -> "pro",
"computed.orders_90d" -> 3.0, "consent.purpose:email" -> True, "scores.churn_risk" -> 0.12. Segment
rules, model features and training datasets all address fields by these keys, so the roots below are
part of the platform's contract: `field_key(TRAITS, "plan")`, never `"traits." + name`. These functions
also turn the profile service's protobufs into that form (scoring, segmentation, training).
"""

from __future__ import annotations

from typing import Any

from cdp.profile.v1 import profile_pb2

# The roots of flat field keys, one per part of a profile.
TRAITS = "traits"
COMPUTED = "computed"
CONSENT = "consent"
SCORES = "scores"
ROOTS = (TRAITS, COMPUTED, CONSENT, SCORES)

_TRAITS, _COMPUTED, _CONSENT, _SCORES = (root + "." for root in ROOTS)


def field_key(root: str, name: str) -> str:
    """`traits`, `plan` → `traits.plan`."""
    if root not in ROOTS:
        raise ValueError(f"field root {root!r} is not one of {', '.join(ROOTS)}")
    return f"{root}.{name}"


def split_key(key: str) -> tuple[str, str]:
    """`traits.plan` → (`traits`, `plan`); the name may itself hold dots (`consent.purpose:a.b`).

    Raises ValueError for a key outside the four roots."""
    root, dot, name = key.partition(".")
    if not dot or not name or root not in ROOTS:
        raise ValueError(f"field {key!r} must start with one of {', '.join(r + '.' for r in ROOTS)} and name a field")
    return root, name


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
    for root, values in ((_COMPUTED, change.computed), (_TRAITS, change.traits)):
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
            updates[_CONSENT + key] = granted
    if change.scores:
        for name, score in change.scores.items():
            updates[_SCORES + name] = score
    return updates


def profile_fields(profile: profile_pb2.Profile) -> dict[str, Any]:
    """The flat fields of a whole profile (a person read from the profile service)."""
    fields: dict[str, Any] = {}
    for name, trait in profile.traits.items():
        fields[_TRAITS + name] = value_to_python(trait.value)
    for name, value in profile.computed.items():
        fields[_COMPUTED + name] = value_to_python(value)
    for key, consent in profile.consent.items():
        fields[_CONSENT + key] = consent.granted
    for name, score in profile.scores.items():
        fields[_SCORES + name] = score.value
    return {k: v for k, v in fields.items() if v is not None}
