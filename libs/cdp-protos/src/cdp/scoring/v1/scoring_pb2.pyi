import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_LIVE: _ClassVar[Role]
    ROLE_SHADOW: _ClassVar[Role]
    ROLE_CANARY: _ClassVar[Role]
    ROLE_INACTIVE: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_LIVE: Role
ROLE_SHADOW: Role
ROLE_CANARY: Role
ROLE_INACTIVE: Role

class Feature(_message.Message):
    __slots__ = ("name", "path", "transform", "default", "categories")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    transform: str
    default: _struct_pb2.Value
    categories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., transform: _Optional[str] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., categories: _Optional[_Iterable[str]] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("score", "output", "index", "meaning")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MEANING_FIELD_NUMBER: _ClassVar[int]
    score: str
    output: str
    index: int
    meaning: str
    def __init__(self, score: _Optional[str] = ..., output: _Optional[str] = ..., index: _Optional[int] = ..., meaning: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "version", "owner", "description", "input", "features", "outputs", "computed_traits", "training", "quality")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TRAITS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    owner: str
    description: str
    input: str
    features: _containers.RepeatedCompositeFieldContainer[Feature]
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    computed_traits: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    training: _struct_pb2.Struct
    quality: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., owner: _Optional[str] = ..., description: _Optional[str] = ..., input: _Optional[str] = ..., features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ..., computed_traits: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., training: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., quality: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("spec", "role", "canary_percent", "deployed_at", "sha256", "size_bytes", "rows_scored", "mean_abs_diff_to_live")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_AT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROWS_SCORED_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_DIFF_TO_LIVE_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    role: Role
    canary_percent: float
    deployed_at: _timestamp_pb2.Timestamp
    sha256: str
    size_bytes: int
    rows_scored: int
    mean_abs_diff_to_live: float
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., role: _Optional[_Union[Role, str]] = ..., canary_percent: _Optional[float] = ..., deployed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., rows_scored: _Optional[int] = ..., mean_abs_diff_to_live: _Optional[float] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "live_version", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    live_version: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, name: _Optional[str] = ..., live_version: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("person_id", "features", "named_features", "model", "version")
    class NamedFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    NAMED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    features: _containers.RepeatedScalarFieldContainer[float]
    named_features: _containers.ScalarMap[str, float]
    model: str
    version: str
    def __init__(self, person_id: _Optional[str] = ..., features: _Optional[_Iterable[float]] = ..., named_features: _Optional[_Mapping[str, float]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelScores(_message.Message):
    __slots__ = ("model", "version", "role", "scores", "features")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    role: Role
    scores: _containers.ScalarMap[str, float]
    features: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., scores: _Optional[_Mapping[str, float]] = ..., features: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("person_id", "results")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    results: _containers.RepeatedCompositeFieldContainer[ModelScores]
    def __init__(self, person_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ModelScores, _Mapping]]] = ...) -> None: ...

