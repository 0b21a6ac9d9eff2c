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
        limits: {burst: 190, window_seconds: 10, daily: 250000}   # optional: the account's own contract;
                                          # day_zone: America/New_York - where its daily limit resets at
                                          # midnight (HubSpot: the portal's time zone setting; UTC if unset)
        on_delete: anonymise              # privacy.deleted: anonymise | delete (default: CDP_CRM_PRIVACY_POLICY)
        on_merge: delete                  # two persons merged, in a CRM without a merge (HubSpot merges):
                                          # the loser's record deleted after the carry-over | keep
        inbound: {start: now}             # where a new connection's change reading starts: now (default) | all;
                                          # overlap_seconds: 180 - changes read back once settled, for those
                                          # that become visible late (default per CRM: HubSpot 180,
                                          # Salesforce 600, Zoho 120; 0: none; Dynamics reads none)
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

What a person projects to under a mapping is `projection`'s. The values read are `mapping_model`'s (every
name re-exported here); the checks of one object mapping are `object_mapping_reader`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from cdp_crm.domain.mapping_model import (
    ABOUT_FIELD_REQUIRED,
    ACTION,
    ACTION_KINDS,
    ACTIONS,
    BACKFILL,
    CREDENTIALS,
    ID_PATTERN,
    INBOUND_START,
    KINDS,
    MATCH_FIELDS_MAX,
    MODES,
    OBJECT_NAME,
    ON_DELETE,
    ON_MERGE,
    PERSON_ID,
    PROFILES_CHANGED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    TRIGGERS,
    UNSUPPORTED,
    About,
    Connection,
    CrmSchema,
    FieldMapping,
    FieldSchema,
    Limits,
    MappingInvalid,
    ObjectMapping,
    ObjectSchema,
    Problem,
    Transform,
    Webhooks,
    map_key,
    required_fields,
)
from cdp_crm.domain.object_mapping_reader import MappingReader
from cdp_kit.yamltext import load_yaml


def _not_a_zone(name: Any) -> bool:
    """Whether `name` is not an IANA time zone (a folder of the database, a path or a name too long for a
    file name fail as an unknown one does)."""
    if not isinstance(name, str) or not name or len(name) > 64:
        return True
    try:
        ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        return True
    return False


__all__ = [
    "ABOUT_FIELD_REQUIRED",
    "ACTION",
    "ACTIONS",
    "ACTION_KINDS",
    "BACKFILL",
    "CREDENTIALS",
    "INBOUND_START",
    "KINDS",
    "MATCH_FIELDS_MAX",
    "MODES",
    "OBJECT_NAME",
    "ON_DELETE",
    "ON_MERGE",
    "PERSON_ID",
    "PROFILES_CHANGED",
    "SEGMENT_ENTERED",
    "SEGMENT_EXITED",
    "TRIGGERS",
    "UNSUPPORTED",
    "About",
    "Connection",
    "CrmSchema",
    "FieldMapping",
    "FieldSchema",
    "Limits",
    "MappingInvalid",
    "ObjectMapping",
    "ObjectSchema",
    "Problem",
    "Transform",
    "Webhooks",
    "load_connections",
    "map_key",
    "parse_connections",
    "required_fields",
]

# The widest limits a document may give: a burst window longer than a day is the daily quota's to count,
# and 2**53 requests is past any CRM's quota while every number up to it is exact as JSON.
MAX_WINDOW_SECONDS = 86_400
MAX_REQUESTS = 2**53
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")


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


