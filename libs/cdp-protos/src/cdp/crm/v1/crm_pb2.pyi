import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CrmKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CRM_KIND_UNSPECIFIED: _ClassVar[CrmKind]
    CRM_KIND_SALESFORCE: _ClassVar[CrmKind]
    CRM_KIND_HUBSPOT: _ClassVar[CrmKind]
    CRM_KIND_DYNAMICS: _ClassVar[CrmKind]
    CRM_KIND_ZOHO: _ClassVar[CrmKind]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_UPSERT: _ClassVar[Mode]
    MODE_UPDATE_ONLY: _ClassVar[Mode]
    MODE_MIRROR: _ClassVar[Mode]

class ConnectionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONNECTION_STATE_UNSPECIFIED: _ClassVar[ConnectionState]
    CONNECTION_STATE_ACTIVE: _ClassVar[ConnectionState]
    CONNECTION_STATE_AUTH_FAILED: _ClassVar[ConnectionState]
    CONNECTION_STATE_UNAVAILABLE: _ClassVar[ConnectionState]
    CONNECTION_STATE_THROTTLED: _ClassVar[ConnectionState]

class RunKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_KIND_UNSPECIFIED: _ClassVar[RunKind]
    RUN_KIND_BACKFILL: _ClassVar[RunKind]
    RUN_KIND_STREAM: _ClassVar[RunKind]
    RUN_KIND_REPLAY: _ClassVar[RunKind]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED_WITH_ERRORS: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_CANCELLED: _ClassVar[RunState]

class RecordState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_STATE_UNSPECIFIED: _ClassVar[RecordState]
    RECORD_STATE_SYNCED: _ClassVar[RecordState]
    RECORD_STATE_PENDING: _ClassVar[RecordState]
    RECORD_STATE_DEAD_LETTERED: _ClassVar[RecordState]
    RECORD_STATE_OUT_OF_SCOPE: _ClassVar[RecordState]
    RECORD_STATE_ANONYMISED: _ClassVar[RecordState]
    RECORD_STATE_DELETED: _ClassVar[RecordState]
    RECORD_STATE_MERGED: _ClassVar[RecordState]
CRM_KIND_UNSPECIFIED: CrmKind
CRM_KIND_SALESFORCE: CrmKind
CRM_KIND_HUBSPOT: CrmKind
CRM_KIND_DYNAMICS: CrmKind
CRM_KIND_ZOHO: CrmKind
MODE_UNSPECIFIED: Mode
MODE_UPSERT: Mode
MODE_UPDATE_ONLY: Mode
MODE_MIRROR: Mode
CONNECTION_STATE_UNSPECIFIED: ConnectionState
CONNECTION_STATE_ACTIVE: ConnectionState
CONNECTION_STATE_AUTH_FAILED: ConnectionState
CONNECTION_STATE_UNAVAILABLE: ConnectionState
CONNECTION_STATE_THROTTLED: ConnectionState
RUN_KIND_UNSPECIFIED: RunKind
RUN_KIND_BACKFILL: RunKind
RUN_KIND_STREAM: RunKind
RUN_KIND_REPLAY: RunKind
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_SUCCEEDED: RunState
RUN_STATE_SUCCEEDED_WITH_ERRORS: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_CANCELLED: RunState
RECORD_STATE_UNSPECIFIED: RecordState
RECORD_STATE_SYNCED: RecordState
RECORD_STATE_PENDING: RecordState
RECORD_STATE_DEAD_LETTERED: RecordState
RECORD_STATE_OUT_OF_SCOPE: RecordState
RECORD_STATE_ANONYMISED: RecordState
RECORD_STATE_DELETED: RecordState
RECORD_STATE_MERGED: RecordState

class Mapping(_message.Message):
    __slots__ = ("id", "object", "mode", "triggers", "match", "fields", "segment", "list", "action", "idempotency_field")
    class MatchEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_FIELD_FIELD_NUMBER: _ClassVar[int]
    id: str
    object: str
    mode: Mode
    triggers: _containers.RepeatedScalarFieldContainer[str]
    match: _containers.ScalarMap[str, str]
    fields: _containers.ScalarMap[str, str]
    segment: str
    list: str
    action: str
    idempotency_field: str
    def __init__(self, id: _Optional[str] = ..., object: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., triggers: _Optional[_Iterable[str]] = ..., match: _Optional[_Mapping[str, str]] = ..., fields: _Optional[_Mapping[str, str]] = ..., segment: _Optional[str] = ..., list: _Optional[str] = ..., action: _Optional[str] = ..., idempotency_field: _Optional[str] = ...) -> None: ...

