"""Declarative matching configuration: which fields to compare and how, how to block, where to cut.

`MatchConfig.from_dict` validates everything up front and names the offending setting with a dotted
path (`comparisons[2].kind`) in `InvalidArgument`, so a bad config fails when it is loaded, not halfway
through a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from cdp_kit.errors import InvalidArgument

from .blocking import BlockingRule
from .normalise import NORMALISER_NAMES, Normaliser, get_normaliser

KINDS = ("damerau_levenshtein", "date", "email", "exact", "jaro_winkler", "levenshtein", "numeric")
DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "exact": (),
    "jaro_winkler": (0.92, 0.8),
    "levenshtein": (1, 2),
    "damerau_levenshtein": (1, 2),
    "email": (0.88,),
    "date": (365,),
    "numeric": (1,),
}
DEFAULT_NORMALISER = {
    "exact": "text",
    "jaro_winkler": "text",
    "levenshtein": "text",
    "damerau_levenshtein": "text",
    "email": "email",
    "date": "date",
    "numeric": "number",
}
_STRING_KINDS = ("damerau_levenshtein", "exact", "jaro_winkler", "levenshtein")
_COMPARISON_KEYS = (
    "name",
    "field",
    "kind",
    "thresholds",
    "normalise",
    "nicknames",
    "swap_field",
    "region",
    "shareable",
    "term_frequencies",
)
_EM_KEYS = ("max_iterations", "tolerance", "u_sample_pairs", "seed")
_TOP_LEVEL_KEYS = (
    "comparisons",
    "blocking_rules",
    "upper_threshold",
    "lower_threshold",
    "prior_match_probability",
    "max_block_size",
    "em",
    "link_type",
)
LINK_TYPES = ("dedupe", "link_only")


@dataclass(frozen=True)
class ComparisonSpec:
    """One comparison: `field` compared by `kind` with kind-specific `thresholds`.

    thresholds: jaro_winkler/email similarities (descending, in (0, 1]); levenshtein and
    damerau_levenshtein (a transposition of neighbours is one edit) maximum edit distances and date maximum day differences (ascending positive integers); numeric maximum absolute
    differences (ascending, >= 0). `nicknames` adds a name-variant level (bob/robert); `swap_field` adds
    a level for values entered in the other field (first and last name swapped). `shareable` marks a
    field different people often have in common (a household's address or landline, a family surname):
    how often non-matches agree on it is then learned among the candidate pairs instead of taken from
    random pairs, which keeps housemates from looking like one person. `term_frequencies` weighs an exact
    agreement by how common the value is (a shared rare surname says more than a shared "smith"): the
    frequencies come from the records the matcher was fitted on (or given to `Matcher.count_terms`) and
    are not saved with the parameters, since a list of names and how often they occur is personal data.
    """

    field: str
    kind: str
    thresholds: tuple[float, ...] = ()
    name: str = ""
    normalise: str = ""
    nicknames: bool = False
    swap_field: str | None = None
    region: str | None = None
    shareable: bool = False
    term_frequencies: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "field": self.field, "kind": self.kind}
        data["thresholds"] = list(self.thresholds)
        data["normalise"] = self.normalise
        if self.nicknames:
            data["nicknames"] = True
        if self.swap_field:
            data["swap_field"] = self.swap_field
        if self.region:
            data["region"] = self.region
        if self.shareable:
            data["shareable"] = True
        if self.term_frequencies:
            data["term_frequencies"] = True
        return data


@dataclass(frozen=True)
class EmSettings:
    """Expectation-maximisation: iteration cap, convergence tolerance (largest change of any m or of λ),
    random pairs sampled to estimate u, and the seed that makes fitting deterministic."""

    # EM runs until the largest change is below tolerance; the cap only stops a fit that never settles.
    max_iterations: int = 10_000
    tolerance: float = 1e-5
    u_sample_pairs: int = 300_000
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_iterations": self.max_iterations,
            "tolerance": self.tolerance,
            "u_sample_pairs": self.u_sample_pairs,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class MatchConfig:
    """A validated matching configuration; build it with `from_dict`."""

    comparisons: tuple[ComparisonSpec, ...]
    blocking_rules: tuple[BlockingRule, ...]
    upper_threshold: float = 0.95
    lower_threshold: float = 0.6
    # λ: prior probability that a candidate pair is a match; None = estimate it by EM in fit().
    prior_match_probability: float | None = None
    # Blocks bigger than this (a shared call-centre phone, a placeholder e-mail) are skipped: a value
    # that hundreds of records share is no evidence, and its pairs would grow quadratically.
    max_block_size: int = 1000
    em: EmSettings = field(default_factory=EmSettings)
    # "dedupe": any two records may be the same person. "link_only": records carry a "source" (two files,
    # a CRM and an app) and only pairs across sources are candidates; duplicates within one are not sought.
    link_type: str = "dedupe"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MatchConfig:
        if not isinstance(data, Mapping):
            raise InvalidArgument("config", f"must be an object with {', '.join(_TOP_LEVEL_KEYS)}")
        _reject_unknown_keys(data, _TOP_LEVEL_KEYS, "")
        comparisons = _parse_comparisons(data.get("comparisons"))
        blocking_rules = _parse_blocking_rules(data.get("blocking_rules"))
        upper = _probability(data.get("upper_threshold", 0.95), "upper_threshold")
        lower = _probability(data.get("lower_threshold", 0.6), "lower_threshold")
        if lower > upper:
            raise InvalidArgument("lower_threshold", f"must not exceed upper_threshold ({upper}), got {lower}")
        prior = data.get("prior_match_probability")
        if prior is not None:
            prior = _probability(prior, "prior_match_probability", allow_one=False)
        max_block_size = _integer(data.get("max_block_size", 1000), "max_block_size", minimum=2)
        link_type = data.get("link_type", "dedupe")
        if link_type not in LINK_TYPES:
            raise InvalidArgument("link_type", f"must be one of {', '.join(LINK_TYPES)}, got {link_type!r}")
        return cls(
            link_type=link_type,
            comparisons=comparisons,
            blocking_rules=blocking_rules,
            upper_threshold=upper,
            lower_threshold=lower,
            prior_match_probability=prior,
            max_block_size=max_block_size,
            em=_parse_em(data.get("em", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "comparisons": [spec.to_dict() for spec in self.comparisons],
            "blocking_rules": [rule.text for rule in self.blocking_rules],
            "upper_threshold": self.upper_threshold,
            "lower_threshold": self.lower_threshold,
            "prior_match_probability": self.prior_match_probability,
            "max_block_size": self.max_block_size,
            "em": self.em.to_dict(),
        } | ({"link_type": self.link_type} if self.link_type != "dedupe" else {})

    def normalisers(self) -> dict[str, Normaliser]:
        """The normaliser of every field that is compared or blocked on (text for blocking-only fields)."""
        normalisers: dict[str, Normaliser] = {}
        for spec in self.comparisons:
            normalisers.setdefault(spec.field, get_normaliser(spec.normalise, region=spec.region))
        fields_by_spec = {spec.field: spec for spec in self.comparisons}
        for spec in self.comparisons:
            if spec.swap_field and spec.swap_field not in normalisers:
                # A swap field is compared against this field, so it must be normalised the same way.
                normalisers[spec.swap_field] = get_normaliser(spec.normalise, region=spec.region)
        for rule in self.blocking_rules:
            for name in rule.fields:
                if name not in fields_by_spec:
                    normalisers.setdefault(name, get_normaliser("text"))
        return normalisers


def _reject_unknown_keys(data: Mapping[str, Any], valid: tuple[str, ...], prefix: str) -> None:
    for key in data:
        if key not in valid:
            raise InvalidArgument(f"{prefix}{key}", f"unknown option; valid options: {', '.join(valid)}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _probability(value: object, path: str, *, allow_one: bool = True) -> float:
    upper_ok = (lambda v: v <= 1) if allow_one else (lambda v: v < 1)
    if not _is_number(value) or not (value > 0 and upper_ok(value)):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise InvalidArgument(path, f"must be a probability in {bound}, got {value!r}")
    return float(value)


def _integer(value: object, path: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgument(path, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_comparisons(raw: object) -> tuple[ComparisonSpec, ...]:
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidArgument("comparisons", "must be a non-empty list of comparisons ({field, kind, thresholds})")
    specs = [_parse_comparison(item, f"comparisons[{position}]") for position, item in enumerate(raw)]
    seen_names: dict[str, int] = {}
    normaliser_by_field: dict[str, tuple[str, str | None, int]] = {}
    for position, spec in enumerate(specs):
        if spec.name in seen_names:
            raise InvalidArgument(
                f"comparisons[{position}].name",
                f"{spec.name!r} is already used by comparisons[{seen_names[spec.name]}]; "
                "give each comparison of the same field its own name",
            )
        seen_names[spec.name] = position
        earlier = normaliser_by_field.setdefault(spec.field, (spec.normalise, spec.region, position))
        if earlier[:2] != (spec.normalise, spec.region):
            raise InvalidArgument(
                f"comparisons[{position}].normalise",
                f"field {spec.field!r} is normalised as {earlier[0]!r} by comparisons[{earlier[2]}]; "
                "a field has one normalisation, use the same one",
            )
    for position, spec in enumerate(specs):
        swap = normaliser_by_field.get(spec.swap_field or "")
        if swap is not None and swap[:2] != (spec.normalise, spec.region):
            raise InvalidArgument(
                f"comparisons[{position}].swap_field",
                f"{spec.swap_field!r} is normalised as {swap[0]!r} but {spec.field!r} as {spec.normalise!r}; "
                "swapped fields must be normalised the same way",
            )
    return tuple(specs)


def _parse_comparison(raw: object, path: str) -> ComparisonSpec:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(path, "must be an object with field, kind and optional thresholds")
    _reject_unknown_keys(raw, _COMPARISON_KEYS, f"{path}.")
    field_name = raw.get("field")
    if not isinstance(field_name, str) or not field_name or field_name == "id":
        raise InvalidArgument(f"{path}.field", f"must name a record field (not 'id'), got {field_name!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise InvalidArgument(f"{path}.kind", f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    thresholds = _parse_thresholds(kind, raw.get("thresholds", DEFAULT_THRESHOLDS[kind]), f"{path}.thresholds")
    name = raw.get("name", field_name)
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{path}.name", f"must be a non-empty string, got {name!r}")
    normalise = raw.get("normalise", DEFAULT_NORMALISER[kind])
    if normalise not in NORMALISER_NAMES:
        raise InvalidArgument(
            f"{path}.normalise", f"unknown normaliser {normalise!r}; valid: {', '.join(NORMALISER_NAMES)}"
        )
    if kind in ("date", "numeric") and normalise != DEFAULT_NORMALISER[kind]:
        raise InvalidArgument(f"{path}.normalise", f"a {kind} comparison needs normalise {DEFAULT_NORMALISER[kind]!r}")
    nicknames = raw.get("nicknames", False)
    if not isinstance(nicknames, bool):
        raise InvalidArgument(f"{path}.nicknames", f"must be true or false, got {nicknames!r}")
    if nicknames and kind not in _STRING_KINDS:
        raise InvalidArgument(f"{path}.nicknames", f"only for kinds {', '.join(_STRING_KINDS)}, not {kind!r}")
    swap_field = raw.get("swap_field")
    if swap_field is not None:
        if not isinstance(swap_field, str) or not swap_field or swap_field in (field_name, "id"):
            raise InvalidArgument(
                f"{path}.swap_field", f"must name another record field, e.g. 'last_name', got {swap_field!r}"
            )
        if kind not in _STRING_KINDS:
            raise InvalidArgument(f"{path}.swap_field", f"only for kinds {', '.join(_STRING_KINDS)}, not {kind!r}")
    term_frequencies = raw.get("term_frequencies", False)
    if not isinstance(term_frequencies, bool):
        raise InvalidArgument(f"{path}.term_frequencies", f"must be true or false, got {term_frequencies!r}")
    if term_frequencies and kind not in _STRING_KINDS:
        raise InvalidArgument(f"{path}.term_frequencies", f"only for kinds {', '.join(_STRING_KINDS)}, not {kind!r}")
    shareable = raw.get("shareable", False)
    if not isinstance(shareable, bool):
        raise InvalidArgument(f"{path}.shareable", f"must be true or false, got {shareable!r}")
    region = raw.get("region")
    if region is not None:
        if normalise != "phone":
            raise InvalidArgument(f"{path}.region", "only applies with normalise 'phone'")
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise InvalidArgument(
                f"{path}.region", f"must be an ISO 3166 region code like 'US' or 'DE', got {region!r}"
            )
    return ComparisonSpec(
        field=field_name,
        kind=kind,
        thresholds=thresholds,
        name=name,
        normalise=normalise,
        nicknames=nicknames,
        swap_field=swap_field,
        region=region,
        shareable=shareable,
        term_frequencies=term_frequencies,
    )


def _parse_thresholds(kind: str, raw: object, path: str) -> tuple[float, ...]:
    if not isinstance(raw, list | tuple) or not all(_is_number(value) for value in raw):
        raise InvalidArgument(path, f"must be a list of numbers, got {raw!r}")
    values = tuple(raw)
    if kind == "exact":
        if values:
            raise InvalidArgument(path, "an exact comparison takes no thresholds; use jaro_winkler or levenshtein")
        return ()
    if not values:
        raise InvalidArgument(
            path, f"a {kind} comparison needs at least one threshold, e.g. {list(DEFAULT_THRESHOLDS[kind])}"
        )
    if kind in ("jaro_winkler", "email"):
        if not all(0 < v <= 1 for v in values) or list(values) != sorted(set(values), reverse=True):
            raise InvalidArgument(
                path, f"similarities must be distinct, in (0, 1] and descending, e.g. [0.92, 0.8]; got {list(values)}"
            )
        return tuple(float(v) for v in values)
    if kind in ("levenshtein", "damerau_levenshtein", "date"):
        unit = "day differences" if kind == "date" else "edit distances"
        if not all(float(v).is_integer() and v >= 1 for v in values) or list(values) != sorted(set(values)):
            raise InvalidArgument(
                path, f"{unit} must be distinct positive integers, ascending, e.g. [1, 2]; got {list(values)}"
            )
        return tuple(int(v) for v in values)
    if not all(v >= 0 for v in values) or list(values) != sorted(set(values)):
        raise InvalidArgument(
            path, f"differences must be distinct, >= 0 and ascending, e.g. [1, 5]; got {list(values)}"
        )
    return tuple(float(v) for v in values)


def _parse_blocking_rules(raw: object) -> tuple[BlockingRule, ...]:
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidArgument(
            "blocking_rules", "must be a non-empty list of rules like 'email' or 'first_name[0:1]+last_name+zip'"
        )
    rules = []
    for position, text in enumerate(raw):
        try:
            rules.append(BlockingRule.parse(text))
        except ValueError as error:
            raise InvalidArgument(f"blocking_rules[{position}]", str(error)) from None
    return tuple(rules)


def _parse_em(raw: object) -> EmSettings:
    if not isinstance(raw, Mapping):
        raise InvalidArgument("em", f"must be an object with {', '.join(_EM_KEYS)}")
    _reject_unknown_keys(raw, _EM_KEYS, "em.")
    defaults = EmSettings()
    tolerance = raw.get("tolerance", defaults.tolerance)
    if not _is_number(tolerance) or not 0 < tolerance < 1:
        raise InvalidArgument("em.tolerance", f"must be a number in (0, 1), got {tolerance!r}")
    seed = raw.get("seed", defaults.seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InvalidArgument("em.seed", f"must be a non-negative integer, got {seed!r}")
    return EmSettings(
        max_iterations=_integer(raw.get("max_iterations", defaults.max_iterations), "em.max_iterations", minimum=1),
        tolerance=float(tolerance),
        u_sample_pairs=_integer(raw.get("u_sample_pairs", defaults.u_sample_pairs), "em.u_sample_pairs", minimum=1000),
        seed=seed,
    )


DEFAULT_PERSON_CONFIG = MatchConfig.from_dict(
    {
        "comparisons": [
            {
                "field": "first_name",
                "kind": "jaro_winkler",
                "thresholds": [0.92, 0.8],
                "normalise": "name",
                "nicknames": True,
                "swap_field": "last_name",
            },
            {
                "field": "last_name",
                "kind": "jaro_winkler",
                "thresholds": [0.92, 0.8],
                "normalise": "name",
                "swap_field": "first_name",
                "shareable": True,
            },
            {"field": "email", "kind": "email", "thresholds": [0.88]},
            {
                "field": "phone",
                "kind": "levenshtein",
                "thresholds": [1],
                "normalise": "phone",
                "region": "US",
                "shareable": True,
            },
            {"field": "dob", "kind": "date", "thresholds": [365]},
            {"field": "city", "kind": "jaro_winkler", "thresholds": [0.9], "normalise": "name", "shareable": True},
            {"field": "zip", "kind": "levenshtein", "thresholds": [1], "normalise": "digits", "shareable": True},
            {
                "field": "address",
                "kind": "jaro_winkler",
                "thresholds": [0.92, 0.8],
                "normalise": "address",
                "shareable": True,
            },
        ],
        "blocking_rules": [
            "email",
            "phone",
            "last_name+dob",
            "first_name[0:1]+last_name[0:3]+zip",
        ],
        "upper_threshold": 0.95,
        "lower_threshold": 0.6,
    }
)
"""Person records: first_name, last_name, email, phone, dob (ISO date), city, zip, address."""
