"""Each identifier type's `from_client`: what an event of a browser or mobile source may do with it."""

from __future__ import annotations

import pytest

from cdp_identity.domain.rules import MergeRules
from cdp_kit.errors import InvalidArgument


def test_crm_ids_never_come_from_a_client_and_user_ids_emails_phones_need_verification():
    rules = MergeRules.default()
    assert {t.name: t.from_client for t in rules.types} == {
        "user_id": "verified",
        "salesforce_id": "never",
        "hubspot_id": "never",
        "dynamics_id": "never",
        "zoho_id": "never",
        "email": "verified",
        "phone": "verified",
        "device_id": "always",
        "anonymous_id": "always",
    }


def test_a_rules_file_may_say_it_per_type():
    rules = MergeRules.from_dict(
        {
            "types": [
                {"name": "user_id"},
                {"name": "pipedrive_id", "from_client": "never"},
                {"name": "email", "from_client": "always"},
            ]
        }
    )
    assert [t.from_client for t in rules.types] == ["verified", "never", "always"]


def test_an_unknown_value_is_refused_on_its_field():
    with pytest.raises(InvalidArgument) as refused:
        MergeRules.from_dict({"types": [{"name": "user_id", "from_client": "sometimes"}]})
    assert refused.value.field == "types[0].from_client"
