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
    assert connection.inbound_start == "now"
    assert yaml.safe_load(example)["connections"][0]["credentials"] == {"token": "HUBSPOT_TOKEN"}


ROOT = Path(__file__).resolve().parents[1]


def test_every_variable_is_documented_in_the_readme():
    """The connector's own variables, and the kit's it gives its own default (the kit's others are the
    kit's to document)."""
    from cdp_crm.settings import CrmSettings
    from cdp_kit.ownership import OwnershipSettings
    from cdp_kit.settings import ServiceSettings, describe

    kit = {var for var, _default, _help in [*describe(ServiceSettings), *describe(OwnershipSettings)]}
    own = [var for var, _default, _help in describe(CrmSettings) if var not in kit]
    assert [var for var in [*own, "CDP_GRPC_PORT", "OTEL_SERVICE_NAME"] if f"`{var}`" not in README] == []


def test_every_module_is_listed_where_the_code_is():
    (table,) = re.findall(r"## Where the code is\n(.*?)\n## ", README, flags=re.S)
    modules = [p.name for p in (ROOT / "src" / "cdp_crm").glob("*.py") if p.name != "__init__.py"]
    assert sorted(m for m in modules if f"`{m}`" not in table) == []
