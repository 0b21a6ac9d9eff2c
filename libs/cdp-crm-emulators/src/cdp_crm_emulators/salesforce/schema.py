"""The emulated org's objects, their fields, and record validation in Salesforce's error vocabulary.

Each object has system fields (Id, CreatedDate, LastModifiedDate, SystemModstamp, IsDeleted, OwnerId) that
no API write may set, required fields checked on create, and external id fields (unique, case-insensitive)
that upserts match on. Errors use Salesforce's codes: INVALID_FIELD, REQUIRED_FIELD_MISSING,
INVALID_EMAIL_ADDRESS, STRING_TOO_LONG, INVALID_FIELD_FOR_INSERT_UPDATE, INVALID_CROSS_REFERENCE_KEY, and
INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST for a value a picklist does not list (every picklist here is declared
with the values a new org's standard picklist has - `PICKLISTS` - and restricted to them; describe lists them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

SYSTEM_FIELDS = {
    "Id": "id",
    "CreatedDate": "datetime",
    "LastModifiedDate": "datetime",
    "SystemModstamp": "datetime",
    "IsDeleted": "boolean",
}
READ_ONLY = {*SYSTEM_FIELDS, "MasterRecordId"}  # no API write sets these
KEY_PREFIXES = {
    "Account": "001",
    "Contact": "003",
    "Lead": "00Q",
    "Case": "500",
    "Task": "00T",
    "Opportunity": "006",
    "Campaign": "701",
    "CampaignMember": "00v",
    "User": "005",
}
DEFAULT_OWNER = "005Dp0000000001AAA"
# Objects a user can merge (the UI's and the SOAP API's merge(): Lead, Contact, Account): each has the read-only
# MasterRecordId, the winning record's Id, set on a losing record as the merge deletes it.
MERGEABLE = ("Account", "Contact", "Lead")
# The values of a new org's standard picklists (Setup > Object Manager): object -> field -> values.
PICKLISTS: dict[str, dict[str, tuple[str, ...]]] = {
    "Account": {
        "Industry": (
            "Agriculture", "Apparel", "Banking", "Biotechnology", "Chemicals", "Communications", "Construction",
            "Consulting", "Education", "Electronics", "Energy", "Engineering", "Entertainment", "Environmental",
            "Finance", "Food & Beverage", "Government", "Healthcare", "Hospitality", "Insurance", "Machinery",
            "Manufacturing", "Media", "Not For Profit", "Other", "Recreation", "Retail", "Shipping", "Technology",
            "Telecommunications", "Transportation", "Utilities",
        ),
    },
    "Contact": {"LeadSource": ("Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other")},
    "Lead": {"Status": ("Open - Not Contacted", "Working - Contacted", "Closed - Converted", "Closed - Not Converted")},
    "Case": {
        "Status": ("New", "Working", "Escalated", "Closed"),
        "Priority": ("High", "Medium", "Low"),
        "Origin": ("Phone", "Email", "Web"),
        "Type": ("Mechanical", "Electrical", "Electronic", "Structural", "Other"),
        "Reason": (
            "Installation", "Equipment Complexity", "Performance", "Breakdown", "Equipment Design", "Feedback",
            "Other",
        ),
    },
    "Task": {
        "Status": ("Not Started", "In Progress", "Completed", "Waiting on someone else", "Deferred"),
        "Priority": ("High", "Normal", "Low"),
        "TaskSubtype": ("Task", "Email", "ListEmail", "Cadence", "Call", "LinkedIn"),
    },
    "Opportunity": {
        "StageName": (
            "Prospecting", "Qualification", "Needs Analysis", "Value Proposition", "Id. Decision Makers",
            "Perception Analysis", "Proposal/Price Quote", "Negotiation/Review", "Closed Won", "Closed Lost",
        ),
    },
    "Campaign": {
        "Status": ("Planned", "In Progress", "Completed", "Aborted"),
        "Type": (
            "Conference", "Webinar", "Trade Show", "Public Relations", "Partners", "Referral Program",
            "Advertisement", "Banner Ads", "Direct Mail", "Email", "Telemarketing", "Other",
        ),
    },
    "CampaignMember": {"Status": ("Planned", "Received", "Responded", "Sent")},
}  # fmt: skip
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass
class SObject:
    name: str
    fields: dict[
        str, str
    ]  # name -> type (string, email, reference, datetime, date, double, boolean, picklist, textarea)
    required: tuple[str, ...] = ()
    external_ids: tuple[str, ...] = ()
    references: dict[str, str] = field(default_factory=dict)  # reference field -> target object
    defaults: dict[str, Any] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    # A picklist field -> the values it takes (restricted: any other is refused); by default `PICKLISTS`'.
    picklists: dict[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if self.picklists is None:
            declared = PICKLISTS.get(self.name, {})
            self.picklists = {n: declared[n] for n, kind in self.fields.items() if kind == "picklist" and n in declared}

    def all_fields(self) -> dict[str, str]:
        merged = {"MasterRecordId": "reference"} if self.name in MERGEABLE else {}
        return {**SYSTEM_FIELDS, **merged, "OwnerId": "reference", **self.fields}

    def describe(self) -> dict[str, Any]:
        fields = []
        for name, kind in self.all_fields().items():
            system = name in READ_ONLY
            fields.append(
                {
                    "name": name,
                    "label": name.removesuffix("__c").replace("_", " "),
                    "type": kind,
                    "length": self.lengths.get(name, 255 if kind in ("string", "email", "picklist") else 0),
                    "externalId": name in self.external_ids,
                    "idLookup": name == "Id" or name in self.external_ids or kind == "email",
                    "unique": name in self.external_ids,
                    "nillable": name not in self.required and not system,
                    "createable": not system,
                    "updateable": not system,
                    "custom": name.endswith("__c"),
                    "referenceTo": [self.references[name]] if name in self.references else [],
                    "restrictedPicklist": name in (self.picklists or {}),
                    "picklistValues": [
                        {
                            "active": True,
                            "defaultValue": value == self.defaults.get(name),
                            "label": value,
                            "value": value,
                            "validFor": None,
                        }
                        for value in (self.picklists or {}).get(name, ())
                    ],
                }
            )
        return {**self.summary(), "fields": fields}

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.name,
            "keyPrefix": KEY_PREFIXES.get(self.name),
            "createable": True,
            "updateable": True,
            "queryable": True,
            "custom": False,
            "urls": {"sobject": f"/sobjects/{self.name}", "describe": f"/sobjects/{self.name}/describe"},
        }


def default_objects() -> dict[str, SObject]:
    cdp = {"CDP_Id__c": "string"}
    return {
        "Account": SObject(
            "Account", {"Name": "string", "Website": "string", "Industry": "picklist", **cdp}, ("Name",), ("CDP_Id__c",)
        ),
        "Contact": SObject(
            "Contact",
            {
                "FirstName": "string",
                "LastName": "string",
                "Email": "email",
                "Phone": "string",
                "MobilePhone": "string",
                "Title": "string",
                "AccountId": "reference",
                "MailingCity": "string",
                "MailingCountry": "string",
                "LeadSource": "picklist",
                "HasOptedOutOfEmail": "boolean",
                "Churn_Risk__c": "double",
                "Fraud_Score__c": "double",
                "Lifetime_Value__c": "double",
                "CDP_Segments__c": "textarea",
                **cdp,
            },
            ("LastName",),
            ("CDP_Id__c",),
            {"AccountId": "Account"},
            lengths={"LastName": 80, "FirstName": 40},
        ),
        "Lead": SObject(
            "Lead",
            {
                "FirstName": "string",
                "LastName": "string",
                "Company": "string",
                "Email": "email",
                "Status": "picklist",
                **cdp,
            },
            ("LastName", "Company"),
            ("CDP_Id__c",),
            defaults={"Status": "Open - Not Contacted"},
        ),
        "Case": SObject(
            "Case",
            {
                "CaseNumber": "string",
                "Subject": "string",
                "Description": "textarea",
                "Status": "picklist",
                "Priority": "picklist",
                "Origin": "picklist",
                "Type": "picklist",
                "Reason": "picklist",
                "IsClosed": "boolean",
                "ClosedDate": "datetime",
                "ContactId": "reference",
                "AccountId": "reference",
                # Web-to-case and email-to-case: who raised it, as they typed it (no contact needed).
                "SuppliedName": "string",
                "SuppliedEmail": "email",
                "SuppliedPhone": "string",
                "SuppliedCompany": "string",
                "CDP_Idempotency_Key__c": "string",
            },
            (),
            ("CDP_Idempotency_Key__c",),
            {"ContactId": "Contact", "AccountId": "Account"},
            defaults={"Status": "New", "Priority": "Medium", "IsClosed": False},
        ),
        "Task": SObject(
            "Task",
            {
                "Subject": "string",
                "Description": "textarea",
                "Status": "picklist",
                "Priority": "picklist",
                "ActivityDate": "date",
                "TaskSubtype": "picklist",
                "IsClosed": "boolean",
                "WhoId": "reference",
                "WhatId": "reference",
                "CDP_Idempotency_Key__c": "string",
            },
            (),
            ("CDP_Idempotency_Key__c",),
            {"WhoId": "Contact", "WhatId": "Account"},
            defaults={"Status": "Not Started", "Priority": "Normal", "IsClosed": False},
        ),
        "Opportunity": SObject(
            "Opportunity",
            {
                "Name": "string",
                "StageName": "picklist",
                "Amount": "double",
                "CloseDate": "date",
                "IsClosed": "boolean",
                "IsWon": "boolean",
                "AccountId": "reference",
                "ContactId": "reference",
                "CDP_Idempotency_Key__c": "string",
            },
            ("Name", "StageName", "CloseDate"),
            ("CDP_Idempotency_Key__c",),
            {"AccountId": "Account", "ContactId": "Contact"},
            defaults={"IsClosed": False, "IsWon": False},
        ),
        "Campaign": SObject(
            "Campaign",
            {
                "Name": "string",
                "Status": "picklist",
                "IsActive": "boolean",
                "Type": "picklist",
                "CDP_Segment_Id__c": "string",
            },
            ("Name",),
            ("CDP_Segment_Id__c",),
            defaults={"Status": "Planned", "IsActive": True},
        ),
        "CampaignMember": SObject(
            "CampaignMember",
            {
                "CampaignId": "reference",
                "ContactId": "reference",
                "LeadId": "reference",
                "Status": "picklist",
                "HasResponded": "boolean",
                "CDP_Membership_Key__c": "string",
            },
            ("CampaignId",),
            ("CDP_Membership_Key__c",),
            {"CampaignId": "Campaign", "ContactId": "Contact", "LeadId": "Lead"},
            defaults={"Status": "Sent", "HasResponded": False},
        ),
    }


def error(code: str, message: str, fields: list[str] | None = None) -> dict[str, Any]:
    """One record's error as sObject Collections and Composite report it."""
    return {"statusCode": code, "message": message, "fields": fields or []}


