import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Identifier(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class DroppedIdentifier(_message.Message):
    __slots__ = ("identifier", "reason")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    identifier: Identifier
    reason: str
    def __init__(self, identifier: _Optional[_Union[Identifier, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("identifiers", "request_id", "at")
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    request_id: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ..., request_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("person_id", "created", "merges", "dropped")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    created: bool
    merges: _containers.RepeatedCompositeFieldContainer[MergeRecord]
    dropped: _containers.RepeatedCompositeFieldContainer[DroppedIdentifier]
    def __init__(self, person_id: _Optional[str] = ..., created: _Optional[bool] = ..., merges: _Optional[_Iterable[_Union[MergeRecord, _Mapping]]] = ..., dropped: _Optional[_Iterable[_Union[DroppedIdentifier, _Mapping]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("identifier", "person_id")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    identifier: Identifier
    person_id: str
    def __init__(self, identifier: _Optional[_Union[Identifier, _Mapping]] = ..., person_id: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("person_id", "identifiers")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    def __init__(self, person_id: _Optional[str] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ...) -> None: ...

class GetGraphRequest(_message.Message):
    __slots__ = ("person_id", "identifier")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    identifier: Identifier
    def __init__(self, person_id: _Optional[str] = ..., identifier: _Optional[_Union[Identifier, _Mapping]] = ...) -> None: ...

class GraphIdentifier(_message.Message):
    __slots__ = ("identifier", "added_at", "owner", "quarantined")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    identifier: Identifier
    added_at: _timestamp_pb2.Timestamp
    owner: str
    quarantined: bool
    def __init__(self, identifier: _Optional[_Union[Identifier, _Mapping]] = ..., added_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ..., quarantined: _Optional[bool] = ...) -> None: ...

class MergeCause(_message.Message):
    __slots__ = ("event_id", "identifiers", "rule", "detail")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    identifiers: _containers.RepeatedScalarFieldContainer[str]
    rule: str
    detail: str
    def __init__(self, event_id: _Optional[str] = ..., identifiers: _Optional[_Iterable[str]] = ..., rule: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class MergeRecord(_message.Message):
    __slots__ = ("merge_id", "winner", "loser", "at", "cause")
    MERGE_ID_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    LOSER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    merge_id: str
    winner: str
    loser: str
    at: _timestamp_pb2.Timestamp
    cause: MergeCause
    def __init__(self, merge_id: _Optional[str] = ..., winner: _Optional[str] = ..., loser: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cause: _Optional[_Union[MergeCause, _Mapping]] = ...) -> None: ...

class DropRecord(_message.Message):
    __slots__ = ("dropped", "event_id", "at")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    dropped: DroppedIdentifier
    event_id: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, dropped: _Optional[_Union[DroppedIdentifier, _Mapping]] = ..., event_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetGraphResponse(_message.Message):
    __slots__ = ("person_id", "created_at", "identifiers", "merges", "apart", "drops", "unmerged")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    APART_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    UNMERGED_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    created_at: _timestamp_pb2.Timestamp
    identifiers: _containers.RepeatedCompositeFieldContainer[GraphIdentifier]
    merges: _containers.RepeatedCompositeFieldContainer[MergeRecord]
    apart: _containers.RepeatedScalarFieldContainer[str]
    drops: _containers.RepeatedCompositeFieldContainer[DropRecord]
    unmerged: _containers.RepeatedCompositeFieldContainer[UndoneMerge]
    def __init__(self, person_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., identifiers: _Optional[_Iterable[_Union[GraphIdentifier, _Mapping]]] = ..., merges: _Optional[_Iterable[_Union[MergeRecord, _Mapping]]] = ..., apart: _Optional[_Iterable[str]] = ..., drops: _Optional[_Iterable[_Union[DropRecord, _Mapping]]] = ..., unmerged: _Optional[_Iterable[_Union[UndoneMerge, _Mapping]]] = ...) -> None: ...

class UndoneMerge(_message.Message):
    __slots__ = ("merge", "undone_at", "undone_by", "reason")
    MERGE_FIELD_NUMBER: _ClassVar[int]
    UNDONE_AT_FIELD_NUMBER: _ClassVar[int]
    UNDONE_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    merge: MergeRecord
    undone_at: _timestamp_pb2.Timestamp
    undone_by: str
    reason: str
    def __init__(self, merge: _Optional[_Union[MergeRecord, _Mapping]] = ..., undone_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., undone_by: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class MergeRequest(_message.Message):
    __slots__ = ("person_id", "other_person_id", "reason", "force")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    OTHER_PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    other_person_id: str
    reason: str
    force: bool
    def __init__(self, person_id: _Optional[str] = ..., other_person_id: _Optional[str] = ..., reason: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class MergeResponse(_message.Message):
    __slots__ = ("person_id", "merge")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    merge: MergeRecord
    def __init__(self, person_id: _Optional[str] = ..., merge: _Optional[_Union[MergeRecord, _Mapping]] = ...) -> None: ...

class UnmergeRequest(_message.Message):
    __slots__ = ("merge_id", "reason")
    MERGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    merge_id: str
    reason: str
    def __init__(self, merge_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnmergeResponse(_message.Message):
    __slots__ = ("winner", "loser", "loser_identifiers")
    WINNER_FIELD_NUMBER: _ClassVar[int]
    LOSER_FIELD_NUMBER: _ClassVar[int]
    LOSER_IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    winner: str
    loser: str
    loser_identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    def __init__(self, winner: _Optional[str] = ..., loser: _Optional[str] = ..., loser_identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ...) -> None: ...

class ListQuarantinedRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QuarantinedIdentifier(_message.Message):
    __slots__ = ("identifier", "person_id", "quarantined_at")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_AT_FIELD_NUMBER: _ClassVar[int]
    identifier: Identifier
    person_id: str
    quarantined_at: _timestamp_pb2.Timestamp
    def __init__(self, identifier: _Optional[_Union[Identifier, _Mapping]] = ..., person_id: _Optional[str] = ..., quarantined_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListQuarantinedResponse(_message.Message):
    __slots__ = ("identifiers",)
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    identifiers: _containers.RepeatedCompositeFieldContainer[QuarantinedIdentifier]
    def __init__(self, identifiers: _Optional[_Iterable[_Union[QuarantinedIdentifier, _Mapping]]] = ...) -> None: ...

class SetQuarantineRequest(_message.Message):
    __slots__ = ("identifier", "quarantined")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    identifier: Identifier
    quarantined: bool
    def __init__(self, identifier: _Optional[_Union[Identifier, _Mapping]] = ..., quarantined: _Optional[bool] = ...) -> None: ...

class SetQuarantineResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    def __init__(self, changed: _Optional[bool] = ...) -> None: ...

class MatchRecord(_message.Message):
    __slots__ = ("id", "source", "fields", "identifiers")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    source: str
    fields: _containers.ScalarMap[str, str]
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    def __init__(self, id: _Optional[str] = ..., source: _Optional[str] = ..., fields: _Optional[_Mapping[str, str]] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ...) -> None: ...

class MatchRecordsRequest(_message.Message):
    __slots__ = ("records", "apply", "min_probability", "page_size", "page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    APPLY_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[MatchRecord]
    apply: bool
    min_probability: float
    page_size: int
    page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[MatchRecord, _Mapping]]] = ..., apply: _Optional[bool] = ..., min_probability: _Optional[float] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class MatchRecordsBulkRequest(_message.Message):
    __slots__ = ("records", "apply", "min_probability")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    APPLY_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[MatchRecord]
    apply: bool
    min_probability: float
    def __init__(self, records: _Optional[_Iterable[_Union[MatchRecord, _Mapping]]] = ..., apply: _Optional[bool] = ..., min_probability: _Optional[float] = ...) -> None: ...

class MatchRecordsBulkProgress(_message.Message):
    __slots__ = ("records_done", "records_total", "pairs_kept", "pairs_omitted", "merges", "reviews", "fitted", "done")
    RECORDS_DONE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAIRS_KEPT_FIELD_NUMBER: _ClassVar[int]
    PAIRS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    FITTED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    records_done: int
    records_total: int
    pairs_kept: int
    pairs_omitted: int
    merges: int
    reviews: int
    fitted: bool
    done: bool
    def __init__(self, records_done: _Optional[int] = ..., records_total: _Optional[int] = ..., pairs_kept: _Optional[int] = ..., pairs_omitted: _Optional[int] = ..., merges: _Optional[int] = ..., reviews: _Optional[int] = ..., fitted: _Optional[bool] = ..., done: _Optional[bool] = ...) -> None: ...

class ScoredPair(_message.Message):
    __slots__ = ("left_record", "right_record", "left_person", "right_person", "match_weight", "probability", "decision", "levels")
    class LevelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LEFT_RECORD_FIELD_NUMBER: _ClassVar[int]
    RIGHT_RECORD_FIELD_NUMBER: _ClassVar[int]
    LEFT_PERSON_FIELD_NUMBER: _ClassVar[int]
    RIGHT_PERSON_FIELD_NUMBER: _ClassVar[int]
    MATCH_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    left_record: str
    right_record: str
    left_person: str
    right_person: str
    match_weight: float
    probability: float
    decision: str
    levels: _containers.ScalarMap[str, str]
    def __init__(self, left_record: _Optional[str] = ..., right_record: _Optional[str] = ..., left_person: _Optional[str] = ..., right_person: _Optional[str] = ..., match_weight: _Optional[float] = ..., probability: _Optional[float] = ..., decision: _Optional[str] = ..., levels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MatchRecordsResponse(_message.Message):
    __slots__ = ("persons", "pairs", "merges", "review_ids", "omitted_pairs", "total_pairs", "next_page_token")
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    REVIEW_IDS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAIRS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    persons: _containers.RepeatedScalarFieldContainer[str]
    pairs: _containers.RepeatedCompositeFieldContainer[ScoredPair]
    merges: _containers.RepeatedCompositeFieldContainer[MergeRecord]
    review_ids: _containers.RepeatedScalarFieldContainer[str]
    omitted_pairs: int
    total_pairs: int
    next_page_token: str
    def __init__(self, persons: _Optional[_Iterable[str]] = ..., pairs: _Optional[_Iterable[_Union[ScoredPair, _Mapping]]] = ..., merges: _Optional[_Iterable[_Union[MergeRecord, _Mapping]]] = ..., review_ids: _Optional[_Iterable[str]] = ..., omitted_pairs: _Optional[int] = ..., total_pairs: _Optional[int] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetMatchingModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMatchingModelResponse(_message.Message):
    __slots__ = ("model_json", "origin", "fitted_on_records", "em_iterations", "em_converged", "random_match_probability", "levels", "term_frequencies")
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    FITTED_ON_RECORDS_FIELD_NUMBER: _ClassVar[int]
    EM_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    EM_CONVERGED_FIELD_NUMBER: _ClassVar[int]
    RANDOM_MATCH_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    TERM_FREQUENCIES_FIELD_NUMBER: _ClassVar[int]
    model_json: str
    origin: str
    fitted_on_records: int
    em_iterations: int
    em_converged: bool
    random_match_probability: float
    levels: _containers.RepeatedCompositeFieldContainer[MatchingLevel]
    term_frequencies: _containers.RepeatedCompositeFieldContainer[TermFrequencySummary]
    def __init__(self, model_json: _Optional[str] = ..., origin: _Optional[str] = ..., fitted_on_records: _Optional[int] = ..., em_iterations: _Optional[int] = ..., em_converged: _Optional[bool] = ..., random_match_probability: _Optional[float] = ..., levels: _Optional[_Iterable[_Union[MatchingLevel, _Mapping]]] = ..., term_frequencies: _Optional[_Iterable[_Union[TermFrequencySummary, _Mapping]]] = ...) -> None: ...

class MatchingLevel(_message.Message):
    __slots__ = ("comparison", "level", "m", "u", "weight")
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    U_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    comparison: str
    level: str
    m: float
    u: float
    weight: float
    def __init__(self, comparison: _Optional[str] = ..., level: _Optional[str] = ..., m: _Optional[float] = ..., u: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class TermFrequencySummary(_message.Message):
    __slots__ = ("comparison", "records", "distinct_values", "most_common_share", "median_share", "weight_most_common", "weight_rarest")
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_VALUES_FIELD_NUMBER: _ClassVar[int]
    MOST_COMMON_SHARE_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_SHARE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MOST_COMMON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_RAREST_FIELD_NUMBER: _ClassVar[int]
    comparison: str
    records: int
    distinct_values: int
    most_common_share: float
    median_share: float
    weight_most_common: float
    weight_rarest: float
    def __init__(self, comparison: _Optional[str] = ..., records: _Optional[int] = ..., distinct_values: _Optional[int] = ..., most_common_share: _Optional[float] = ..., median_share: _Optional[float] = ..., weight_most_common: _Optional[float] = ..., weight_rarest: _Optional[float] = ...) -> None: ...

class ListReviewsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("review_id", "pair", "created_at")
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    pair: ScoredPair
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, review_id: _Optional[str] = ..., pair: _Optional[_Union[ScoredPair, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListReviewsResponse(_message.Message):
    __slots__ = ("reviews", "next_page_token")
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reviews: _containers.RepeatedCompositeFieldContainer[Review]
    next_page_token: str
    def __init__(self, reviews: _Optional[_Iterable[_Union[Review, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResolveReviewRequest(_message.Message):
    __slots__ = ("review_id", "decision", "reviewer")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[ResolveReviewRequest.Decision]
        DECISION_MERGE: _ClassVar[ResolveReviewRequest.Decision]
        DECISION_REJECT: _ClassVar[ResolveReviewRequest.Decision]
    DECISION_UNSPECIFIED: ResolveReviewRequest.Decision
    DECISION_MERGE: ResolveReviewRequest.Decision
    DECISION_REJECT: ResolveReviewRequest.Decision
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    decision: ResolveReviewRequest.Decision
    reviewer: str
    def __init__(self, review_id: _Optional[str] = ..., decision: _Optional[_Union[ResolveReviewRequest.Decision, str]] = ..., reviewer: _Optional[str] = ...) -> None: ...

class ResolveReviewResponse(_message.Message):
    __slots__ = ("merge",)
    MERGE_FIELD_NUMBER: _ClassVar[int]
    merge: MergeRecord
    def __init__(self, merge: _Optional[_Union[MergeRecord, _Mapping]] = ...) -> None: ...

class IdentityMerged(_message.Message):
    __slots__ = ("merge_id", "winner", "loser", "at", "cause")
    MERGE_ID_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    LOSER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    merge_id: str
    winner: str
    loser: str
    at: _timestamp_pb2.Timestamp
    cause: MergeCause
    def __init__(self, merge_id: _Optional[str] = ..., winner: _Optional[str] = ..., loser: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cause: _Optional[_Union[MergeCause, _Mapping]] = ...) -> None: ...

class IdentityUnmerged(_message.Message):
    __slots__ = ("merge_id", "winner", "loser", "at", "loser_identifiers", "reason")
    MERGE_ID_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    LOSER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    LOSER_IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    merge_id: str
    winner: str
    loser: str
    at: _timestamp_pb2.Timestamp
    loser_identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    reason: str
    def __init__(self, merge_id: _Optional[str] = ..., winner: _Optional[str] = ..., loser: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., loser_identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class IdentifierQuarantined(_message.Message):
    __slots__ = ("identifier", "person_id", "at")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    identifier: Identifier
    person_id: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, identifier: _Optional[_Union[Identifier, _Mapping]] = ..., person_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
