"""The operator's YAML files read words as words: a category, event or segment called `on`, `no` or `Yes`
is that name, as in journey documents, not YAML 1.1's boolean (which the file would be refused for, or
quietly mean something else by)."""

from __future__ import annotations

import pytest

from cdp_kit.settings import SettingsError, load_settings
from cdp_orchestration.catalogue import read_catalogue
from cdp_orchestration.settings import OrchestrationSettings

ENVIRON = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}


def test_the_rules_file_keeps_names_yaml_1_1_calls_booleans(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "exempt_categories: [transactional, on]\n"
        "suppressions:\n"
        "  - {id: no, categories: [offer, off], after_event: Yes, within: 1d}\n"
    )
    settings = load_settings(OrchestrationSettings, {**ENVIRON, "CDP_ORCHESTRATION_RULES_FILE": str(path)})
    assert settings.validate() == []
    rules = settings.rules()
    assert rules.exempt_categories == {"transactional", "on"}
    (suppression,) = rules.suppressions
    assert suppression.id == "no" and suppression.categories == {"offer", "off"}
    assert suppression.after_event == "Yes"


def test_the_catalogue_file_keeps_names_yaml_1_1_calls_booleans(tmp_path):
    path = tmp_path / "catalogue.yaml"
    path.write_text("events: [Signed Up, Yes, No]\nsegments: [vip, on]\npurposes: [Marketing, off]\n")
    catalogue = read_catalogue(str(path))
    assert catalogue.events == {"Signed Up", "Yes", "No"}
    assert catalogue.segments == {"vip", "on"}
    assert catalogue.purposes == {"Marketing", "off"}


def test_a_rules_file_with_a_repeated_key_is_refused_naming_the_key_and_lines(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("exempt_categories: [transactional]\nexempt_categories: [offer]\n")
    with pytest.raises(SettingsError) as refused:
        load_settings(OrchestrationSettings, {**ENVIRON, "CDP_ORCHESTRATION_RULES_FILE": str(path)})
    assert f"CDP_ORCHESTRATION_RULES_FILE={path} is invalid" in str(refused.value)
    assert "'exempt_categories' appears twice, on lines 1 and 2" in str(refused.value)