class _Reader(MappingReader):
    """The document's and each connection's checks; an object mapping's are `MappingReader`'s."""

    def __init__(self, schemas: Mapping[str, CrmSchema]) -> None:
        super().__init__()
        self.schemas = schemas

    def document(self, document: Any) -> tuple[Connection, ...]:
        if not isinstance(document, dict) or not isinstance(document.get("connections"), list):
            self.problem("", "connections", "the document must be an object with a list of connections")
            return ()
        connections: list[Connection] = []
        seen: set[str] = set()
        accounts: dict[str, str] = {}
        contracts: dict[str, tuple[str, Limits]] = {}  # account -> (the first connection naming it, its limits)
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
            # One budget document per account: two connections of it under different limits would each
            # write theirs into it in turn (budgets.py adopts the configured limits).
            first, limits = contracts.setdefault(connection.account, (connection.id, connection.limits))
            if limits != connection.limits:
                self.problem(
                    connection.id, "limits", f"differ from connection {first}'s, which shares account "
                    f"{connection.account}'s budget: give both the same limits (or none)",
                )  # fmt: skip
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
        if not isinstance(cid, str) or not ID_PATTERN.match(cid):
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
            "on_merge",
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
        on_merge = raw.get("on_merge", "delete")
        if on_merge not in ON_MERGE:
            self.problem(
                cid,
                "on_merge",
                f"must be one of {', '.join(ON_MERGE)} (what a merge of two persons does to the other record)",
            )
            on_merge = "delete"
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
        overlap = self.inbound_overlap(cid, raw.get("inbound"))
        return Connection(
            cid, kind, account, credentials, tuple(mappings), url, limits, on_delete, auth_url, webhooks, start,
            on_merge, overlap,
        )  # fmt: skip

    def inbound_start(self, cid: str, raw: Any) -> str:
        if raw is None:
            return "now"
        if not isinstance(raw, dict):
            self.problem(cid, "inbound", "is a mapping {start: now | all}")
            return "now"
        for key in raw:
            if key not in ("start", "overlap_seconds"):
                self.problem(cid, f"inbound.{key}", "is not an inbound field (start, overlap_seconds)")
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

    def inbound_overlap(self, cid: str, raw: Any) -> float | None:
        """`inbound.overlap_seconds`: 0 to a day (a number); None when not given (the CRM's default)."""
        if not isinstance(raw, dict) or "overlap_seconds" not in raw:
            return None
        value = raw["overlap_seconds"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86_400:
            self.problem(
                cid,
                "inbound.overlap_seconds",
                "must be a number of seconds from 0 (read nothing back) to 86400",
            )
            return None
        return float(value)

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
            self.problem(cid, "limits", "must be an object: burst, window_seconds, daily, day_zone")
            return Limits()
        values: dict[str, Any] = {}
        for key in raw:
            if key not in ("burst", "window_seconds", "daily", "day_zone"):
                self.problem(cid, f"limits.{key}", "is not a limit (expected burst, window_seconds, daily, day_zone)")
        zone = raw.get("day_zone")
        if zone is not None:
            if _not_a_zone(zone):
                self.problem(cid, "limits.day_zone", "must be an IANA time zone, like America/New_York or UTC")
            else:
                values["day_zone"] = zone
        # Each limit is kept in the account's budget document and answered by GetBudget (int64): one the
        # store cannot hold (past 64 bits, an infinity) failed every batch of the account at its commit, and
        # a burst below one request (0.5 read as 0) granted nothing - no write ever reached the CRM, and
        # each input message was dead-lettered once its redeliveries ran out.
        for key in ("burst", "window_seconds", "daily"):
            value = raw.get(key)
            if value is None:
                continue
            number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
            if key == "window_seconds":
                if not number or not 0 < value <= MAX_WINDOW_SECONDS:
                    self.problem(
                        cid, f"limits.{key}", f"must be a number of seconds above 0, at most {MAX_WINDOW_SECONDS}"
                    )
                else:
                    values[key] = float(value)
            elif not number or value != int(value) or not 1 <= value <= MAX_REQUESTS:
                self.problem(cid, f"limits.{key}", f"must be a whole number of requests from 1 to {MAX_REQUESTS}")
            else:
                values[key] = int(value)
        return Limits(**values)
