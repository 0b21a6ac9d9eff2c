import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrivacyDeleted(_message.Message):
    __slots__ = ("request_id", "person_id", "identifier_hashes", "suppress", "at", "merged_person_ids", "identifier_hash_key_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_HASHES_FIELD_NUMBER: _ClassVar[int]
    SUPPRESS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    MERGED_PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_HASH_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    person_id: str
    identifier_hashes: _containers.RepeatedScalarFieldContainer[str]
    suppress: bool
    at: _timestamp_pb2.Timestamp
    merged_person_ids: _containers.RepeatedScalarFieldContainer[str]
    identifier_hash_key_id: str
    def __init__(self, request_id: _Optional[str] = ..., person_id: _Optional[str] = ..., identifier_hashes: _Optional[_Iterable[str]] = ..., suppress: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., merged_person_ids: _Optional[_Iterable[str]] = ..., identifier_hash_key_id: _Optional[str] = ...) -> None: ...

class ExportPersonRequest(_message.Message):
    __slots__ = ("person_id", "merged_person_ids")
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    merged_person_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, person_id: _Optional[str] = ..., merged_person_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportPersonResponse(_message.Message):
    __slots__ = ("service", "document")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    service: str
    document: _struct_pb2.Struct
    def __init__(self, service: _Optional[str] = ..., document: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
