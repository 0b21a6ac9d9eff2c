"""The collector's identifier hash key file (CDP_PRIVACY_HASH_KEY_FILE): a bad one stops it at start,
naming the variable; a good one gives the keys its suppression list matches with."""

from __future__ import annotations

import json

import pytest

from cdp_collector.settings import CollectorSettings
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.settings import SettingsError, load_settings

KEY = "collector-identifier-hash-key-0123456789"


@pytest.fixture
def environ(tmp_path) -> dict[str, str]:
    (tmp_path / "sources.json").write_text(json.dumps({"sources": []}))
    return {
        "CDP_NATS_URL": "nats://127.0.0.1:4222",
        "CDP_AUTH_MODE": "none",
        "CDP_COLLECTOR_SOURCES_FILE": str(tmp_path / "sources.json"),
    }


def test_a_bad_key_file_stops_the_collector_at_start_naming_the_variable(tmp_path, environ):
    (tmp_path / "key").write_text("\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(CollectorSettings, environ={**environ, "CDP_PRIVACY_HASH_KEY_FILE": str(tmp_path / "key")})
    (problem,) = caught.value.problems
    assert problem.startswith("CDP_PRIVACY_HASH_KEY_FILE=") and "holds no key" in problem


def test_the_key_file_gives_the_collector_its_keys_current_first(tmp_path, environ):
    old = "earlier-identifier-hash-key-0123456789"
    (tmp_path / "key").write_text(f"{KEY}\n{old}\n")
    settings = load_settings(CollectorSettings, environ={**environ, "CDP_PRIVACY_HASH_KEY_FILE": str(tmp_path / "key")})
    assert settings.identifier_hash_keys() == IdentifierHashKeys.of(KEY, old)
