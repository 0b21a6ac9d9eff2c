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

class SegmentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEGMENT_STATE_UNSPECIFIED: _ClassVar[SegmentState]
    SEGMENT_STATE_BUILDING: _ClassVar[SegmentState]
    SEGMENT_STATE_LIVE: _ClassVar[SegmentState]
    SEGMENT_STATE_FAILED: _ClassVar[SegmentState]

class ConditionResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONDITION_RESULT_UNSPECIFIED: _ClassVar[ConditionResult]
    CONDITION_RESULT_TRUE: _ClassVar[ConditionResult]
    CONDITION_RESULT_FALSE: _ClassVar[ConditionResult]
    CONDITION_RESULT_MISSING: _ClassVar[ConditionResult]
    CONDITION_RESULT_UNKNOWN: _ClassVar[ConditionResult]
SEGMENT_STATE_UNSPECIFIED: SegmentState
SEGMENT_STATE_BUILDING: SegmentState
SEGMENT_STATE_LIVE: SegmentState
SEGMENT_STATE_FAILED: SegmentState
CONDITION_RESULT_UNSPECIFIED: ConditionResult
CONDITION_RESULT_TRUE: ConditionResult
CONDITION_RESULT_FALSE: ConditionResult
CONDITION_RESULT_MISSING: ConditionResult
CONDITION_RESULT_UNKNOWN: ConditionResult

class Definition(_message.Message):
    __slots__ = ("text", "tree")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    text: str
    tree: _struct_pb2.Struct
    def __init__(self, text: _Optional[str] = ..., tree: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("id", "name", "description", "text", "tree", "version", "state", "profiles_done", "profiles_total", "size", "depends_on", "computed_traits", "time_dependent", "created_at", "updated_at", "live_at", "error", "warnings")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROFILES_DONE_FIELD_NUMBER: _ClassVar[int]
    PROFILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TRAITS_FIELD_NUMBER: _ClassVar[int]
    TIME_DEPENDENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LIVE_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    text: str
    tree: _struct_pb2.Struct
    version: int
    state: SegmentState
    profiles_done: int
    profiles_total: int
    size: int
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    computed_traits: _containers.RepeatedScalarFieldContainer[str]
    time_dependent: bool
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    live_at: _timestamp_pb2.Timestamp
    error: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., text: _Optional[str] = ..., tree: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., version: _Optional[int] = ..., state: _Optional[_Union[SegmentState, str]] = ..., profiles_done: _Optional[int] = ..., profiles_total: _Optional[int] = ..., size: _Optional[int] = ..., depends_on: _Optional[_Iterable[str]] = ..., computed_traits: _Optional[_Iterable[str]] = ..., time_dependent: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., live_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateSegmentRequest(_message.Message):
    __slots__ = ("id", "name", "description", "definition", "wait")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    definition: Definition
    wait: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., definition: _Optional[_Union[Definition, _Mapping]] = ..., wait: _Optional[bool] = ...) -> None: ...

class UpdateSegmentRequest(_message.Message):
    __slots__ = ("id", "name", "description", "definition")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    definition: Definition
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., definition: _Optional[_Union[Definition, _Mapping]] = ...) -> None: ...