class Connection(_message.Message):
    __slots__ = ("id", "kind", "account", "url", "credentials", "mappings", "state", "last_error_reason", "last_error_code", "last_error_at", "last_synced_at")
    class CredentialsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SYNCED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: CrmKind
    account: str
    url: str
    credentials: _containers.ScalarMap[str, str]
    mappings: _containers.RepeatedCompositeFieldContainer[Mapping]
    state: ConnectionState
    last_error_reason: str
    last_error_code: str
    last_error_at: _timestamp_pb2.Timestamp
    last_synced_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[CrmKind, str]] = ..., account: _Optional[str] = ..., url: _Optional[str] = ..., credentials: _Optional[_Mapping[str, str]] = ..., mappings: _Optional[_Iterable[_Union[Mapping, _Mapping]]] = ..., state: _Optional[_Union[ConnectionState, str]] = ..., last_error_reason: _Optional[str] = ..., last_error_code: _Optional[str] = ..., last_error_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_synced_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListConnectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConnectionsResponse(_message.Message):
    __slots__ = ("connections",)
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[Connection]
    def __init__(self, connections: _Optional[_Iterable[_Union[Connection, _Mapping]]] = ...) -> None: ...

class GetConnectionRequest(_message.Message):
    __slots__ = ("connection_id",)
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    def __init__(self, connection_id: _Optional[str] = ...) -> None: ...

