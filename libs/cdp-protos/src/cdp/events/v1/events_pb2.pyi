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

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_TRACK: _ClassVar[EventType]
    EVENT_TYPE_IDENTIFY: _ClassVar[EventType]
    EVENT_TYPE_ALIAS: _ClassVar[EventType]
    EVENT_TYPE_PAGE: _ClassVar[EventType]
    EVENT_TYPE_SCREEN: _ClassVar[EventType]
    EVENT_TYPE_GROUP: _ClassVar[EventType]

class SourceTrust(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_TRUST_SERVER: _ClassVar[SourceTrust]
    SOURCE_TRUST_CLIENT: _ClassVar[SourceTrust]
    SOURCE_TRUST_CLIENT_UNVERIFIED: _ClassVar[SourceTrust]
    SOURCE_TRUST_CLIENT_VERIFIED: _ClassVar[SourceTrust]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_TRACK: EventType
EVENT_TYPE_IDENTIFY: EventType
EVENT_TYPE_ALIAS: EventType
EVENT_TYPE_PAGE: EventType
EVENT_TYPE_SCREEN: EventType
EVENT_TYPE_GROUP: EventType
SOURCE_TRUST_SERVER: SourceTrust
SOURCE_TRUST_CLIENT: SourceTrust
SOURCE_TRUST_CLIENT_UNVERIFIED: SourceTrust
SOURCE_TRUST_CLIENT_VERIFIED: SourceTrust

class Event(_message.Message):
    __slots__ = ("message_id", "type", "user_id", "anonymous_id", "previous_id", "group_id", "event", "name", "category", "properties", "traits", "context", "timestamp", "sent_at", "received_at", "original_timestamp", "source_id", "integrations", "extra", "source_trust")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    TRAITS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    INTEGRATIONS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TRUST_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    type: EventType
    user_id: str
    anonymous_id: str
    previous_id: str
    group_id: str
    event: str
    name: str
    category: str
    properties: _struct_pb2.Struct
    traits: _struct_pb2.Struct
    context: Context
    timestamp: _timestamp_pb2.Timestamp
    sent_at: _timestamp_pb2.Timestamp
    received_at: _timestamp_pb2.Timestamp
    original_timestamp: _timestamp_pb2.Timestamp
    source_id: str
    integrations: _struct_pb2.Struct
    extra: _struct_pb2.Struct
    source_trust: SourceTrust
    def __init__(self, message_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., user_id: _Optional[str] = ..., anonymous_id: _Optional[str] = ..., previous_id: _Optional[str] = ..., group_id: _Optional[str] = ..., event: _Optional[str] = ..., name: _Optional[str] = ..., category: _Optional[str] = ..., properties: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., traits: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., original_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_id: _Optional[str] = ..., integrations: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., extra: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., source_trust: _Optional[_Union[SourceTrust, str]] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("ip", "user_agent", "locale", "timezone", "device", "campaign", "library", "page", "app", "os", "location", "network", "screen", "consent", "traits", "group_id", "extra")
    IP_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    SCREEN_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    TRAITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    ip: str
    user_agent: str
    locale: str
    timezone: str
    device: Device
    campaign: Campaign
    library: Library
    page: Page
    app: App
    os: OperatingSystem
    location: Location
    network: Network
    screen: Screen
    consent: Consent
    traits: _struct_pb2.Struct
    group_id: str
    extra: _struct_pb2.Struct
    def __init__(self, ip: _Optional[str] = ..., user_agent: _Optional[str] = ..., locale: _Optional[str] = ..., timezone: _Optional[str] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., campaign: _Optional[_Union[Campaign, _Mapping]] = ..., library: _Optional[_Union[Library, _Mapping]] = ..., page: _Optional[_Union[Page, _Mapping]] = ..., app: _Optional[_Union[App, _Mapping]] = ..., os: _Optional[_Union[OperatingSystem, _Mapping]] = ..., location: _Optional[_Union[Location, _Mapping]] = ..., network: _Optional[_Union[Network, _Mapping]] = ..., screen: _Optional[_Union[Screen, _Mapping]] = ..., consent: _Optional[_Union[Consent, _Mapping]] = ..., traits: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., group_id: _Optional[str] = ..., extra: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "advertising_id", "ad_tracking_enabled", "manufacturer", "model", "name", "type", "token")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADVERTISING_ID_FIELD_NUMBER: _ClassVar[int]
    AD_TRACKING_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    advertising_id: str
    ad_tracking_enabled: bool
    manufacturer: str
    model: str
    name: str
    type: str
    token: str
    def __init__(self, id: _Optional[str] = ..., advertising_id: _Optional[str] = ..., ad_tracking_enabled: _Optional[bool] = ..., manufacturer: _Optional[str] = ..., model: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class Campaign(_message.Message):
    __slots__ = ("name", "source", "medium", "term", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MEDIUM_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    medium: str
    term: str
    content: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., medium: _Optional[str] = ..., term: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Library(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Page(_message.Message):
    __slots__ = ("path", "referrer", "search", "title", "url")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REFERRER_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    path: str
    referrer: str
    search: str
    title: str
    url: str
    def __init__(self, path: _Optional[str] = ..., referrer: _Optional[str] = ..., search: _Optional[str] = ..., title: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class App(_message.Message):
    __slots__ = ("name", "version", "build", "namespace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    build: str
    namespace: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., build: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class OperatingSystem(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("city", "country", "latitude", "longitude", "region", "speed")
    CITY_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    city: str
    country: str
    latitude: float
    longitude: float
    region: str
    speed: float
    def __init__(self, city: _Optional[str] = ..., country: _Optional[str] = ..., latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., region: _Optional[str] = ..., speed: _Optional[float] = ...) -> None: ...

class Network(_message.Message):
    __slots__ = ("bluetooth", "carrier", "cellular", "wifi")
    BLUETOOTH_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    CELLULAR_FIELD_NUMBER: _ClassVar[int]
    WIFI_FIELD_NUMBER: _ClassVar[int]
    bluetooth: bool
    carrier: str
    cellular: bool
    wifi: bool
    def __init__(self, bluetooth: _Optional[bool] = ..., carrier: _Optional[str] = ..., cellular: _Optional[bool] = ..., wifi: _Optional[bool] = ...) -> None: ...

class Screen(_message.Message):
    __slots__ = ("width", "height", "density")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    density: float
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., density: _Optional[float] = ...) -> None: ...

class Consent(_message.Message):
    __slots__ = ("category_preferences", "channel_preferences")
    class CategoryPreferencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    class ChannelPreferencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    CATEGORY_PREFERENCES_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_PREFERENCES_FIELD_NUMBER: _ClassVar[int]
    category_preferences: _containers.ScalarMap[str, bool]
    channel_preferences: _containers.ScalarMap[str, bool]
    def __init__(self, category_preferences: _Optional[_Mapping[str, bool]] = ..., channel_preferences: _Optional[_Mapping[str, bool]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class ResolvedEvent(_message.Message):
    __slots__ = ("event", "person_id", "dropped", "identifiers", "shared_with")
    class SharedWithEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    SHARED_WITH_FIELD_NUMBER: _ClassVar[int]
    event: Event
    person_id: str
    dropped: _containers.RepeatedCompositeFieldContainer[DroppedIdentifier]
    identifiers: _containers.RepeatedScalarFieldContainer[str]
    shared_with: _containers.ScalarMap[str, int]
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ..., person_id: _Optional[str] = ..., dropped: _Optional[_Iterable[_Union[DroppedIdentifier, _Mapping]]] = ..., identifiers: _Optional[_Iterable[str]] = ..., shared_with: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ResolvedEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ResolvedEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ResolvedEvent, _Mapping]]] = ...) -> None: ...

class DroppedIdentifier(_message.Message):
    __slots__ = ("type", "value", "reason")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    reason: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
