"""The development CRM mapping shows both consent answers a person gives about email.

A privacy trial refused the email channel for a person (`channelPreferences {"email": false}`): the profile
showed `channel:email` refused, but the local HubSpot contact's `cdp_consent_email` stayed true - the dev
mapping (and the README's example) mapped only the email *purpose*, so a CRM user read "may email". The
contact now carries the channel too, on a property the local HubSpot describes."""

from __future__ import annotations

import re
from pathlib import Path

import cdpctl
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.domain.projection import Projection, Source, project
from cdp_crm_emulators.hubspot.schema import PROPERTIES
from cdp_kit import yamltext

DEV_CRM = Path(cdpctl.__file__).parent / "dev" / "crm.yaml"


def hubspot_contacts():
    text = re.sub(r"\{[a-z.-]+\}", "1", DEV_CRM.read_text())  # the ports `cdpctl up` fills in
    (hubspot,) = [c for c in parse_connections(yamltext.load_yaml(text)) if c.id == "hubspot"]
    (contacts,) = [m for m in hubspot.mappings if m.id == "contacts"]
    return contacts


def test_a_refused_email_channel_shows_on_the_contact_beside_the_email_purpose():
    contacts = hubspot_contacts()
    person = {"traits.email": "p@example.com", "consent.purpose:email": True, "consent.channel:email": False}
    projection = project(contacts, Source("p-1", profile=person))
    assert isinstance(projection, Projection)
    assert projection.fields["cdp_consent_email"] is True
    assert projection.fields["cdp_email_channel"] is False


def test_every_contact_property_the_dev_mapping_writes_is_one_the_local_hubspot_describes():
    contacts = hubspot_contacts()
    written = {field.crm_field for field in contacts.fields}
    assert written <= PROPERTIES["contacts"], written - PROPERTIES["contacts"]
