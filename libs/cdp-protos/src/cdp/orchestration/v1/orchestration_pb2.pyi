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

class JourneyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOURNEY_STATE_UNSPECIFIED: _ClassVar[JourneyState]
    JOURNEY_STATE_DRAFT: _ClassVar[JourneyState]
    JOURNEY_STATE_ACTIVE: _ClassVar[JourneyState]
    JOURNEY_STATE_PAUSED: _ClassVar[JourneyState]
    JOURNEY_STATE_ARCHIVED: _ClassVar[JourneyState]

class Migration(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_UNSPECIFIED: _ClassVar[Migration]
    MIGRATION_KEEP_VERSION: _ClassVar[Migration]
    MIGRATION_MAP_BY_NODE_ID: _ClassVar[Migration]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_RUNNING: _ClassVar[InstanceState]
    INSTANCE_STATE_WAITING: _ClassVar[InstanceState]
    INSTANCE_STATE_ENDED: _ClassVar[InstanceState]

class ApprovalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_STATE_UNSPECIFIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_PENDING: _ClassVar[ApprovalState]
    APPROVAL_STATE_APPROVED: _ClassVar[ApprovalState]
    APPROVAL_STATE_REJECTED: _ClassVar[ApprovalState]
    APPROVAL_STATE_EXPIRED: _ClassVar[ApprovalState]

class DecisionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_KIND_UNSPECIFIED: _ClassVar[DecisionKind]
    DECISION_KIND_SENT: _ClassVar[DecisionKind]
    DECISION_KIND_DEFERRED: _ClassVar[DecisionKind]
    DECISION_KIND_SUPERSEDED: _ClassVar[DecisionKind]
    DECISION_KIND_CAPPED: _ClassVar[DecisionKind]
    DECISION_KIND_SUPPRESSED: _ClassVar[DecisionKind]
    DECISION_KIND_NO_CONSENT: _ClassVar[DecisionKind]
    DECISION_KIND_AWAITING_APPROVAL: _ClassVar[DecisionKind]
    DECISION_KIND_EXPIRED: _ClassVar[DecisionKind]
    DECISION_KIND_REJECTED: _ClassVar[DecisionKind]
    DECISION_KIND_WITHDRAWN: _ClassVar[DecisionKind]
    DECISION_KIND_FAILED: _ClassVar[DecisionKind]
    DECISION_KIND_NOT_ENTERED: _ClassVar[DecisionKind]
JOURNEY_STATE_UNSPECIFIED: JourneyState
JOURNEY_STATE_DRAFT: JourneyState
JOURNEY_STATE_ACTIVE: JourneyState
JOURNEY_STATE_PAUSED: JourneyState
JOURNEY_STATE_ARCHIVED: JourneyState
MIGRATION_UNSPECIFIED: Migration
MIGRATION_KEEP_VERSION: Migration
MIGRATION_MAP_BY_NODE_ID: Migration
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_RUNNING: InstanceState
INSTANCE_STATE_WAITING: InstanceState
INSTANCE_STATE_ENDED: InstanceState
APPROVAL_STATE_UNSPECIFIED: ApprovalState
APPROVAL_STATE_PENDING: ApprovalState
APPROVAL_STATE_APPROVED: ApprovalState
APPROVAL_STATE_REJECTED: ApprovalState
APPROVAL_STATE_EXPIRED: ApprovalState
DECISION_KIND_UNSPECIFIED: DecisionKind
DECISION_KIND_SENT: DecisionKind
DECISION_KIND_DEFERRED: DecisionKind
DECISION_KIND_SUPERSEDED: DecisionKind
DECISION_KIND_CAPPED: DecisionKind
DECISION_KIND_SUPPRESSED: DecisionKind
DECISION_KIND_NO_CONSENT: DecisionKind
DECISION_KIND_AWAITING_APPROVAL: DecisionKind
DECISION_KIND_EXPIRED: DecisionKind
DECISION_KIND_REJECTED: DecisionKind
DECISION_KIND_WITHDRAWN: DecisionKind
DECISION_KIND_FAILED: DecisionKind
DECISION_KIND_NOT_ENTERED: DecisionKind

class JourneyDefinition(_message.Message):
    __slots__ = ("json", "yaml", "tree")
    JSON_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    json: str
    yaml: str
    tree: _struct_pb2.Struct
    def __init__(self, json: _Optional[str] = ..., yaml: _Optional[str] = ..., tree: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("node", "field", "message")
    NODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    node: str
    field: str
    message: str
    def __init__(self, node: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ValidateJourneyRequest(_message.Message):
    __slots__ = ("definition",)
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    definition: JourneyDefinition
    def __init__(self, definition: _Optional[_Union[JourneyDefinition, _Mapping]] = ...) -> None: ...

class ValidateJourneyResponse(_message.Message):
    __slots__ = ("problems",)
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    problems: _containers.RepeatedCompositeFieldContainer[Problem]
    def __init__(self, problems: _Optional[_Iterable[_Union[Problem, _Mapping]]] = ...) -> None: ...

class Journey(_message.Message):
    __slots__ = ("id", "name", "state", "version", "draft_version", "priority", "definition", "created_at", "updated_at", "published_at", "active_instances", "invalid", "revision", "warnings")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    state: JourneyState
    version: int
    draft_version: int
    priority: int
    definition: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    published_at: _timestamp_pb2.Timestamp
    active_instances: int
    invalid: str
    revision: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[JourneyState, str]] = ..., version: _Optional[int] = ..., draft_version: _Optional[int] = ..., priority: _Optional[int] = ..., definition: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_instances: _Optional[int] = ..., invalid: _Optional[str] = ..., revision: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateJourneyRequest(_message.Message):
    __slots__ = ("definition",)
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    definition: JourneyDefinition
    def __init__(self, definition: _Optional[_Union[JourneyDefinition, _Mapping]] = ...) -> None: ...

class UpdateJourneyRequest(_message.Message):
    __slots__ = ("journey_id", "definition", "expected_revision")
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    definition: JourneyDefinition
    expected_revision: int
    def __init__(self, journey_id: _Optional[str] = ..., definition: _Optional[_Union[JourneyDefinition, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class PublishJourneyRequest(_message.Message):
    __slots__ = ("journey_id", "migration", "expected_revision")
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    migration: Migration
    expected_revision: int
    def __init__(self, journey_id: _Optional[str] = ..., migration: _Optional[_Union[Migration, str]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class JourneyRef(_message.Message):
    __slots__ = ("journey_id",)
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    def __init__(self, journey_id: _Optional[str] = ...) -> None: ...

class GetJourneyRequest(_message.Message):
    __slots__ = ("journey_id", "version", "draft")
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    version: int
    draft: bool
    def __init__(self, journey_id: _Optional[str] = ..., version: _Optional[int] = ..., draft: _Optional[bool] = ...) -> None: ...

class DiscardDraftRequest(_message.Message):
    __slots__ = ("journey_id", "expected_revision")
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    expected_revision: int
    def __init__(self, journey_id: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class DiscardDraftResponse(_message.Message):
    __slots__ = ("journey", "discarded", "discarded_version")
    JOURNEY_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_VERSION_FIELD_NUMBER: _ClassVar[int]
    journey: Journey
    discarded: bool
    discarded_version: int
    def __init__(self, journey: _Optional[_Union[Journey, _Mapping]] = ..., discarded: _Optional[bool] = ..., discarded_version: _Optional[int] = ...) -> None: ...

class ListJourneysRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JourneyState]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[JourneyState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJourneysResponse(_message.Message):
    __slots__ = ("journeys", "next_page_token")
    JOURNEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    journeys: _containers.RepeatedCompositeFieldContainer[Journey]
    next_page_token: str
    def __init__(self, journeys: _Optional[_Iterable[_Union[Journey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("journey_id", "person_id", "properties", "idempotency_key")
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    person_id: str
    properties: _struct_pb2.Struct
    idempotency_key: str
    def __init__(self, journey_id: _Optional[str] = ..., person_id: _Optional[str] = ..., properties: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("entered", "instance_id", "reason")
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    entered: bool
    instance_id: str
    reason: str
    def __init__(self, entered: _Optional[bool] = ..., instance_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class InstanceStep(_message.Message):
    __slots__ = ("node_id", "at", "outcome")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    at: _timestamp_pb2.Timestamp
    outcome: str
    def __init__(self, node_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome: _Optional[str] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("id", "journey_id", "journey_version", "person_id", "state", "node_id", "variant", "entered_at", "ended_at", "end_reason", "converted", "steps")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ENTERED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    id: str
    journey_id: str
    journey_version: int
    person_id: str
    state: InstanceState
    node_id: str
    variant: str
    entered_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    end_reason: str
    converted: bool
    steps: _containers.RepeatedCompositeFieldContainer[InstanceStep]
    def __init__(self, id: _Optional[str] = ..., journey_id: _Optional[str] = ..., journey_version: _Optional[int] = ..., person_id: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., node_id: _Optional[str] = ..., variant: _Optional[str] = ..., entered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_reason: _Optional[str] = ..., converted: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[InstanceStep, _Mapping]]] = ...) -> None: ...

class ExitInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "reason")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    reason: str
    def __init__(self, instance_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("person_id", "journey_id", "states", "page_size", "page_token")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    journey_id: str
    states: _containers.RepeatedScalarFieldContainer[InstanceState]
    page_size: int
    page_token: str
    def __init__(self, person_id: _Optional[str] = ..., journey_id: _Optional[str] = ..., states: _Optional[_Iterable[_Union[InstanceState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances", "next_page_token")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    next_page_token: str
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("action_id", "journey_id", "instance_id", "person_id", "channel", "category", "value", "state", "requested_at", "expires_at", "decided_at", "decided_by", "note")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    journey_id: str
    instance_id: str
    person_id: str
    channel: str
    category: str
    value: float
    state: ApprovalState
    requested_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    decided_by: str
    note: str
    def __init__(self, action_id: _Optional[str] = ..., journey_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., person_id: _Optional[str] = ..., channel: _Optional[str] = ..., category: _Optional[str] = ..., value: _Optional[float] = ..., state: _Optional[_Union[ApprovalState, str]] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_by: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ListApprovalsRequest(_message.Message):
    __slots__ = ("states", "journey_id", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[ApprovalState]
    journey_id: str
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[ApprovalState, str]]] = ..., journey_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals", "next_page_token")
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    next_page_token: str
    def __init__(self, approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DecideApprovalRequest(_message.Message):
    __slots__ = ("action_id", "decided_by", "note")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    decided_by: str
    note: str
    def __init__(self, action_id: _Optional[str] = ..., decided_by: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class GetJourneyStatsRequest(_message.Message):
    __slots__ = ("journey_id", "version")
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    version: int
    def __init__(self, journey_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class VariantStats(_message.Message):
    __slots__ = ("split_node", "variant", "control", "entered", "converted", "conversion_rate", "uplift", "p_value")
    SPLIT_NODE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_RATE_FIELD_NUMBER: _ClassVar[int]
    UPLIFT_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    split_node: str
    variant: str
    control: bool
    entered: int
    converted: int
    conversion_rate: float
    uplift: float
    p_value: float
    def __init__(self, split_node: _Optional[str] = ..., variant: _Optional[str] = ..., control: _Optional[bool] = ..., entered: _Optional[int] = ..., converted: _Optional[int] = ..., conversion_rate: _Optional[float] = ..., uplift: _Optional[float] = ..., p_value: _Optional[float] = ...) -> None: ...

class JourneyStats(_message.Message):
    __slots__ = ("journey_id", "entered", "active", "converted", "ended", "variants", "decisions")
    class EndedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    journey_id: str
    entered: int
    active: int
    converted: int
    ended: _containers.ScalarMap[str, int]
    variants: _containers.RepeatedCompositeFieldContainer[VariantStats]
    decisions: _containers.ScalarMap[str, int]
    def __init__(self, journey_id: _Optional[str] = ..., entered: _Optional[int] = ..., active: _Optional[int] = ..., converted: _Optional[int] = ..., ended: _Optional[_Mapping[str, int]] = ..., variants: _Optional[_Iterable[_Union[VariantStats, _Mapping]]] = ..., decisions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("action_id", "journey_id", "instance_id", "person_id", "channel", "category", "kind", "reason", "rule", "until", "decided_at", "delivery", "delivery_reason")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_REASON_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    journey_id: str
    instance_id: str
    person_id: str
    channel: str
    category: str
    kind: DecisionKind
    reason: str
    rule: str
    until: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    delivery: str
    delivery_reason: str
    def __init__(self, action_id: _Optional[str] = ..., journey_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., person_id: _Optional[str] = ..., channel: _Optional[str] = ..., category: _Optional[str] = ..., kind: _Optional[_Union[DecisionKind, str]] = ..., reason: _Optional[str] = ..., rule: _Optional[str] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delivery: _Optional[str] = ..., delivery_reason: _Optional[str] = ...) -> None: ...

class ListDecisionsRequest(_message.Message):
    __slots__ = ("person_id", "journey_id", "action_id", "page_size", "page_token")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    journey_id: str
    action_id: str
    page_size: int
    page_token: str
    def __init__(self, person_id: _Optional[str] = ..., journey_id: _Optional[str] = ..., action_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDecisionsResponse(_message.Message):
    __slots__ = ("decisions", "next_page_token")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    next_page_token: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class InboxMessage(_message.Message):
    __slots__ = ("message_id", "person_id", "action_id", "title", "body", "data", "created_at", "read_at")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    READ_AT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    person_id: str
    action_id: str
    title: str
    body: str
    data: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    read_at: _timestamp_pb2.Timestamp
    def __init__(self, message_id: _Optional[str] = ..., person_id: _Optional[str] = ..., action_id: _Optional[str] = ..., title: _Optional[str] = ..., body: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., read_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListInboxRequest(_message.Message):
    __slots__ = ("person_id", "unread_only", "page_size", "page_token")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    UNREAD_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    unread_only: bool
    page_size: int
    page_token: str
    def __init__(self, person_id: _Optional[str] = ..., unread_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListInboxResponse(_message.Message):
    __slots__ = ("messages", "next_page_token")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[InboxMessage]
    next_page_token: str
    def __init__(self, messages: _Optional[_Iterable[_Union[InboxMessage, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class MarkInboxReadRequest(_message.Message):
    __slots__ = ("person_id", "message_ids")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    message_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, person_id: _Optional[str] = ..., message_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MarkInboxReadResponse(_message.Message):
    __slots__ = ("marked",)
    MARKED_FIELD_NUMBER: _ClassVar[int]
    marked: int
    def __init__(self, marked: _Optional[int] = ...) -> None: ...

class SubscribeInboxRequest(_message.Message):
    __slots__ = ("person_id",)
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    def __init__(self, person_id: _Optional[str] = ...) -> None: ...

class ActionMessage(_message.Message):
    __slots__ = ("action_id", "person_id", "journey_id", "journey_version", "instance_id", "node_id", "channel", "category", "content", "crm_kind", "signals", "decided_at", "address", "signals_from_profile")
    class ContentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AddressEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_ID_FIELD_NUMBER: _ClassVar[int]
    JOURNEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    CRM_KIND_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FROM_PROFILE_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    person_id: str
    journey_id: str
    journey_version: int
    instance_id: str
    node_id: str
    channel: str
    category: str
    content: _containers.ScalarMap[str, str]
    crm_kind: str
    signals: _containers.RepeatedCompositeFieldContainer[Signal]
    decided_at: _timestamp_pb2.Timestamp
    address: _containers.ScalarMap[str, str]
    signals_from_profile: bool
    def __init__(self, action_id: _Optional[str] = ..., person_id: _Optional[str] = ..., journey_id: _Optional[str] = ..., journey_version: _Optional[int] = ..., instance_id: _Optional[str] = ..., node_id: _Optional[str] = ..., channel: _Optional[str] = ..., category: _Optional[str] = ..., content: _Optional[_Mapping[str, str]] = ..., crm_kind: _Optional[str] = ..., signals: _Optional[_Iterable[_Union[Signal, _Mapping]]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., address: _Optional[_Mapping[str, str]] = ..., signals_from_profile: _Optional[bool] = ...) -> None: ...

class Signal(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