class UpdateSegmentResponse(_message.Message):
    __slots__ = ("segment", "entered", "exited", "sample_entered", "sample_exited")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ENTERED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_EXITED_FIELD_NUMBER: _ClassVar[int]
    segment: Segment
    entered: int
    exited: int
    sample_entered: _containers.RepeatedScalarFieldContainer[str]
    sample_exited: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, segment: _Optional[_Union[Segment, _Mapping]] = ..., entered: _Optional[int] = ..., exited: _Optional[int] = ..., sample_entered: _Optional[_Iterable[str]] = ..., sample_exited: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteSegmentRequest(_message.Message):
    __slots__ = ("id", "force")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    force: bool
    def __init__(self, id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteSegmentResponse(_message.Message):
    __slots__ = ("exited",)
    EXITED_FIELD_NUMBER: _ClassVar[int]
    exited: int
    def __init__(self, exited: _Optional[int] = ...) -> None: ...

class GetSegmentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListSegmentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSegmentsResponse(_message.Message):
    __slots__ = ("segments", "next_page_token")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    next_page_token: str
    def __init__(self, segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("definition",)
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    definition: Definition
    def __init__(self, definition: _Optional[_Union[Definition, _Mapping]] = ...) -> None: ...

class EstimateResponse(_message.Message):
    __slots__ = ("size", "population", "sample", "text", "tree", "computed_traits", "time_dependent", "evaluate_ms", "warnings")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TRAITS_FIELD_NUMBER: _ClassVar[int]
    TIME_DEPENDENT_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_MS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    size: int
    population: int
    sample: _containers.RepeatedScalarFieldContainer[str]
    text: str
    tree: _struct_pb2.Struct
    computed_traits: _containers.RepeatedScalarFieldContainer[str]
    time_dependent: bool
    evaluate_ms: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, size: _Optional[int] = ..., population: _Optional[int] = ..., sample: _Optional[_Iterable[str]] = ..., text: _Optional[str] = ..., tree: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., computed_traits: _Optional[_Iterable[str]] = ..., time_dependent: _Optional[bool] = ..., evaluate_ms: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class ListMembersRequest(_message.Message):
    __slots__ = ("segment_id", "page_size", "page_token")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    segment_id: str
    page_size: int
    page_token: str
    def __init__(self, segment_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("person_id", "since")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    since: _timestamp_pb2.Timestamp
    def __init__(self, person_id: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListMembersResponse(_message.Message):
    __slots__ = ("members", "next_page_token", "total")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    next_page_token: str
    total: int
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class GetMembershipRequest(_message.Message):
    __slots__ = ("person_id",)
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    def __init__(self, person_id: _Optional[str] = ...) -> None: ...

class Membership(_message.Message):
    __slots__ = ("segment_id", "since")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    segment_id: str
    since: _timestamp_pb2.Timestamp
    def __init__(self, segment_id: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetMembershipResponse(_message.Message):
    __slots__ = ("person_id", "segments")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    segments: _containers.RepeatedCompositeFieldContainer[Membership]
    def __init__(self, person_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Membership, _Mapping]]] = ...) -> None: ...

class ListComputedTraitReadersRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Reader(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListComputedTraitReadersResponse(_message.Message):
    __slots__ = ("segments", "journeys", "journeys_checked", "models", "models_checked")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    JOURNEYS_FIELD_NUMBER: _ClassVar[int]
    JOURNEYS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODELS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Reader]
    journeys: _containers.RepeatedCompositeFieldContainer[Reader]
    journeys_checked: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelReader]
    models_checked: bool
    def __init__(self, segments: _Optional[_Iterable[_Union[Reader, _Mapping]]] = ..., journeys: _Optional[_Iterable[_Union[Reader, _Mapping]]] = ..., journeys_checked: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelReader, _Mapping]]] = ..., models_checked: _Optional[bool] = ...) -> None: ...

class ModelReader(_message.Message):
    __slots__ = ("name", "version", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    role: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ExplainMembershipRequest(_message.Message):
    __slots__ = ("segment_id", "person_id")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    segment_id: str
    person_id: str
    def __init__(self, segment_id: _Optional[str] = ..., person_id: _Optional[str] = ...) -> None: ...

class ExplainedCondition(_message.Message):
    __slots__ = ("kind", "text", "result", "fields", "missing", "segment_id", "operands")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OPERANDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    text: str
    result: ConditionResult
    fields: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    segment_id: str
    operands: _containers.RepeatedCompositeFieldContainer[ExplainedCondition]
    def __init__(self, kind: _Optional[str] = ..., text: _Optional[str] = ..., result: _Optional[_Union[ConditionResult, str]] = ..., fields: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., segment_id: _Optional[str] = ..., operands: _Optional[_Iterable[_Union[ExplainedCondition, _Mapping]]] = ...) -> None: ...

class ExplainMembershipResponse(_message.Message):
    __slots__ = ("segment_id", "person_id", "segment_version", "member", "since", "matches", "note", "tree", "evaluated_at")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_FIELD_NUMBER: _ClassVar[int]
    segment_id: str
    person_id: str
    segment_version: int
    member: bool
    since: _timestamp_pb2.Timestamp
    matches: bool
    note: str
    tree: ExplainedCondition
    evaluated_at: _timestamp_pb2.Timestamp
    def __init__(self, segment_id: _Optional[str] = ..., person_id: _Optional[str] = ..., segment_version: _Optional[int] = ..., member: _Optional[bool] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., matches: _Optional[bool] = ..., note: _Optional[str] = ..., tree: _Optional[_Union[ExplainedCondition, _Mapping]] = ..., evaluated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SegmentEvent(_message.Message):
    __slots__ = ("id", "person_id", "segment_id", "entered", "at", "reason", "segment_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    person_id: str
    segment_id: str
    entered: bool
    at: _timestamp_pb2.Timestamp
    reason: str
    segment_version: int
    def __init__(self, id: _Optional[str] = ..., person_id: _Optional[str] = ..., segment_id: _Optional[str] = ..., entered: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., segment_version: _Optional[int] = ...) -> None: ...

class SegmentEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[SegmentEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[SegmentEvent, _Mapping]]] = ...) -> None: ...
