"""What a connections document reads into: the `Connection`s, their `ObjectMapping`s and field mappings,
the CRM's own schema they are checked against, and the `Problem`s a document can have.

Values only; `mapping` reads the document (its docstring is the format) and re-exports every name here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.bus import subjects
from cdp_kit.errors import InvalidArgument

OBJECT_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")  # a CRM object as request paths name it

KINDS = ("salesforce", "hubspot", "dynamics", "zoho")
MODES = ("upsert", "update_only", "mirror")
# Triggers are named after what they follow on the bus (the wire vocabulary's names).
PROFILES_CHANGED = subjects.PROFILES_CHANGED_PREFIX
SEGMENT_ENTERED = subjects.SEGMENTS_ENTERED_PREFIX
SEGMENT_EXITED = subjects.SEGMENTS_EXITED_PREFIX
ACTIONS = f"{subjects.ACTIONS_PREFIX}.{subjects.CRM_CHANNEL}"
BACKFILL = "backfill"
TRIGGERS = (PROFILES_CHANGED, SEGMENT_ENTERED, SEGMENT_EXITED, ACTIONS, BACKFILL)

# Each credential set a kind accepts (either one for Salesforce: client credentials or the JWT bearer flow).
CREDENTIALS: dict[str, tuple[frozenset[str], ...]] = {
    "salesforce": (frozenset({"client_id", "client_secret"}), frozenset({"client_id", "username", "private_key"})),
    # client_secret (optional): the app's secret, to check the signature of HubSpot's webhooks;
    # developer_key (with `webhooks`): the developer API key that points the app's webhooks at the connector.
    "hubspot": (
        frozenset({"token"}),
        frozenset({"token", "client_secret"}),
        frozenset({"token", "client_secret", "developer_key"}),
    ),
    "dynamics": (frozenset({"tenant_id", "client_id", "client_secret"}),),
    "zoho": (frozenset({"client_id", "client_secret", "refresh_token"}),),
}
# How many fields a match key may combine: an external id / idProperty is one field; Dataverse alternate
# keys and Zoho's duplicate_check_fields may be several.
MATCH_FIELDS_MAX = {"salesforce": 1, "hubspot": 1, "dynamics": 5, "zoho": 5}
# What the adapters do not write yet, refused at start rather than at the first write.
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("zoho", "update_only"): "update_only is not supported for zoho yet",
    ("zoho", "about"): "linking a task or case to the person's record is not supported for zoho yet",
}
# The kinds whose link to the person's record is a field the mapping must name (HubSpot associates).
ABOUT_FIELD_REQUIRED = ("salesforce", "dynamics")
ACTION_KINDS = ("task", "case")  # what orchestration's actions.crm carry as crm_kind
PERSON_ID = "person.id"
SEGMENTS = "segments"
ACTION = "action"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # a connection's or a mapping's id


# --- the CRM's own schema (what an adapter's describe returns) ------------------------------------


@dataclass(frozen=True)
class FieldSchema:
    name: str
    type: str = "string"
    key: bool = False  # usable as a match key: external id, unique property, alternate key
    updateable: bool = True
    required: bool = False  # the CRM refuses a record without a value in it (Salesforce's Contact.LastName)


@dataclass(frozen=True)
class ObjectSchema:
    name: str
    fields: Mapping[str, FieldSchema]

    @classmethod
    def of(cls, name: str, fields: Sequence[str], keys: Sequence[str] = ()) -> ObjectSchema:
        """A schema from field names (`keys` are also fields)."""
        names = dict.fromkeys([*fields, *keys])
        return cls(name, {n: FieldSchema(n, key=n in keys) for n in names})


CrmSchema = Mapping[str, ObjectSchema]  # by object name


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    name: str
    arg: str | None = None


@dataclass(frozen=True)
class FieldMapping:
    crm_field: str
    source: str | None  # None: a constant
    value: Any = None
    transforms: tuple[Transform, ...] = ()
    translate: Mapping[str, Any] | None = None
    default: Any = None


@dataclass(frozen=True)
class About:
    """An action mapping's link to the person's record: the record mapping, and the CRM field holding
    the link (a lookup or navigation property; None where the CRM associates records instead)."""

    mapping: str
    field: str | None = None


@dataclass(frozen=True)
class ObjectMapping:
    connection: str
    id: str
    object: str
    mode: str
    triggers: frozenset[str]
    match: tuple[FieldMapping, ...] = ()
    fields: tuple[FieldMapping, ...] = ()
    segment: str | None = None
    list: str | None = None
    action: str | None = None
    idempotency_field: str | None = None
    about: About | None = None
    # The mapped CRM fields the CRM's described schema says a record must have a value in: anonymising
    # writes a placeholder there instead of clearing them (privacy.py). Empty without a schema.
    required: frozenset[str] = frozenset()

    # Computed once per mapping (its fields never change): a batch asks each for every person it projects.
    @functools.cached_property
    def name(self) -> str:
        """ "<connection>/<mapping>": how problems, dead letters and status name it."""
        return f"{self.connection}/{self.id}"

    @functools.cached_property
    def kind(self) -> str:
        return "action" if self.action is not None else "list" if self.list is not None else "record"


@dataclass(frozen=True)
class Webhooks:
    """A HubSpot app's webhook settings the connector registers at start (``PUT /webhooks/v3/<app>/settings``
    with the developer API key): HubSpot then calls `target_url` - the connector's webhook endpoint for
    this connection - when a subscribed object changes."""

    app_id: str
    target_url: str


# privacy.deleted: `anonymise` clears the mapped fields and keeps the record under its opaque CDP id;
# `delete` deletes the record (and the person's tasks and cases) from the CRM.
ON_DELETE = ("anonymise", "delete")
# What identity merging two persons does to the loser's record where the CRM has no merge of its own
# (HubSpot merges the two itself): `delete` it (what the survivor's record lacks carried over first), or
# `keep` it in the CRM, no longer synced.
ON_MERGE = ("delete", "keep")
# Where reading a CRM's changes starts when the connection has no cursor yet: `now` - what changes from the
# first start on (a CRM's existing records are not news); `all` - every existing record once (an import).
INBOUND_START = ("now", "all")


@dataclass(frozen=True)
class Limits:
    burst: int | None = None
    window_seconds: float | None = None
    daily: int | None = None
    day_zone: str | None = None  # the zone whose midnight resets the daily limit (HubSpot: the portal's); UTC


@dataclass(frozen=True)
class Connection:
    id: str
    kind: str
    account: str
    credentials: Mapping[str, str]  # credential -> environment variable name
    mappings: tuple[ObjectMapping, ...]
    url: str | None = None
    limits: Limits = field(default_factory=Limits)
    # What privacy.deleted does to the person's records in this CRM; None: the service's default.
    on_delete: str | None = None
    # Dynamics: the Entra ID authority issuing tokens (default Microsoft's; a sovereign cloud or a local one).
    auth_url: str | None = None
    # HubSpot: the app whose webhooks the connector points at itself at start.
    webhooks: Webhooks | None = None
    # Where reading the CRM's changes starts while the connection has no cursor (INBOUND_START).
    inbound_start: str = "now"
    # What a merge of two persons does to the loser's record in a CRM without a merge (ON_MERGE).
    on_merge: str = "delete"
    # Seconds of changes the inbound side reads back once settled (`inbound.overlap_seconds`: changes that
    # become visible late); None: its CRM's default (inbound/core.py INBOUND_OVERLAP).
    inbound_overlap: float | None = None

    def mapping(self, mapping_id: str) -> ObjectMapping:
        for m in self.mappings:
            if m.id == mapping_id:
                return m
        raise KeyError(mapping_id)


@dataclass(frozen=True)
class Problem:
    mapping: str  # "<connection>/<mapping>", the connection's id, or "" for the document itself
    field: str  # within it: "fields.cdp_churn_risk", "match", "credentials.token"
    message: str

    @property
    def path(self) -> str:
        return f"{self.mapping}.{self.field}" if self.mapping else self.field

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class MappingInvalid(InvalidArgument):
    """Every problem found; `field` is the first one's path (the gRPC layer's BadRequest field), the
    message lists them all."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        assert problems
        super().__init__(problems[0].path, "; ".join(map(str, problems)) if len(problems) > 1 else problems[0].message)
        self.problems = tuple(problems)


def map_key(value: Any) -> str:
    """The text a value is looked up by in a field's `map`: JSON's spelling of booleans (a YAML `true:` key
    and a boolean profile value meet at "true"), whole floats as integers (a score of 3.0 finds `3:`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def required_fields(fields: Sequence[FieldMapping], schema: ObjectSchema | None) -> frozenset[str]:
    if schema is None:
        return frozenset()
    return frozenset(
        fm.crm_field
        for fm in fields
        if (described := schema.fields.get(fm.crm_field)) is not None and described.required
    )
