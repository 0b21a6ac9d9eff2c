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

class DeleteMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELETE_MODE_UNSPECIFIED: _ClassVar[DeleteMode]
    DELETE_MODE_DELETE: _ClassVar[DeleteMode]
    DELETE_MODE_SUPPRESS_WITH_DELETE: _ClassVar[DeleteMode]
DELETE_MODE_UNSPECIFIED: DeleteMode
DELETE_MODE_DELETE: DeleteMode
DELETE_MODE_SUPPRESS_WITH_DELETE: DeleteMode

class Provenance(_message.Message):
    __slots__ = ("source", "event_id", "at", "recorded_at")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    source: str
    event_id: str
    at: _timestamp_pb2.Timestamp
    recorded_at: _timestamp_pb2.Timestamp
    def __init__(self, source: _Optional[str] = ..., event_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TraitVersion(_message.Message):
    __slots__ = ("value", "provenance")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    value: _struct_pb2.Value
    provenance: Provenance
    def __init__(self, value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class Trait(_message.Message):
    __slots__ = ("value", "provenance", "history")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    value: _struct_pb2.Value
    provenance: Provenance
    history: _containers.RepeatedCompositeFieldContainer[TraitVersion]
    def __init__(self, value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., history: _Optional[_Iterable[_Union[TraitVersion, _Mapping]]] = ...) -> None: ...

class ConsentVersion(_message.Message):
    __slots__ = ("granted", "provenance")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    provenance: Provenance
    def __init__(self, granted: _Optional[bool] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class Consent(_message.Message):
    __slots__ = ("granted", "provenance", "history")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    provenance: Provenance
    history: _containers.RepeatedCompositeFieldContainer[ConsentVersion]
    def __init__(self, granted: _Optional[bool] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., history: _Optional[_Iterable[_Union[ConsentVersion, _Mapping]]] = ...) -> None: ...

class Score(_message.Message):
    __slots__ = ("value", "model", "version", "at")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    value: float
    model: str
    version: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, value: _Optional[float] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("person_id", "traits", "computed", "consent", "scores", "identifiers", "merged_from", "first_seen", "last_seen", "event_count", "as_of", "groups")
    class TraitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Trait
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Trait, _Mapping]] = ...) -> None: ...
    class ComputedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    class ConsentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Consent
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Consent, _Mapping]] = ...) -> None: ...
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Score
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Score, _Mapping]] = ...) -> None: ...
    class GroupsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Trait
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Trait, _Mapping]] = ...) -> None: ...
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    TRAITS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FROM_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    traits: _containers.MessageMap[str, Trait]
    computed: _containers.MessageMap[str, _struct_pb2.Value]
    consent: _containers.MessageMap[str, Consent]
    scores: _containers.MessageMap[str, Score]
    identifiers: _containers.RepeatedScalarFieldContainer[str]
    merged_from: _containers.RepeatedScalarFieldContainer[str]
    first_seen: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    event_count: int
    as_of: _timestamp_pb2.Timestamp
    groups: _containers.MessageMap[str, Trait]
    def __init__(self, person_id: _Optional[str] = ..., traits: _Optional[_Mapping[str, Trait]] = ..., computed: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., consent: _Optional[_Mapping[str, Consent]] = ..., scores: _Optional[_Mapping[str, Score]] = ..., identifiers: _Optional[_Iterable[str]] = ..., merged_from: _Optional[_Iterable[str]] = ..., first_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event_count: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., groups: _Optional[_Mapping[str, Trait]] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("person_id", "as_of", "include_history")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    as_of: _timestamp_pb2.Timestamp
    include_history: bool
    def __init__(self, person_id: _Optional[str] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., include_history: _Optional[bool] = ...) -> None: ...

class BatchGetProfilesRequest(_message.Message):
    __slots__ = ("person_ids", "include_history")
    PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    person_ids: _containers.RepeatedScalarFieldContainer[str]
    include_history: bool
    def __init__(self, person_ids: _Optional[_Iterable[str]] = ..., include_history: _Optional[bool] = ...) -> None: ...

class BatchGetProfilesResponse(_message.Message):
    __slots__ = ("profiles", "missing")
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[Profile]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, profiles: _Optional[_Iterable[_Union[Profile, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupProfileRequest(_message.Message):
    __slots__ = ("identifier_type", "identifier_value", "as_of", "include_history")
    IDENTIFIER_TYPE_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_VALUE_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    identifier_type: str
    identifier_value: str
    as_of: _timestamp_pb2.Timestamp
    include_history: bool
    def __init__(self, identifier_type: _Optional[str] = ..., identifier_value: _Optional[str] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., include_history: _Optional[bool] = ...) -> None: ...

class TimelineEvent(_message.Message):
    __slots__ = ("event_id", "type", "name", "at", "properties", "source")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    type: str
    name: str
    at: _timestamp_pb2.Timestamp
    properties: _struct_pb2.Struct
    source: str
    def __init__(self, event_id: _Optional[str] = ..., type: _Optional[str] = ..., name: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., properties: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("person_id", "page_size", "page_token", "types", "names")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    page_size: int
    page_token: str
    types: _containers.RepeatedScalarFieldContainer[str]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, person_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TimelineEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[TimelineEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateTraitsRequest(_message.Message):
    __slots__ = ("person_id", "traits", "source", "at", "request_id", "consent")
    class ConsentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    TRAITS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    traits: _struct_pb2.Struct
    source: str
    at: _timestamp_pb2.Timestamp
    request_id: str
    consent: _containers.ScalarMap[str, bool]
    def __init__(self, person_id: _Optional[str] = ..., traits: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., source: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., consent: _Optional[_Mapping[str, bool]] = ...) -> None: ...

class UpdateTraitsResponse(_message.Message):
    __slots__ = ("profile", "changed")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    profile: Profile
    changed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, profile: _Optional[_Union[Profile, _Mapping]] = ..., changed: _Optional[_Iterable[str]] = ...) -> None: ...

class ComputedTraitDefinition(_message.Message):
    __slots__ = ("name", "op", "event_type", "event_names", "property", "where", "window", "compare")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROPERTY_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    COMPARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    event_type: str
    event_names: _containers.RepeatedScalarFieldContainer[str]
    property: str
    where: _struct_pb2.Struct
    window: str
    compare: str
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., event_type: _Optional[str] = ..., event_names: _Optional[_Iterable[str]] = ..., property: _Optional[str] = ..., where: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., window: _Optional[str] = ..., compare: _Optional[str] = ...) -> None: ...

class ComputedTraitStatus(_message.Message):
    __slots__ = ("definition", "state", "profiles_done", "profiles_total", "defined_at")
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROFILES_DONE_FIELD_NUMBER: _ClassVar[int]
    PROFILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEFINED_AT_FIELD_NUMBER: _ClassVar[int]
    definition: ComputedTraitDefinition
    state: str
    profiles_done: int
    profiles_total: int
    defined_at: _timestamp_pb2.Timestamp
    def __init__(self, definition: _Optional[_Union[ComputedTraitDefinition, _Mapping]] = ..., state: _Optional[str] = ..., profiles_done: _Optional[int] = ..., profiles_total: _Optional[int] = ..., defined_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DefineComputedTraitRequest(_message.Message):
    __slots__ = ("definition",)
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    definition: ComputedTraitDefinition
    def __init__(self, definition: _Optional[_Union[ComputedTraitDefinition, _Mapping]] = ...) -> None: ...

class ListComputedTraitsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListComputedTraitsResponse(_message.Message):
    __slots__ = ("traits",)
    TRAITS_FIELD_NUMBER: _ClassVar[int]
    traits: _containers.RepeatedCompositeFieldContainer[ComputedTraitStatus]
    def __init__(self, traits: _Optional[_Iterable[_Union[ComputedTraitStatus, _Mapping]]] = ...) -> None: ...

class DeleteComputedTraitRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteComputedTraitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("person_id",)
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    def __init__(self, person_id: _Optional[str] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("person_id", "document")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    document: _struct_pb2.Struct
    def __init__(self, person_id: _Optional[str] = ..., document: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("person_id", "mode", "request_id")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    mode: DeleteMode
    request_id: str
    def __init__(self, person_id: _Optional[str] = ..., mode: _Optional[_Union[DeleteMode, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("request_id", "identifiers", "timeline_events", "suppressed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    identifiers: int
    timeline_events: int
    suppressed: bool
    def __init__(self, request_id: _Optional[str] = ..., identifiers: _Optional[int] = ..., timeline_events: _Optional[int] = ..., suppressed: _Optional[bool] = ...) -> None: ...

class ProfileChanged(_message.Message):
    __slots__ = ("person_id", "traits", "computed", "consent", "scores", "event_ids", "merged", "split_from", "removed", "at", "cause", "groups", "created")
    class TraitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    class ComputedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    class ConsentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class GroupsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    TRAITS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FROM_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    traits: _containers.MessageMap[str, _struct_pb2.Value]
    computed: _containers.MessageMap[str, _struct_pb2.Value]
    consent: _containers.ScalarMap[str, bool]
    scores: _containers.ScalarMap[str, float]
    event_ids: _containers.RepeatedScalarFieldContainer[str]
    merged: _containers.RepeatedScalarFieldContainer[str]
    split_from: str
    removed: bool
    at: _timestamp_pb2.Timestamp
    cause: str
    groups: _containers.MessageMap[str, _struct_pb2.Value]
    created: bool
    def __init__(self, person_id: _Optional[str] = ..., traits: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., computed: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., consent: _Optional[_Mapping[str, bool]] = ..., scores: _Optional[_Mapping[str, float]] = ..., event_ids: _Optional[_Iterable[str]] = ..., merged: _Optional[_Iterable[str]] = ..., split_from: _Optional[str] = ..., removed: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cause: _Optional[str] = ..., groups: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., created: _Optional[bool] = ...) -> None: ...

class ProfileChangedBatch(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ProfileChanged]
    def __init__(self, changes: _Optional[_Iterable[_Union[ProfileChanged, _Mapping]]] = ...) -> None: ...
