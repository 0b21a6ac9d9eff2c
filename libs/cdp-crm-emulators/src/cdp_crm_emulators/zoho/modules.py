"""The emulated Zoho org's modules: fields and their types, mandatory fields, unique fields, default duplicate checks."""

from __future__ import annotations


class Module:
    def __init__(
        self,
        name: str,
        fields: dict[str, str],
        required: tuple[str, ...],
        unique: tuple[str, ...],
        default_duplicate_check: tuple[str, ...],
    ):
        self.name, self.fields, self.required, self.unique = name, fields, required, unique
        self.default_duplicate_check = default_duplicate_check


def default_modules() -> dict[str, Module]:
    cdp = {"CDP_Id": "text"}
    return {
        "Leads": Module(
            "Leads",
            {
                "First_Name": "text",
                "Last_Name": "text",
                "Email": "email",
                "Company": "text",
                "Lead_Status": "picklist",
                **cdp,
            },
            ("Last_Name",),
            ("Email", "CDP_Id"),
            ("Email",),
        ),
        "Contacts": Module(
            "Contacts",
            {
                "First_Name": "text",
                "Last_Name": "text",
                "Email": "email",
                "Phone": "phone",
                "Mobile": "phone",
                "Title": "text",
                "Email_Opt_Out": "boolean",
                "Account_Name": "lookup",
                "Churn_Risk": "double",
                "Fraud_Score": "double",
                "Lifetime_Value": "double",
                "CDP_Segments": "textarea",
                **cdp,
            },
            ("Last_Name",),
            ("Email", "CDP_Id"),
            ("Email",),
        ),
        "Accounts": Module(
            "Accounts",
            {"Account_Name": "text", "Website": "website", "Industry": "picklist", **cdp},
            ("Account_Name",),
            ("Account_Name", "CDP_Id"),
            ("Account_Name",),
        ),
        "Cases": Module(
            "Cases",
            {
                "Subject": "text",
                "Description": "textarea",
                "Status": "picklist",
                "Priority": "picklist",
                "Case_Origin": "picklist",
                "Related_To": "lookup",
                "CDP_Idempotency_Key": "text",
            },
            ("Subject", "Case_Origin", "Status"),
            ("CDP_Idempotency_Key",),
            ("CDP_Idempotency_Key",),
        ),
        "Deals": Module(
            "Deals",
            {
                "Deal_Name": "text",
                "Stage": "picklist",
                "Amount": "double",
                "Closing_Date": "date",
                "Contact_Name": "lookup",
                "CDP_Idempotency_Key": "text",
            },
            ("Deal_Name", "Stage"),
            ("CDP_Idempotency_Key",),
            ("CDP_Idempotency_Key",),
        ),
        "Campaigns": Module(
            "Campaigns",
            {"Campaign_Name": "text", "Status": "picklist", "Type": "picklist", "Description": "textarea"},
            ("Campaign_Name",),
            ("Campaign_Name",),
            ("Campaign_Name",),
        ),
        "Tasks": Module(
            "Tasks",
            {
                "Subject": "text",
                "Description": "textarea",
                "Status": "picklist",
                "Priority": "picklist",
                "Due_Date": "date",
                "Who_Id": "lookup",
                "CDP_Idempotency_Key": "text",
            },
            ("Subject",),
            ("CDP_Idempotency_Key",),
            ("CDP_Idempotency_Key",),
        ),
    }


SYSTEM = {"id", "Created_Time", "Modified_Time", "Created_By", "Modified_By", "Owner"}
