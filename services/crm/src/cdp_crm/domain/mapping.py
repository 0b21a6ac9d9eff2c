"""CRM connections and their mappings as data: a JSON or YAML document in, validated `Connection`s out.

    connections:
      - id: hubspot                       # names the connection everywhere (status, dead letters, metrics)
        kind: hubspot                     # salesforce | hubspot | dynamics | zoho
        account: "62515"                  # the API budget's owner; connections naming the same account share it
        url: https://api.hubapi.com       # the API base (Salesforce: the login URL; Zoho: the accounts
                                          # URL of the data centre); the vendor's by default, except
                                          # Dynamics, whose environment URL is required
        auth_url: https://login.microsoftonline.com   # Dynamics only: the Entra ID authority (this default)
        credentials: {token: HUBSPOT_TOKEN}   # environment variable NAMES, never the secrets themselves
        limits: {burst: 190, window_seconds: 10, daily: 250000}   # optional: the account's own contract
        on_delete: anonymise              # privacy.deleted: anonymise | delete (default: CDP_CRM_PRIVACY_POLICY)
        inbound: {start: now}             # where a new connection's change reading starts: now (default) | all
        mappings:
          - id: contacts
            object: contacts
            mode: upsert                  # upsert | update_only | mirror
            match: {cdp_id: person.id}    # CRM field <- source: external id / idProperty / alternate key /
                                          # duplicate_check_fields (several only for dynamics and zoho)
            triggers: [profiles.changed, backfill]
            fields:
              email: traits.email
              cdp_churn_risk: {source: scores.churn_risk, transform: "round:2"}
              cdp_consent_email: consent.purpose:email
              cdp_segments: {source: segments, transform: "join:;"}
              lifecyclestage: {value: customer}
          - id: high-value
            object: contacts
            match: {cdp_id: person.id}
            segment: high_value           # only members; with mode mirror a person who leaves is removed
            list: CDP high value          # membership of this CRM list / campaign (else: the mapped fields):
                                          # HubSpot list id, Salesforce / Zoho Campaign id, Dataverse list id
            mode: mirror
          - id: churn-task
            object: tasks
            action: task                  # actions.crm whose crm_kind is this (task, case)
            idempotency_field: cdp_idempotency_key
            about: {mapping: contacts}    # linked to the person's record of that mapping; `field`
                                          # names the link: WhoId (Salesforce), regardingobjectid_contact
                                          # (Dynamics); HubSpot associates it
            fields: {hs_task_subject: action.subject, hs_task_body: action.body}

Sources are the profile's flat field keys (`traits.*`, `computed.*`, `scores.*`, `consent.*`, as
`cdp_kit.profile_fields` names them), `person.id`, `segments` (the ids of the person's segments, sorted),
`segments.<id>` (membership, true or false) and, in action mappings only, `action.<field>` (the action's
`id`, `category`, `journey_id`, `signals` - the person's top signals as "name: value" lines - and its
rendered content: `subject`, `body`, ...); `{value: ...}` is a constant. Transforms (`transform`: one name or a list, applied in order): string, number, integer,
boolean, trim, lower, upper, round:N, truncate:N, join[:sep], date, datetime; `map: {from: to}` then
translates values (a `map` key is matched as text: `true`/`false` for a boolean, `3` for 3 or 3.0) and
`default` stands in for a missing source. YAML documents are read as `cdp_kit.yamltext` reads YAML: only
true/false are booleans, so `map: {yes: subscriber, no: lead}` maps the words yes and no.

`parse_connections(document, schemas)` returns the connections or raises `MappingInvalid` holding EVERY
problem, each naming the mapping ("<connection>/<mapping>", or the connection alone) and the field within
it. With `schemas` (what the CRM describes, per connection id) each object, field and match key is checked
against the CRM's own schema, so a typo fails at start instead of at the first write.

What a person projects to under a mapping is `projection`'s.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cdp_kit.bus import subjects
from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import ROOTS
from cdp_kit.yamltext import load_yaml

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
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIMPLE_TRANSFORMS = ("string", "number", "integer", "boolean", "trim", "lower", "upper", "date", "datetime")
_ARG_TRANSFORMS = ("round", "truncate", "join")


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

    @property
    def name(self) -> str:
        """ "<connection>/<mapping>": how problems, dead letters and status name it."""
        return f"{self.connection}/{self.id}"

    @property
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
# Where reading a CRM's changes starts when the connection has no cursor yet: `now` - what changes from the
# first start on (a CRM's existing records are not news); `all` - every existing record once (an import).
INBOUND_START = ("now", "all")


@dataclass(frozen=True)
class Limits:
    burst: int | None = None
    window_seconds: float | None = None
    daily: int | None = None


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


# --- reading the document -------------------------------------------------------------------------


def load_connections(
    text: str | bytes, schemas: Mapping[str, CrmSchema] | None = None, *, form: str = "json"
) -> tuple[Connection, ...]:
    """Connections from JSON or YAML text (`form`), validated as `parse_connections` does."""
    try:
        document = load_yaml(text) if form == "yaml" else orjson.loads(text)
    except Exception as error:  # orjson.JSONDecodeError or yaml.YAMLError, reported rather than raised
        raise MappingInvalid([Problem("", "connections", f"is not valid {form.upper()}: {error}")]) from None
    return parse_connections(document, schemas)


def parse_connections(document: Any, schemas: Mapping[str, CrmSchema] | None = None) -> tuple[Connection, ...]:
    """The connections `document` describes, or MappingInvalid listing every problem."""
    reader = _Reader(schemas or {})
    connections = reader.document(document)
    if reader.problems:
        raise MappingInvalid(reader.problems)
    return connections


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


class _Reader:
    def __init__(self, schemas: Mapping[str, CrmSchema]) -> None:
        self.schemas = schemas
        self.problems: list[Problem] = []

    def problem(self, where: str, fld: str, message: str) -> None:
        self.problems.append(Problem(where, fld, message))

    def document(self, document: Any) -> tuple[Connection, ...]:
        if not isinstance(document, dict) or not isinstance(document.get("connections"), list):
            self.problem("", "connections", "the document must be an object with a list of connections")
            return ()
        connections: list[Connection] = []
        seen: set[str] = set()
        accounts: dict[str, str] = {}
        for i, raw in enumerate(document["connections"]):
            connection = self.connection(raw, i)
            if connection is None:
                continue
            if connection.id in seen:
                self.problem(connection.id, "id", "is used by another connection; connection ids must be unique")
            seen.add(connection.id)
            other = accounts.setdefault(connection.account, connection.kind)
            if other != connection.kind:
                self.problem(connection.id, "account", f"is also a {other} account; an account has one kind")
            connections.append(connection)
        for key in document:
            if key != "connections":
                self.problem("", key, "is not a document field (expected: connections)")
        return tuple(connections)

    def connection(self, raw: Any, index: int) -> Connection | None:
        if not isinstance(raw, dict):
            self.problem("", f"connections[{index}]", "must be an object")
            return None
        cid = raw.get("id")
        if not isinstance(cid, str) or not _ID.match(cid):
            self.problem("", f"connections[{index}].id", "must be an id (letters, digits, _ . -; up to 63)")
            return None
        kind = raw.get("kind")
        if kind not in KINDS:
            self.problem(cid, "kind", f"must be one of {', '.join(KINDS)}")
            return None
        known = {
            "id",
            "kind",
            "account",
            "url",
            "auth_url",
            "credentials",
            "limits",
            "mappings",
            "on_delete",
            "webhooks",
            "inbound",
        }
        for key in raw:
            if key not in known:
                self.problem(cid, key, f"is not a connection field (expected one of {', '.join(sorted(known))})")
        account = raw.get("account", cid)
        if not isinstance(account, str) or not account:
            self.problem(cid, "account", "must be a non-empty string (the CRM account whose API budget is used)")
            account = cid
        url = raw.get("url")
        if url is not None and (not isinstance(url, str) or not url.startswith(("https://", "http://"))):
            self.problem(cid, "url", "must be an http(s) URL")
            url = None
        elif url is None and kind == "dynamics":
            self.problem(
                cid, "url", "a dynamics connection needs the environment's URL (https://<org>.crm.dynamics.com)"
            )
        auth_url = raw.get("auth_url")
        if auth_url is not None and (kind != "dynamics" or not str(auth_url).startswith(("https://", "http://"))):
            self.problem(cid, "auth_url", "is the Entra ID authority of a dynamics connection: an http(s) URL")
            auth_url = None
        credentials = self.credentials(cid, kind, raw.get("credentials"))
        limits = self.limits(cid, raw.get("limits"))
        on_delete = raw.get("on_delete")
        if on_delete is not None and on_delete not in ON_DELETE:
            self.problem(
                cid, "on_delete", f"must be one of {', '.join(ON_DELETE)} (what privacy.deleted does in this CRM)"
            )
            on_delete = None
        schema = self.schemas.get(cid)
        mappings: list[ObjectMapping] = []
        raw_mappings = raw.get("mappings")
        if not isinstance(raw_mappings, list) or not raw_mappings:
            self.problem(cid, "mappings", "must be a non-empty list")
            raw_mappings = []
        seen: set[str] = set()
        for i, item in enumerate(raw_mappings):
            mapping = self.mapping(cid, kind, item, i, schema)
            if mapping is None:
                continue
            if mapping.id in seen:
                self.problem(mapping.name, "id", "is used by another mapping of this connection")
            seen.add(mapping.id)
            mappings.append(mapping)
        by_id = {m.id: m for m in mappings}
        for mapping in mappings:
            if mapping.about is not None:
                target = by_id.get(mapping.about.mapping)
                if target is None or target.kind != "record":
                    records = ", ".join(m.id for m in mappings if m.kind == "record") or "none"
                    self.problem(
                        mapping.name, "about.mapping", f"must name a record mapping of this connection ({records})"
                    )
        webhooks = self.webhooks(cid, kind, raw.get("webhooks"), credentials)
        start = self.inbound_start(cid, raw.get("inbound"))
        return Connection(
            cid, kind, account, credentials, tuple(mappings), url, limits, on_delete, auth_url, webhooks, start
        )

    def inbound_start(self, cid: str, raw: Any) -> str:
        if raw is None:
            return "now"
        if not isinstance(raw, dict):
            self.problem(cid, "inbound", "is a mapping {start: now | all}")
            return "now"
        for key in raw:
            if key != "start":
                self.problem(cid, f"inbound.{key}", "is not an inbound field (start)")
        start = raw.get("start", "now")
        if start not in INBOUND_START:
            self.problem(
                cid,
                "inbound.start",
                "must be now (read what changes from the connection's first start) or all (every existing "
                "record once, then what changes)",
            )
            return "now"
        return start

    def webhooks(self, cid: str, kind: str, raw: Any, credentials: Mapping[str, str]) -> Webhooks | None:
        if raw is None:
            return None
        if kind != "hubspot" or not isinstance(raw, dict):
            self.problem(cid, "webhooks", "is a hubspot connection's {app_id, target_url}")
            return None
        for key in raw:
            if key not in ("app_id", "target_url"):
                self.problem(cid, f"webhooks.{key}", "is not a webhooks field (app_id, target_url)")
        app_id, target = raw.get("app_id"), raw.get("target_url")
        if not isinstance(app_id, str | int) or not str(app_id):
            self.problem(cid, "webhooks.app_id", "must be the HubSpot app's id")
        if not isinstance(target, str) or not target.startswith(("https://", "http://")):
            self.problem(cid, "webhooks.target_url", "must be the http(s) URL HubSpot calls (/webhooks/hubspot/<id>)")
        for needed in ("client_secret", "developer_key"):
            if needed not in credentials:
                self.problem(cid, f"credentials.{needed}", "webhooks need the app's client_secret and developer_key")
        return Webhooks(str(app_id), str(target)) if isinstance(target, str) else None

    def credentials(self, cid: str, kind: str, raw: Any) -> dict[str, str]:
        accepted = CREDENTIALS[kind]
        wanted = " or ".join("{" + ", ".join(sorted(s)) + "}" for s in accepted)
        if not isinstance(raw, dict):
            self.problem(cid, "credentials", f"must name environment variables: {wanted}")
            return {}
        credentials: dict[str, str] = {}
        for name, env in raw.items():
            if not any(name in s for s in accepted):
                self.problem(cid, f"credentials.{name}", f"is not a {kind} credential (expected {wanted})")
            elif not isinstance(env, str) or not _ENV_NAME.match(env):
                # Never echo the value: it may be the secret itself pasted by mistake.
                self.problem(
                    cid,
                    f"credentials.{name}",
                    "must be the NAME of an environment variable holding the secret (like HUBSPOT_TOKEN), "
                    "never the secret itself",
                )
            else:
                credentials[name] = env
        if raw and not any(s <= set(raw) for s in accepted):
            self.problem(cid, "credentials", f"a {kind} connection needs {wanted}")
        return credentials

    def limits(self, cid: str, raw: Any) -> Limits:
        if raw is None:
            return Limits()
        if not isinstance(raw, dict):
            self.problem(cid, "limits", "must be an object: burst, window_seconds, daily")
            return Limits()
        values: dict[str, Any] = {}
        for key in raw:
            if key not in ("burst", "window_seconds", "daily"):
                self.problem(cid, f"limits.{key}", "is not a limit (expected burst, window_seconds, daily)")
        for key in ("burst", "window_seconds", "daily"):
            value = raw.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                self.problem(cid, f"limits.{key}", "must be a positive number")
            else:
                values[key] = float(value) if key == "window_seconds" else int(value)
        return Limits(**values)

    def mapping(self, cid: str, kind: str, raw: Any, index: int, schema: CrmSchema | None) -> ObjectMapping | None:
        if not isinstance(raw, dict):
            self.problem(cid, f"mappings[{index}]", "must be an object")
            return None
        mid = raw.get("id")
        if not isinstance(mid, str) or not _ID.match(mid):
            self.problem(cid, f"mappings[{index}].id", "must be an id (letters, digits, _ . -; up to 63)")
            return None
        where = f"{cid}/{mid}"
        known = {"id", "object", "mode", "match", "triggers", "fields", "segment", "list", "action"}
        known.update(("idempotency_field", "about"))
        for key in raw:
            if key not in known:
                self.problem(where, key, f"is not a mapping field (expected one of {', '.join(sorted(known))})")
        obj = raw.get("object")
        if not isinstance(obj, str) or not OBJECT_NAME.fullmatch(obj):
            # The name goes into request paths: letters, digits, "_" and "-" only (HubSpot's "2-3508482").
            self.problem(
                where,
                "object",
                "must name the CRM object (contacts, Contact, contact, Contacts, Custom__c, 2-3508482...)",
            )
            return None
        object_schema = None
        if schema is not None:
            object_schema = schema.get(obj)
            if object_schema is None:
                self.problem(where, "object", f"{obj!r} is not an object of this CRM{_suggest(obj, schema)}")
        action = raw.get("action")
        list_name = raw.get("list")
        segment = raw.get("segment")
        for name, value in (("action", action), ("list", list_name), ("segment", segment)):
            if value is not None and (not isinstance(value, str) or not value):
                self.problem(where, name, "must be a non-empty string")
        if isinstance(action, str) and action not in ACTION_KINDS:
            self.problem(where, "action", f"must be one of {', '.join(ACTION_KINDS)} (the actions.crm crm_kind)")
        if action is not None and list_name is not None:
            self.problem(where, "list", "an action mapping creates tasks or cases; it cannot also keep a list")
        mode = raw.get("mode", "upsert")
        if mode not in MODES:
            self.problem(where, "mode", f"must be one of {', '.join(MODES)}")
            mode = "upsert"
        kind_of_mapping = "action" if action is not None else "list" if list_name is not None else "record"
        if kind_of_mapping == "action" and mode != "upsert":
            self.problem(where, "mode", "an action mapping always upserts by its idempotency key")
        if (kind, kind_of_mapping) in UNSUPPORTED:
            self.problem(where, "list", UNSUPPORTED[(kind, kind_of_mapping)])
        if (kind, mode) in UNSUPPORTED:
            self.problem(where, "mode", UNSUPPORTED[(kind, mode)])
        if kind_of_mapping == "list" and segment is None:
            self.problem(where, "segment", "a list mapping needs the segment whose members the list holds")
        if kind_of_mapping == "list" and mode == "update_only":
            self.problem(where, "mode", "a list mapping adds members (upsert) or also removes them (mirror)")
        if kind_of_mapping == "list" and raw.get("fields"):
            self.problem(where, "fields", "a list mapping writes membership only; map fields in a record mapping")
        triggers = self.triggers(where, kind_of_mapping, raw.get("triggers"), segment is not None)
        fields = self.fields(where, kind, raw.get("fields"), kind_of_mapping, object_schema)
        idempotency_field = raw.get("idempotency_field")
        match: tuple[FieldMapping, ...] = ()
        if kind_of_mapping == "action":
            if raw.get("match") is not None:
                self.problem(where, "match", "an action mapping matches by its idempotency_field, not match")
            if not isinstance(idempotency_field, str) or not idempotency_field:
                self.problem(
                    where, "idempotency_field", "must name the CRM field holding the task's or case's idempotency key"
                )
                idempotency_field = None
            elif object_schema is not None:
                self.schema_field(where, "idempotency_field", idempotency_field, object_schema, key=True)
        else:
            if idempotency_field is not None:
                self.problem(where, "idempotency_field", "only action mappings (tasks, cases) have one")
            match = self.match(where, kind, raw.get("match"), object_schema)
        about = self.about(where, kind, raw.get("about"), kind_of_mapping, object_schema)
        return ObjectMapping(
            cid,
            mid,
            obj,
            mode,
            triggers,
            match,
            fields,
            segment if isinstance(segment, str) else None,
            list_name if isinstance(list_name, str) else None,
            action if isinstance(action, str) else None,
            idempotency_field,
            about,
            required_fields(fields, object_schema),
        )

    def about(
        self, where: str, kind: str, raw: Any, kind_of_mapping: str, object_schema: ObjectSchema | None
    ) -> About | None:
        if raw is None:
            return None
        if kind_of_mapping != "action":
            self.problem(where, "about", "only action mappings (tasks, cases) link to the person's record")
            return None
        if (kind, "about") in UNSUPPORTED:
            self.problem(where, "about", UNSUPPORTED[(kind, "about")])
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("mapping"), str):
            self.problem(where, "about", "must be {mapping: <record mapping id>, field: <link field>}")
            return None
        for key in raw:
            if key not in ("mapping", "field"):
                self.problem(where, f"about.{key}", "is not an about field (mapping, field)")
        link = raw.get("field")
        if link is not None and (not isinstance(link, str) or not link):
            self.problem(where, "about.field", "must name the CRM field holding the link")
            link = None
        if link is None and kind in ABOUT_FIELD_REQUIRED:
            example = "WhoId" if kind == "salesforce" else "regardingobjectid_contact"
            self.problem(where, "about.field", f"a {kind} link needs the field holding it (like {example})")
        if link is not None and object_schema is not None:
            self.schema_field(where, "about.field", link, object_schema, key=False)
        return About(raw["mapping"], link)

    def triggers(self, where: str, kind_of_mapping: str, raw: Any, scoped: bool) -> frozenset[str]:
        allowed = {
            "record": (PROFILES_CHANGED, SEGMENT_ENTERED, SEGMENT_EXITED, BACKFILL),
            "list": (SEGMENT_ENTERED, SEGMENT_EXITED, BACKFILL),
            "action": (ACTIONS,),
        }[kind_of_mapping]
        defaults = {
            "record": (PROFILES_CHANGED, BACKFILL),
            "list": (SEGMENT_ENTERED, SEGMENT_EXITED, BACKFILL),
            "action": (ACTIONS,),
        }[kind_of_mapping]
        if raw is None:
            # A record mapping limited to a segment also follows people entering and leaving it.
            return frozenset(allowed if kind_of_mapping == "record" and scoped else defaults)
        if not isinstance(raw, list) or not raw:
            self.problem(where, "triggers", f"must be a non-empty list of {', '.join(allowed)}")
            return frozenset(defaults)
        triggers: set[str] = set()
        for i, trigger in enumerate(raw):
            if trigger not in allowed:
                self.problem(
                    where, f"triggers[{i}]", f"must be one of {', '.join(allowed)} for a {kind_of_mapping} mapping"
                )
            else:
                triggers.add(trigger)
        return frozenset(triggers)

    def match(self, where: str, kind: str, raw: Any, object_schema: ObjectSchema | None) -> tuple[FieldMapping, ...]:
        if not isinstance(raw, dict) or not raw:
            self.problem(
                where,
                "match",
                "must map the CRM's match field to a source, like {cdp_id: person.id}: every write "
                "is an upsert by that key, so a retry never duplicates a record",
            )
            return ()
        if len(raw) > MATCH_FIELDS_MAX[kind]:
            self.problem(where, "match", f"a {kind} match key is at most {MATCH_FIELDS_MAX[kind]} field(s)")
        match = []
        for crm_field, spec in raw.items():
            fm = self.field_mapping(where, f"match.{crm_field}", crm_field, spec, "record")
            if fm is None:
                continue
            if fm.source is None:
                self.problem(where, f"match.{crm_field}", "a match key must come from the person, not a constant")
                continue
            if object_schema is not None:
                self.schema_field(where, f"match.{crm_field}", crm_field, object_schema, key=True)
            match.append(fm)
        return tuple(match)

    def fields(
        self, where: str, kind: str, raw: Any, kind_of_mapping: str, object_schema: ObjectSchema | None
    ) -> tuple[FieldMapping, ...]:
        if raw is None:
            if kind_of_mapping != "list":
                self.problem(where, "fields", "must map at least one CRM field to a source")
            return ()
        if not isinstance(raw, dict) or (not raw and kind_of_mapping != "list"):
            self.problem(where, "fields", "must be an object of CRM field -> source")
            return ()
        fields = []
        for crm_field, spec in raw.items():
            fm = self.field_mapping(where, f"fields.{crm_field}", crm_field, spec, kind_of_mapping)
            if fm is None:
                continue
            if object_schema is not None:
                self.schema_field(where, f"fields.{crm_field}", crm_field, object_schema, key=False)
            fields.append(fm)
        return tuple(fields)

    def schema_field(self, where: str, path: str, name: str, schema: ObjectSchema, *, key: bool) -> None:
        described = schema.fields.get(name)
        if described is None:
            self.problem(where, path, f"{name!r} is not a field of {schema.name}{_suggest(name, schema.fields)}")
        elif key and not described.key:
            self.problem(
                where, path, f"{name!r} is not an external id, unique property or alternate key of {schema.name}"
            )
        elif not key and not described.updateable:
            self.problem(where, path, f"{name!r} of {schema.name} is read-only in the CRM")

    def field_mapping(
        self, where: str, path: str, crm_field: Any, spec: Any, kind_of_mapping: str
    ) -> FieldMapping | None:
        if not isinstance(crm_field, str) or not crm_field:
            self.problem(where, path, "a CRM field name must be a non-empty string")
            return None
        if isinstance(spec, str):
            spec = {"source": spec}
        if not isinstance(spec, dict):
            self.problem(where, path, "must be a source (traits.email) or {source|value, transform, map, default}")
            return None
        for key in spec:
            if key not in ("source", "value", "transform", "map", "default"):
                self.problem(where, f"{path}.{key}", "is not a field option (source, value, transform, map, default)")
        has_source, has_value = "source" in spec, "value" in spec
        if has_source == has_value:
            self.problem(where, path, "needs exactly one of source (a profile field) or value (a constant)")
            return None
        source = spec.get("source")
        if has_source and not self.source_ok(where, path, source, kind_of_mapping):
            return None
        transforms = self.transforms(where, f"{path}.transform", spec.get("transform"))
        translate = spec.get("map")
        if translate is not None and not isinstance(translate, dict):
            self.problem(where, f"{path}.map", "must be an object of value -> CRM value")
            translate = None
        return FieldMapping(
            crm_field,
            source if has_source else None,
            spec.get("value"),
            transforms,
            {map_key(k): v for k, v in translate.items()} if translate else None,
            spec.get("default"),
        )

    def source_ok(self, where: str, path: str, source: Any, kind_of_mapping: str) -> bool:
        if not isinstance(source, str) or not source:
            self.problem(where, f"{path}.source", "must be a non-empty string")
            return False
        if source in (PERSON_ID, SEGMENTS):
            return True
        root, dot, name = source.partition(".")
        if dot and name and (root in ROOTS or root == SEGMENTS):
            return True
        if root == ACTION and dot and name:
            if kind_of_mapping != "action":
                self.problem(where, f"{path}.source", "action.* fields exist only in action mappings")
                return False
            return True
        roots = ", ".join([*(r + ".<name>" for r in ROOTS), PERSON_ID, SEGMENTS, "segments.<id>", "action.<field>"])
        self.problem(where, f"{path}.source", f"{source!r} is not a source (expected one of {roots})")
        return False

    def transforms(self, where: str, path: str, raw: Any) -> tuple[Transform, ...]:
        if raw is None:
            return ()
        names = [raw] if isinstance(raw, str) else raw
        if not isinstance(names, list):
            self.problem(where, path, "must be a transform name or a list of them")
            return ()
        transforms = []
        for name in names:
            base, colon, arg = str(name).partition(":")
            if base in _SIMPLE_TRANSFORMS and not colon:
                transforms.append(Transform(base))
            elif base == "join":
                transforms.append(Transform(base, arg if colon else ";"))
            elif base in ("round", "truncate") and arg.isdigit():
                transforms.append(Transform(base, arg))
            else:
                known = ", ".join([*_SIMPLE_TRANSFORMS, "round:N", "truncate:N", "join[:sep]"])
                self.problem(where, path, f"{name!r} is not a transform (expected {known})")
        return tuple(transforms)


def _suggest(name: str, names: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
