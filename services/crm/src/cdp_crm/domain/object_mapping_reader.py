"""Reading one object mapping of a connections document: its object, mode, triggers, match key, fields,
transforms and link to the person's record, each checked against the CRM's described schema when there is
one. `MappingReader` only collects `Problem`s; the connection-level reader in `mapping` builds on it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from cdp_crm.domain.mapping_model import (
    ABOUT_FIELD_REQUIRED,
    ACTION,
    ACTION_KINDS,
    ACTIONS,
    BACKFILL,
    ID_PATTERN,
    MATCH_FIELDS_MAX,
    MODES,
    OBJECT_NAME,
    PERSON_ID,
    PROFILES_CHANGED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    SEGMENTS,
    UNSUPPORTED,
    About,
    CrmSchema,
    FieldMapping,
    ObjectMapping,
    ObjectSchema,
    Problem,
    Transform,
    map_key,
    required_fields,
)
from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import ROOTS
from cdp_kit.storage.checks import check_document

_SIMPLE_TRANSFORMS = ("string", "number", "integer", "boolean", "trim", "lower", "upper", "date", "datetime")
_ARG_TRANSFORMS = ("round", "truncate", "join")


class MappingReader:
    """The checks of one object mapping; every problem found is appended to `problems`."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, where: str, fld: str, message: str) -> None:
        self.problems.append(Problem(where, fld, message))

    def mapping(self, cid: str, kind: str, raw: Any, index: int, schema: CrmSchema | None) -> ObjectMapping | None:
        if not isinstance(raw, dict):
            self.problem(cid, f"mappings[{index}]", "must be an object")
            return None
        mid = raw.get("id")
        if not isinstance(mid, str) or not ID_PATTERN.match(mid):
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
        # A key field mapped again from something else would have its value replaced by the write itself
        # (HubSpot took `cdp_id: traits.legacy_id` over the key it upserted by): the next upsert by the key
        # found no record and made another, or was refused as a duplicate of the first (its email) and every
        # later change of the person dead-lettered. Mapped exactly as the key (`email: traits.email` beside a
        # match on it) it writes the key's own value. CRMs name fields case-insensitively (Salesforce).
        keys = {fm.crm_field.lower(): _reading(fm) for fm in match}
        if isinstance(idempotency_field, str):
            keys[idempotency_field.lower()] = None  # derived from the action id: nothing else writes it
        for fm in fields:
            if fm.crm_field.lower() in keys and keys[fm.crm_field.lower()] != _reading(fm):
                self.problem(
                    where,
                    f"fields.{fm.crm_field}",
                    "is the field the record is matched by: a mapped value would replace its key, and the next "
                    "write would find no record; map the value to another field",
                )
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
        if not self.storable(where, path, {crm_field: None}, "a CRM field name"):
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
        constants = [("value", spec.get("value")), ("default", spec.get("default"))]
        constants += [(f"map.{k}", v) for k, v in (translate or {}).items()]
        if not all([self.storable(where, f"{path}.{name}", {"v": v}, "a value") for name, v in constants]):
            return None
        return FieldMapping(
            crm_field,
            source if has_source else None,
            spec.get("value"),
            transforms,
            {map_key(k): v for k, v in translate.items()} if translate else None,
            spec.get("default"),
        )

    def storable(self, where: str, path: str, doc: dict[str, Any], what: str) -> bool:
        """Whether the connector's store can keep `doc`: every value written, and the field it is written to,
        is kept in the record's document (what the CRM took last). A name starting with `$`, a constant
        integer past 64 bits or NaN was accepted, and the first batch writing it failed at its commit,
        again at every redelivery, until its message was dead-lettered with every person's change in it."""
        try:
            check_document("crm_records", "mapping", doc)
        except InvalidArgument as refused:
            self.problem(where, path, f"{what} the connector's store cannot keep: {refused.description}")
            return False
        return True

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
            elif base in ("round", "truncate") and arg.isascii() and arg.isdigit():  # not "²", which int() refuses
                transforms.append(Transform(base, arg))
            else:
                known = ", ".join([*_SIMPLE_TRANSFORMS, "round:N", "truncate:N", "join[:sep]"])
                self.problem(where, path, f"{name!r} is not a transform (expected {known})")
        return tuple(transforms)


def _reading(fm: FieldMapping) -> tuple[Any, ...]:
    """What a field mapping writes, whatever CRM field it writes it to."""
    return (fm.source, fm.value, fm.transforms, fm.translate, fm.default)


def _suggest(name: str, names: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
