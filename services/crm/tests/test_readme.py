"""The README cannot rot: its connections document is a valid one, and checks against the local HubSpot's
own object schema."""

import re
from pathlib import Path

import yaml

from cdp_crm.domain.mapping import ObjectSchema, load_connections
from cdp_crm_emulators.hubspot import schema as hubspot_schema

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_readme_document_is_valid_against_hubspots_objects():
    (example,) = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    described = {
        obj: ObjectSchema.of(obj, sorted(props), keys=hubspot_schema.UNIQUE[obj])
        for obj, props in hubspot_schema.PROPERTIES.items()
    }
    (connection,) = load_connections(example, {"hubspot": described}, form="yaml")
    assert [m.kind for m in connection.mappings] == ["record", "list", "action"]
    assert yaml.safe_load(example)["connections"][0]["credentials"] == {"token": "HUBSPOT_TOKEN"}
