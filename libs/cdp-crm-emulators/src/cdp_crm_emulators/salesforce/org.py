"""The org's records and the rules every write goes through, whichever API it came in by.

A write validates the fields (schema), resolves relationship fields given by external id, checks references,
applies fault-injected rejections and external id uniqueness, then stamps LastModifiedDate and
SystemModstamp. Upserts match on one external id field, case-insensitively; a record's Id never changes.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable
from typing import Any

from cdp_crm_emulators._server import FaultInjector, Records
from cdp_crm_emulators.salesforce.schema import DEFAULT_OWNER, KEY_PREFIXES, SObject, error, validate

API_VERSION = "62.0"


def sf_datetime(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


class Org:
    def __init__(self, objects: dict[str, SObject], clock: Callable[[], float], faults: FaultInjector) -> None:
        self.objects = objects
        self.clock = clock
        self.faults = faults
        self.store = Records({name: s.external_ids for name, s in objects.items()})
        self.counter = itertools.count(1)
        self.case_numbers = itertools.count(1001)
        # The recycle bin: records a merge deleted (object -> id -> record, IsDeleted and MasterRecordId set),
        # found by queryAll only.
        self.recycled: dict[str, dict[str, dict[str, Any]]] = {}

    def upsert(self, obj: str, ext_field: str, value: Any, values: dict[str, Any]) -> tuple[str | None, Any]:
        """(id, created) or (None, error)."""
        if value in (None, ""):
            return None, error("MISSING_ARGUMENT", f"{ext_field} not specified", [ext_field])
        if ext_field == "Id":
            existing = value if self.store.get(obj, value) is not None else None
        else:
            existing = self.store.find(obj, ext_field, value)
        if ext_field == "Id" and existing is None:
            return None, error(
                "NOT_FOUND", "Provided external ID field does not exist or is not accessible: Id", ["Id"]
            )
        if ext_field != "Id":
            values = {**values, ext_field: value}
        record_id, outcome = self.write(obj, existing, values)
        return (record_id, existing is None) if record_id else (None, outcome)

    def write(self, obj: str, record_id: str | None, values: dict[str, Any]) -> tuple[str | None, Any]:
        """Validate, resolve references and write one record: (id, None) or (None, error)."""
        sobject = self.objects[obj]
        values.pop("attributes", None)
        values.pop("Id", None)
        for relationship in [k for k, v in values.items() if isinstance(v, dict)]:
            resolved = self.resolve(sobject, relationship, values.pop(relationship))
            if isinstance(resolved, dict):
                return None, resolved
            values[f"{relationship}Id"] = resolved
        problem = validate(sobject, values, creating=record_id is None)
        if problem is None:
            problem = self.check_references(sobject, values)
        if problem is None and (message := self.faults.rejection_for(obj, values)) is not None:
            problem = error("FIELD_CUSTOM_VALIDATION_EXCEPTION", message)
        if problem is None:
            for ext_field in sobject.external_ids:
                holder = self.store.find(obj, ext_field, values.get(ext_field)) if values.get(ext_field) else None
                if holder is not None and holder != record_id:
                    problem = error(
                        "DUPLICATE_VALUE",
                        f"duplicate value found: {ext_field} duplicates value on record with id: {holder}",
                        [ext_field],
                    )
        if problem is not None:
            return None, problem
        now = sf_datetime(self.clock())
        if record_id is None:
            record_id = f"{KEY_PREFIXES.get(obj, 'a00')}Dp{next(self.counter):010d}AAA"
            record: dict[str, Any] = {name: None for name in sobject.all_fields()}
            record.update(sobject.defaults)
            record.update(Id=record_id, CreatedDate=now, IsDeleted=False, OwnerId=DEFAULT_OWNER)
            if obj == "Case":
                record["CaseNumber"] = f"{next(self.case_numbers):08d}"
        else:
            record = dict(self.store.objects[obj][record_id])
        record.update(values)
        record.update(LastModifiedDate=now, SystemModstamp=now)
        if obj in ("Case", "Task") and "Status" in values:
            record["IsClosed"] = values["Status"] in ("Closed", "Completed")
            if obj == "Case":
                record["ClosedDate"] = now if record["IsClosed"] else None
        if obj == "Opportunity" and "StageName" in values:
            record["IsClosed"] = values["StageName"] in ("Closed Won", "Closed Lost")
            record["IsWon"] = values["StageName"] == "Closed Won"
        if obj == "CampaignMember" and "Status" in values:
            # Salesforce reads this from the campaign's member status marked "Responded"; here: these.
            record["HasResponded"] = values["Status"] in ("Responded", "Clicked", "Registered", "Attended")
        self.store.put(obj, record_id, record)
        return record_id, None

    def resolve(self, sobject: SObject, relationship: str, target: dict[str, Any]) -> str | dict[str, Any]:
        field_name = f"{relationship}Id"
        if field_name not in sobject.references:
            return error(
                "INVALID_FIELD", f"No such column '{relationship}' on sobject of type {sobject.name}", [relationship]
            )
        target_obj = (target.get("attributes") or {}).get("type") or sobject.references[field_name]
        keys = [(k, v) for k, v in target.items() if k != "attributes"]
        if len(keys) != 1 or keys[0][0] not in self.objects[target_obj].external_ids:
            return error(
                "INVALID_FIELD",
                f"A foreign key to {target_obj} must name exactly one external ID field",
                [relationship],
            )
        found = self.store.find(target_obj, keys[0][0], keys[0][1])
        if found is None:
            return error(
                "INVALID_FIELD",
                f"Foreign key external ID: {keys[0][1]} not found for field {keys[0][0]} in entity {target_obj}",
                [relationship],
            )
        return found

    def check_references(self, sobject: SObject, values: dict[str, Any]) -> dict[str, Any] | None:
        for name, target in sobject.references.items():
            value = values.get(name)
            if value in (None, ""):
                continue
            candidates = {target, "Lead"} if name == "WhoId" else {target}
            if not any(self.store.get(c, str(value)) for c in candidates):
                return error("INVALID_CROSS_REFERENCE_KEY", f"invalid cross reference id: {name}", [name])
        return None

    def public(
        self, obj: str, record: dict[str, Any], fields: list[str] | None = None, version: str = API_VERSION
    ) -> dict[str, Any]:
        shown = {name: record.get(name) for name in fields} if fields else dict(record)
        return {"attributes": {"type": obj, "url": f"/services/data/v{version}/sobjects/{obj}/{record['Id']}"}, **shown}

    def bulk_row(
        self, obj: str, operation: str, values: dict[str, Any], ext_field: str | None
    ) -> tuple[str | None, bool | str]:
        if operation == "upsert":
            assert ext_field is not None
            record_id, outcome = self.upsert(obj, ext_field, values.pop(ext_field, None), values)
        elif operation == "insert":
            record_id, outcome = self.write(obj, None, values)
            outcome = True if record_id else outcome
        else:
            target = values.pop("Id", None)
            if target is None or self.store.get(obj, target) is None:
                return None, "INVALID_CROSS_REFERENCE_KEY:invalid cross reference id:--"
            if operation == "delete":
                self.store.delete(obj, target)
                return target, False
            record_id, outcome = self.write(obj, target, values)
            outcome = False if record_id else outcome
        if record_id is None:
            return None, f"{outcome['statusCode']}:{outcome['message']}:{','.join(outcome['fields']) or '--'}"
        return record_id, outcome