class ConnectionsDocument(_message.Message):
    __slots__ = ("json", "yaml")
    JSON_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    json: str
    yaml: str
    def __init__(self, json: _Optional[str] = ..., yaml: _Optional[str] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("mapping", "field", "message")
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    mapping: str
    field: str
    message: str
    def __init__(self, mapping: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ValidateConnectionsRequest(_message.Message):
    __slots__ = ("document", "describe")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DESCRIBE_FIELD_NUMBER: _ClassVar[int]
    document: ConnectionsDocument
    describe: bool
    def __init__(self, document: _Optional[_Union[ConnectionsDocument, _Mapping]] = ..., describe: _Optional[bool] = ...) -> None: ...

class ValidateConnectionsResponse(_message.Message):
    __slots__ = ("problems",)
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    problems: _containers.RepeatedCompositeFieldContainer[Problem]
    def __init__(self, problems: _Optional[_Iterable[_Union[Problem, _Mapping]]] = ...) -> None: ...

class SyncRun(_message.Message):
    __slots__ = ("run_id", "kind", "state", "connection_id", "mapping_id", "started_at", "finished_at", "total", "processed", "created", "updated", "unchanged", "skipped", "dead_lettered", "pending_retry", "api_units", "error", "absent", "connection_ids")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MAPPING_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    PENDING_RETRY_FIELD_NUMBER: _ClassVar[int]
    API_UNITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_IDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    kind: RunKind
    state: RunState
    connection_id: str
    mapping_id: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    total: int
    processed: int
    created: int
    updated: int
    unchanged: int
    skipped: int
    dead_lettered: int
    pending_retry: int
    api_units: int
    error: str
    absent: int
    connection_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., kind: _Optional[_Union[RunKind, str]] = ..., state: _Optional[_Union[RunState, str]] = ..., connection_id: _Optional[str] = ..., mapping_id: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total: _Optional[int] = ..., processed: _Optional[int] = ..., created: _Optional[int] = ..., updated: _Optional[int] = ..., unchanged: _Optional[int] = ..., skipped: _Optional[int] = ..., dead_lettered: _Optional[int] = ..., pending_retry: _Optional[int] = ..., api_units: _Optional[int] = ..., error: _Optional[str] = ..., absent: _Optional[int] = ..., connection_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StartBackfillRequest(_message.Message):
    __slots__ = ("connection_id", "mapping_id", "bulk")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MAPPING_ID_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    mapping_id: str
    bulk: bool
    def __init__(self, connection_id: _Optional[str] = ..., mapping_id: _Optional[str] = ..., bulk: _Optional[bool] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("connection_id", "page_size", "page_token")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    page_size: int
    page_token: str
    def __init__(self, connection_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[SyncRun]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[SyncRun, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RecordStatus(_message.Message):
    __slots__ = ("connection_id", "mapping_id", "object", "record_key", "crm_id", "person_id", "state", "synced_at", "synced_stamp", "reason", "crm_code", "merged_into", "kept")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MAPPING_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    RECORD_KEY_FIELD_NUMBER: _ClassVar[int]
    CRM_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SYNCED_AT_FIELD_NUMBER: _ClassVar[int]
    SYNCED_STAMP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CRM_CODE_FIELD_NUMBER: _ClassVar[int]
    MERGED_INTO_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    mapping_id: str
    object: str
    record_key: str
    crm_id: str
    person_id: str
    state: RecordState
    synced_at: _timestamp_pb2.Timestamp
    synced_stamp: int
    reason: str
    crm_code: str
    merged_into: str
    kept: bool
    def __init__(self, connection_id: _Optional[str] = ..., mapping_id: _Optional[str] = ..., object: _Optional[str] = ..., record_key: _Optional[str] = ..., crm_id: _Optional[str] = ..., person_id: _Optional[str] = ..., state: _Optional[_Union[RecordState, str]] = ..., synced_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., synced_stamp: _Optional[int] = ..., reason: _Optional[str] = ..., crm_code: _Optional[str] = ..., merged_into: _Optional[str] = ..., kept: _Optional[bool] = ...) -> None: ...

class GetRecordStatusRequest(_message.Message):
    __slots__ = ("person_id", "crm_record")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    CRM_RECORD_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    crm_record: CrmRecordRef
    def __init__(self, person_id: _Optional[str] = ..., crm_record: _Optional[_Union[CrmRecordRef, _Mapping]] = ...) -> None: ...

class CrmRecordRef(_message.Message):
    __slots__ = ("connection_id", "object", "crm_id")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    CRM_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    object: str
    crm_id: str
    def __init__(self, connection_id: _Optional[str] = ..., object: _Optional[str] = ..., crm_id: _Optional[str] = ...) -> None: ...

class GetRecordStatusResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[RecordStatus]
    def __init__(self, records: _Optional[_Iterable[_Union[RecordStatus, _Mapping]]] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("id", "connection_id", "mapping_id", "person_id", "reason", "crm_code", "crm_message", "http_status", "failed_at", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MAPPING_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CRM_CODE_FIELD_NUMBER: _ClassVar[int]
    CRM_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    connection_id: str
    mapping_id: str
    person_id: str
    reason: str
    crm_code: str
    crm_message: str
    http_status: int
    failed_at: _timestamp_pb2.Timestamp
    attempts: int
    def __init__(self, id: _Optional[str] = ..., connection_id: _Optional[str] = ..., mapping_id: _Optional[str] = ..., person_id: _Optional[str] = ..., reason: _Optional[str] = ..., crm_code: _Optional[str] = ..., crm_message: _Optional[str] = ..., http_status: _Optional[int] = ..., failed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("connection_id", "mapping_id", "reason", "page_size", "page_token")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MAPPING_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    mapping_id: str
    reason: str
    page_size: int
    page_token: str
    def __init__(self, connection_id: _Optional[str] = ..., mapping_id: _Optional[str] = ..., reason: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters", "next_page_token")
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    next_page_token: str
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReplayDeadLettersRequest(_message.Message):
    __slots__ = ("ids", "connection_id", "mapping_id", "reason")
    IDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MAPPING_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    connection_id: str
    mapping_id: str
    reason: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., connection_id: _Optional[str] = ..., mapping_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReplayDeadLettersResponse(_message.Message):
    __slots__ = ("run", "replayed")
    RUN_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    run: SyncRun
    replayed: int
    def __init__(self, run: _Optional[_Union[SyncRun, _Mapping]] = ..., replayed: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("account", "kind", "burst_limit", "burst_window_seconds", "burst_remaining", "daily_limit", "daily_used", "daily_remaining", "blocked_until")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BURST_LIMIT_FIELD_NUMBER: _ClassVar[int]
    BURST_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BURST_REMAINING_FIELD_NUMBER: _ClassVar[int]
    DAILY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DAILY_USED_FIELD_NUMBER: _ClassVar[int]
    DAILY_REMAINING_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    account: str
    kind: CrmKind
    burst_limit: int
    burst_window_seconds: float
    burst_remaining: int
    daily_limit: int
    daily_used: int
    daily_remaining: int
    blocked_until: _timestamp_pb2.Timestamp
    def __init__(self, account: _Optional[str] = ..., kind: _Optional[_Union[CrmKind, str]] = ..., burst_limit: _Optional[int] = ..., burst_window_seconds: _Optional[float] = ..., burst_remaining: _Optional[int] = ..., daily_limit: _Optional[int] = ..., daily_used: _Optional[int] = ..., daily_remaining: _Optional[int] = ..., blocked_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    def __init__(self, budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ...) -> None: ...