class FeatureRow(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("model", "version", "rows", "person_ids", "packed_rows")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_ROWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    rows: _containers.RepeatedCompositeFieldContainer[FeatureRow]
    person_ids: _containers.RepeatedScalarFieldContainer[str]
    packed_rows: bytes
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[FeatureRow, _Mapping]]] = ..., person_ids: _Optional[_Iterable[str]] = ..., packed_rows: _Optional[bytes] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("model", "version", "scores", "values", "missing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    scores: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[float]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., scores: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[float]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreAllRequest(_message.Message):
    __slots__ = ("model", "publish")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    model: str
    publish: bool
    def __init__(self, model: _Optional[str] = ..., publish: _Optional[bool] = ...) -> None: ...

class ScoreAllProgress(_message.Message):
    __slots__ = ("persons_done", "persons_total", "scores_published", "done", "elapsed_seconds")
    PERSONS_DONE_FIELD_NUMBER: _ClassVar[int]
    PERSONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SCORES_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    persons_done: int
    persons_total: int
    scores_published: int
    done: bool
    elapsed_seconds: float
    def __init__(self, persons_done: _Optional[int] = ..., persons_total: _Optional[int] = ..., scores_published: _Optional[int] = ..., done: _Optional[bool] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeployModelRequest(_message.Message):
    __slots__ = ("onnx", "role", "canary_percent")
    ONNX_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    onnx: bytes
    role: Role
    canary_percent: float
    def __init__(self, onnx: _Optional[bytes] = ..., role: _Optional[_Union[Role, str]] = ..., canary_percent: _Optional[float] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ScoresUpdatedBatch(_message.Message):
    __slots__ = ("model", "version", "scores", "person_ids", "values", "at_ms", "more")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    scores: _containers.RepeatedScalarFieldContainer[str]
    person_ids: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[float]
    at_ms: _containers.RepeatedScalarFieldContainer[int]
    more: _containers.RepeatedCompositeFieldContainer[ScoresUpdatedBatch]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., scores: _Optional[_Iterable[str]] = ..., person_ids: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[float]] = ..., at_ms: _Optional[_Iterable[int]] = ..., more: _Optional[_Iterable[_Union[ScoresUpdatedBatch, _Mapping]]] = ...) -> None: ...

class TrainModelRequest(_message.Message):
    __slots__ = ("model", "cutoff", "evaluate_at", "margin", "label")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_AT_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    cutoff: str
    evaluate_at: str
    margin: float
    label: _struct_pb2.Struct
    def __init__(self, model: _Optional[str] = ..., cutoff: _Optional[str] = ..., evaluate_at: _Optional[str] = ..., margin: _Optional[float] = ..., label: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("phase", "rows", "percent", "message", "elapsed_seconds", "done", "version", "role", "promoted", "reason", "decision")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    rows: int
    percent: float
    message: str
    elapsed_seconds: float
    done: bool
    version: str
    role: Role
    promoted: bool
    reason: str
    decision: _struct_pb2.Struct
    def __init__(self, phase: _Optional[str] = ..., rows: _Optional[int] = ..., percent: _Optional[float] = ..., message: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ..., done: _Optional[bool] = ..., version: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., promoted: _Optional[bool] = ..., reason: _Optional[str] = ..., decision: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GetDriftRequest(_message.Message):
    __slots__ = ("model", "check_now")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHECK_NOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    check_now: bool
    def __init__(self, model: _Optional[str] = ..., check_now: _Optional[bool] = ...) -> None: ...

class DriftValue(_message.Message):
    __slots__ = ("name", "kind", "psi", "aged")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    AGED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    psi: float
    aged: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., psi: _Optional[float] = ..., aged: _Optional[bool] = ...) -> None: ...

class ModelDrift(_message.Message):
    __slots__ = ("model", "version", "role", "status", "threshold", "rows", "pending_rows", "reference_rows", "since", "checked_at", "values")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PENDING_ROWS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    role: Role
    status: str
    threshold: float
    rows: int
    pending_rows: int
    reference_rows: int
    since: _timestamp_pb2.Timestamp
    checked_at: _timestamp_pb2.Timestamp
    values: _containers.RepeatedCompositeFieldContainer[DriftValue]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., status: _Optional[str] = ..., threshold: _Optional[float] = ..., rows: _Optional[int] = ..., pending_rows: _Optional[int] = ..., reference_rows: _Optional[int] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., values: _Optional[_Iterable[_Union[DriftValue, _Mapping]]] = ...) -> None: ...

class GetDriftResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelDrift]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelDrift, _Mapping]]] = ...) -> None: ...

class DriftAlert(_message.Message):
    __slots__ = ("drift", "over", "retrain_started", "newly_drifted")
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    OVER_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_STARTED_FIELD_NUMBER: _ClassVar[int]
    NEWLY_DRIFTED_FIELD_NUMBER: _ClassVar[int]
    drift: ModelDrift
    over: _containers.RepeatedCompositeFieldContainer[DriftValue]
    retrain_started: bool
    newly_drifted: bool
    def __init__(self, drift: _Optional[_Union[ModelDrift, _Mapping]] = ..., over: _Optional[_Iterable[_Union[DriftValue, _Mapping]]] = ..., retrain_started: _Optional[bool] = ..., newly_drifted: _Optional[bool] = ...) -> None: ...

class GetModelQualityRequest(_message.Message):
    __slots__ = ("name", "refresh")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    name: str
    refresh: bool
    def __init__(self, name: _Optional[str] = ..., refresh: _Optional[bool] = ...) -> None: ...

class ModelQuality(_message.Message):
    __slots__ = ("model", "version", "training", "realised", "computed_at", "trigger", "labelled_rows", "stale_since", "stale_trigger")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    REALISED_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    LABELLED_ROWS_FIELD_NUMBER: _ClassVar[int]
    STALE_SINCE_FIELD_NUMBER: _ClassVar[int]
    STALE_TRIGGER_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    training: _struct_pb2.Struct
    realised: _struct_pb2.Struct
    computed_at: _timestamp_pb2.Timestamp
    trigger: str
    labelled_rows: int
    stale_since: _timestamp_pb2.Timestamp
    stale_trigger: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., training: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., realised: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., computed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trigger: _Optional[str] = ..., labelled_rows: _Optional[int] = ..., stale_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stale_trigger: _Optional[str] = ...) -> None: ...

class ExplainScoreRequest(_message.Message):
    __slots__ = ("model", "person_id", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    person_id: str
    version: str
    def __init__(self, model: _Optional[str] = ..., person_id: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("name", "path", "missing", "contribution", "baseline")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    missing: bool
    contribution: float
    baseline: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., missing: _Optional[bool] = ..., contribution: _Optional[float] = ..., baseline: _Optional[str] = ...) -> None: ...

class ExplainedScore(_message.Message):
    __slots__ = ("score", "value", "baseline_value", "features")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VALUE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    score: str
    value: float
    baseline_value: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    def __init__(self, score: _Optional[str] = ..., value: _Optional[float] = ..., baseline_value: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ...) -> None: ...

class ExplainScoreResponse(_message.Message):
    __slots__ = ("model", "version", "role", "person_id", "scores", "evaluated_at")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    role: Role
    person_id: str
    scores: _containers.RepeatedCompositeFieldContainer[ExplainedScore]
    evaluated_at: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., person_id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[ExplainedScore, _Mapping]]] = ..., evaluated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