def validate(sobject: SObject, values: dict[str, Any], *, creating: bool) -> dict[str, Any] | None:
    """The first error for these field values, or None. `values` excludes ``attributes``."""
    known = sobject.all_fields()
    for name in values:
        if name not in known:
            return error("INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject.name}", [name])
    system = [name for name in values if name in READ_ONLY and name != "Id"]
    if system:
        return error("INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: {', '.join(system)}.", system)
    if creating:
        missing = [name for name in sobject.required if values.get(name) in (None, "")]
        if missing:
            return error("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing)
    else:
        cleared = [name for name in sobject.required if name in values and values[name] in (None, "")]
        if cleared:
            return error("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(cleared)}]", cleared)
    for name, value in values.items():
        kind = known[name]
        if value in (None, ""):
            continue
        if kind == "email" and not _EMAIL.match(str(value)):
            return error("INVALID_EMAIL_ADDRESS", f"{name}: invalid email address: {value}", [name])
        limit = sobject.lengths.get(name, 255 if kind in ("string", "email", "picklist") else 0)
        if limit and len(str(value)) > limit:
            return error("STRING_TOO_LONG", f"{name}: data value too large (max length={limit})", [name])
        allowed = (sobject.picklists or {}).get(name)
        if allowed is not None and str(value) not in allowed:
            return error(
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", f"{name}: bad value for restricted picklist field: {value}",
                [name],
            )  # fmt: skip
        if kind == "double":
            try:
                float(value)
            except (TypeError, ValueError):
                return error("INVALID_TYPE_ON_FIELD_IN_RECORD", f"{name}: value not of required type: {value}", [name])
    return None
