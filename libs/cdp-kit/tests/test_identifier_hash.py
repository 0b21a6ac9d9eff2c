"""Keyed identifier hashes: a deletion notice read by anyone without the key cannot be tested against a
list of emails, the key file is read as documented, and a service that would run without a secret key in
production refuses to start, naming the variable."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import pytest

from cdp_kit.identifier_hash import (
    DEVELOPMENT_KEY,
    SETTING,
    IdentifierHashKeys,
    IdentifierHashSettings,
    plain_identifier_hash,
    read_key_file,
)
from cdp_kit.settings import ServiceSettings, SettingsError, load_settings

KEY = "k" * 16 + "0123456789abcdef0123"
OLD_KEY = "o" * 40


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(IdentifierHashSettings, ServiceSettings):
    def validate(self) -> list[str]:
        return ServiceSettings.validate(self) + IdentifierHashSettings.validate(self)


def test_a_hash_is_hmac_sha256_under_the_key_never_the_plain_sha256_of_the_identifier():
    keys = IdentifierHashKeys.of(KEY)
    digest = keys.current.hash("email:ada@example.com")
    assert digest == hmac.new(KEY.encode(), b"email:ada@example.com", hashlib.sha256).hexdigest()
    assert digest != hashlib.sha256(b"email:ada@example.com").hexdigest()
    assert digest != IdentifierHashKeys.of(OLD_KEY).current.hash("email:ada@example.com")
    assert plain_identifier_hash("email:ada@example.com") == hashlib.sha256(b"email:ada@example.com").hexdigest()


def test_a_key_is_known_by_an_id_that_is_stable_and_differs_per_key():
    key, same, other = (
        IdentifierHashKeys.of(KEY).current,
        IdentifierHashKeys.of(KEY).current,
        IdentifierHashKeys.of(OLD_KEY).current,
    )
    assert key.id == same.id and key.id != other.id and len(key.id) == 16
    assert KEY not in key.id and KEY not in repr(key)


def test_the_key_file_lists_the_current_key_first_and_keeps_the_old_ones(tmp_path):
    path = tmp_path / "privacy-hash.key"
    path.write_text(f"{KEY}\n\n  {OLD_KEY}  \n")
    keys = read_key_file(path)
    assert keys.current.hash("user_id:u1") == IdentifierHashKeys.of(KEY).current.hash("user_id:u1")
    old = IdentifierHashKeys.of(OLD_KEY).current
    assert keys.by_id(old.id) == old and keys.by_id("0" * 16) is None and not keys.development


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "holds no key"),
        ("\n\n", "holds no key"),
        ("short-secret\n", "line 1 has 12 characters"),
        (f"{KEY}\nshort\n", "line 2 has 5 characters"),
        (f"{KEY}\n{KEY}\n", "lists a key twice"),
    ],
)
def test_a_bad_key_file_is_refused_naming_the_setting_and_never_showing_a_key(tmp_path, text, says):
    path = tmp_path / "key"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        read_key_file(path)
    assert SETTING in str(caught.value) and says in str(caught.value)
    assert "short-secret" not in str(caught.value) and KEY not in str(caught.value)


def test_a_service_with_tokens_and_no_key_file_stops_at_start_naming_the_setting(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"tokens": []}')
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "tokens", "CDP_AUTH_TOKENS_FILE": str(tokens)}
    with pytest.raises(SettingsError) as caught:
        load_settings(Settings, environ=environ)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{SETTING} is required when CDP_AUTH_MODE=tokens")


def test_a_missing_or_bad_key_file_stops_the_start_naming_the_setting(tmp_path):
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}
    with pytest.raises(SettingsError) as caught:
        load_settings(Settings, environ={**environ, SETTING: str(tmp_path / "absent")})
    assert caught.value.problems == [
        f"{SETTING}={str(tmp_path / 'absent')!r} is not a readable text file (FileNotFoundError)"
    ]
    (tmp_path / "weak").write_text("secret\n")
    with pytest.raises(SettingsError, match=f"{SETTING}=.*line 1 has 6 characters"):
        load_settings(Settings, environ={**environ, SETTING: str(tmp_path / "weak")})


def test_with_a_key_file_the_service_uses_its_keys(tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "tokens", SETTING: str(tmp_path / "key")}
    (tmp_path / "tokens.json").write_text('{"tokens": []}')
    settings = load_settings(Settings, environ={**environ, "CDP_AUTH_TOKENS_FILE": str(tmp_path / "tokens.json")})
    assert settings.identifier_hash_keys() == IdentifierHashKeys.of(KEY)


def test_without_authentication_and_without_a_file_the_published_development_key_is_used():
    settings = load_settings(Settings, environ={"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"})
    keys = settings.identifier_hash_keys()
    assert keys.development and keys.current == IdentifierHashKeys.of(DEVELOPMENT_KEY).current
