"""What a model says about itself: the spec kept inside its ONNX file.

The training pipeline writes one JSON document under the ONNX metadata key `cdp.model`:

    {"name": "churn_risk", "version": "1.1.0", "owner": "cdp", "description": "...",
     "input": "features",
     "features": [{"name": "sessions_30d", "path": "computed.sessions_30d", "transform": "number", "default": 0},
                  {"name": "days_since_last_session", "path": "computed.last_session_at",
                   "transform": "days_since", "default": null},
                  {"name": "plan", "path": "traits.plan", "transform": "category",
                   "categories": ["free", "plus", "pro"], "default": -1}],
     "outputs": [{"score": "churn_risk", "output": "probabilities", "index": 1,
                  "meaning": "P(no activity in the 60 days after the next 30)"}],
     "computed_traits": [{"name": "sessions_30d", "op": "count", "event_type": "any", "window": "30d",
                          "event_names": ["Home", "Catalog", "Product", ...]}, ...],
     "training": {...}, "quality": {"auc": 0.90, ...},
     "test_vector": {"features": [...], "expected": {"churn_risk": 0.12}, "tolerance": 1e-4}}

Feature paths name profile fields: `traits.<name>`, `computed.<name>`, `consent.<purpose:X|channel:x>`
and `scores.<name>` (another model's score). No model needs glue code: the spec is the glue.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.errors import InvalidArgument

METADATA_KEY = "cdp.model"
TRANSFORMS = ("number", "bool", "days_since", "category")
PATH_ROOTS = ("traits", "computed", "consent", "scores")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
_SPEC_KEYS = (
    "name",
    "version",
    "owner",
    "description",
    "input",
    "features",
    "outputs",
    "computed_traits",
    "training",
    "quality",
    "test_vector",
)
_FEATURE_KEYS = ("name", "path", "transform", "default", "categories")
_OUTPUT_KEYS = ("score", "output", "index", "meaning")


def _check_keys(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            raise InvalidArgument(f"{where}{key}", f"unknown key; known: {', '.join(known)}")


def _name(value: Any, field_name: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidArgument(
            field_name, f"{value!r} is not a valid {what}: use a lower-case letter, then letters, digits or '_'"
        )
    return value


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One input column: where its value comes from, how it becomes a number, what stands in when missing."""

    name: str
    path: str
    transform: str = "number"
    # None: NaN (tree models route missing values themselves). A category's default may be its name.
    default: float | str | None = 0.0
    categories: tuple[str, ...] = ()

    @property
    def root(self) -> str:
        return self.path.split(".", 1)[0]

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FeatureSpec:
        if not isinstance(data, Mapping):
            raise InvalidArgument(where, f"{data!r} must be an object with 'name' and 'path'")
        _check_keys(data, _FEATURE_KEYS, f"{where}.")
        name = _name(data.get("name"), f"{where}.name", "feature name")
        path = data.get("path")
        if not isinstance(path, str) or "." not in path or path.split(".", 1)[0] not in PATH_ROOTS:
            raise InvalidArgument(
                f"{where}.path",
                f"{path!r} is not a profile field: use traits.<name>, computed.<name>, consent.<key> or scores.<name>",
            )
        if not path.split(".", 1)[1]:
            raise InvalidArgument(f"{where}.path", f"{path!r} names no field after {path.split('.', 1)[0]!r}")
        transform = data.get("transform", "number")
        if transform not in TRANSFORMS:
            raise InvalidArgument(f"{where}.transform", f"{transform!r} is not one of {', '.join(TRANSFORMS)}")
        categories = data.get("categories", ())
        if transform == "category":
            if (
                not isinstance(categories, list | tuple)
                or not categories
                or not all(isinstance(c, str) for c in categories)
            ):
                raise InvalidArgument(f"{where}.categories", "a category feature needs a non-empty list of strings")
            if len(set(categories)) != len(categories):
                raise InvalidArgument(f"{where}.categories", "lists a category twice")
        elif categories:
            raise InvalidArgument(
                f"{where}.categories", f"only transform 'category' takes categories, not {transform!r}"
            )
        default = data.get("default", 0.0)
        if isinstance(default, bool):
            default = float(default)
        if isinstance(default, str):
            if transform != "category" or default not in categories:
                raise InvalidArgument(
                    f"{where}.default", f"{default!r} must be a number or null (or, for a category, one of its names)"
                )
        elif default is not None and (not isinstance(default, int | float) or not math.isfinite(default)):
            raise InvalidArgument(f"{where}.default", f"{default!r} must be a finite number or null")
        return cls(
            name=name,
            path=path,
            transform=transform,
            default=None if default is None else default if isinstance(default, str) else float(default),
            categories=tuple(categories),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "path": self.path, "transform": self.transform}
        out["default"] = self.default
        if self.categories:
            out["categories"] = list(self.categories)
        return out


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One score: column `index` of ONNX output `output` (the whole tensor when it is 1-D)."""

    score: str
    output: str
    index: int = 0
    meaning: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OutputSpec:
        if not isinstance(data, Mapping):
            raise InvalidArgument(where, f"{data!r} must be an object with 'score' and 'output'")
        _check_keys(data, _OUTPUT_KEYS, f"{where}.")
        score = _name(data.get("score"), f"{where}.score", "score name")
        output = data.get("output")
        if not isinstance(output, str) or not output:
            raise InvalidArgument(f"{where}.output", f"{output!r} must name an output tensor of the model")
        index = data.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidArgument(f"{where}.index", f"{index!r} must be a column number, 0 or more")
        meaning = data.get("meaning", "")
        if not isinstance(meaning, str):
            raise InvalidArgument(f"{where}.meaning", f"{meaning!r} must be text")
        return cls(score=score, output=output, index=index, meaning=meaning)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "output": self.output, "index": self.index, "meaning": self.meaning}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str
    features: tuple[FeatureSpec, ...]
    outputs: tuple[OutputSpec, ...]
    input: str = "features"
    owner: str = ""
    description: str = ""
    computed_traits: tuple[Mapping[str, Any], ...] = ()
    training: Mapping[str, Any] = field(default_factory=dict)
    quality: Mapping[str, Any] = field(default_factory=dict)
    test_vector: Mapping[str, Any] | None = None

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(f.path for f in self.features)

    @property
    def score_names(self) -> tuple[str, ...]:
        return tuple(o.score for o in self.outputs)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        if not isinstance(data, Mapping):
            raise InvalidArgument("spec", f"the model spec must be a JSON object, not {type(data).__name__}")
        _check_keys(data, _SPEC_KEYS, "spec.")
        name = _name(data.get("name"), "spec.name", "model name")
        version = data.get("version")
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise InvalidArgument("spec.version", f"{version!r} must be a version like '1.2.0' (letters, digits, ._+-)")
        raw_features = data.get("features")
        if not isinstance(raw_features, list) or not raw_features:
            raise InvalidArgument("spec.features", "must list the model's input features, in input order")
        features = tuple(FeatureSpec.from_dict(f, f"spec.features[{i}]") for i, f in enumerate(raw_features))
        seen: set[str] = set()
        for i, feature in enumerate(features):
            if feature.name in seen:
                raise InvalidArgument(f"spec.features[{i}].name", f"{feature.name!r} is listed twice")
            seen.add(feature.name)
        raw_outputs = data.get("outputs")
        if not isinstance(raw_outputs, list) or not raw_outputs:
            raise InvalidArgument("spec.outputs", "must list at least one score the model produces")
        outputs = tuple(OutputSpec.from_dict(o, f"spec.outputs[{i}]") for i, o in enumerate(raw_outputs))
        scores: set[str] = set()
        for i, output in enumerate(outputs):
            if output.score in scores:
                raise InvalidArgument(f"spec.outputs[{i}].score", f"{output.score!r} is produced twice")
            scores.add(output.score)
        for i, feature in enumerate(features):
            if feature.root == "scores" and feature.path.split(".", 1)[1] in scores:
                raise InvalidArgument(
                    f"spec.features[{i}].path",
                    f"{feature.path!r} is the model's own output: a model cannot read itself",
                )
        model_input = data.get("input", "features")
        if not isinstance(model_input, str) or not model_input:
            raise InvalidArgument("spec.input", f"{model_input!r} must name the model's input tensor")
        computed = data.get("computed_traits", [])
        if not isinstance(computed, list) or not all(isinstance(c, Mapping) and "name" in c for c in computed):
            raise InvalidArgument(
                "spec.computed_traits", "must be a list of profile computed-trait definitions (objects with 'name')"
            )
        defined = {c["name"] for c in computed}
        for i, feature in enumerate(features):
            # A computed trait the spec declares must be the one the feature reads; others may be defined
            # on the profile service by hand, so only a mismatch in what the spec itself says is an error.
            if feature.root == "computed" and defined and feature.path.split(".", 1)[1] not in defined:
                raise InvalidArgument(
                    f"spec.features[{i}].path",
                    f"{feature.path!r} reads a computed trait the spec's computed_traits do not define",
                )
        for key in ("owner", "description"):
            if not isinstance(data.get(key, ""), str):
                raise InvalidArgument(f"spec.{key}", "must be text")
        for key in ("training", "quality"):
            if not isinstance(data.get(key, {}), Mapping):
                raise InvalidArgument(f"spec.{key}", "must be an object")
        test_vector = data.get("test_vector")
        if test_vector is not None:
            _check_test_vector(test_vector, len(features), scores)
        return cls(
            name=name,
            version=version,
            features=features,
            outputs=outputs,
            input=model_input,
            owner=data.get("owner", ""),
            description=data.get("description", ""),
            computed_traits=tuple(dict(c) for c in computed),
            training=dict(data.get("training", {})),
            quality=dict(data.get("quality", {})),
            test_vector=test_vector,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument("spec", f"the '{METADATA_KEY}' metadata is not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> ModelSpec:
        text = props.get(METADATA_KEY)
        if text is None:
            raise InvalidArgument(
                "onnx",
                f"the model carries no '{METADATA_KEY}' metadata: add the spec (name, version, features, outputs) "
                "to the ONNX metadata_props",
            )
        return cls.from_json(text)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "owner": self.owner,
            "description": self.description,
            "input": self.input,
            "features": [f.to_dict() for f in self.features],
            "outputs": [o.to_dict() for o in self.outputs],
            "computed_traits": [dict(c) for c in self.computed_traits],
            "training": dict(self.training),
            "quality": dict(self.quality),
        }
        if self.test_vector is not None:
            out["test_vector"] = dict(self.test_vector)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _check_test_vector(data: Any, width: int, scores: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise InvalidArgument("spec.test_vector", "must be an object with 'features' and 'expected'")
    _check_keys(data, ("features", "expected", "tolerance"), "spec.test_vector.")
    values = data.get("features")
    if (
        not isinstance(values, list)
        or len(values) != width
        or not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values)
    ):
        raise InvalidArgument("spec.test_vector.features", f"must be a list of {width} numbers (null for missing)")
    expected = data.get("expected", {})
    if not isinstance(expected, Mapping) or any(k not in scores for k in expected):
        raise InvalidArgument(
            "spec.test_vector.expected", f"must map score names ({', '.join(sorted(scores))}) to expected values"
        )
    tolerance = data.get("tolerance", 1e-4)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
        raise InvalidArgument("spec.test_vector.tolerance", f"{tolerance!r} must be a number, 0 or more")
