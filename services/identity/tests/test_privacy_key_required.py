"""Identity now drops a deleted person's late events by the notices' keyed hashes, so under tokens it needs
the key file profile and the collector hold, as they do: without it, it would match no keyed suppression
and resolve a suppressed person's events again. Start-up is refused, naming the setting."""

from __future__ import annotations

from cdp_identity.settings import IdentitySettings


def settings(tmp_path, **overrides) -> IdentitySettings:
    tokens = tmp_path / "tokens.json"
    tokens.write_text("[]")
    return IdentitySettings(
        nats_url="nats://127.0.0.1:4222",
        auth_mode="tokens",
        auth_tokens_file=tokens,
        store_url="memory://",
        **overrides,
    )


def test_under_tokens_identity_refuses_to_start_without_the_identifier_hash_key(tmp_path):
    problems = settings(tmp_path).validate()
    assert any(p.startswith("CDP_PRIVACY_HASH_KEY_FILE is required when CDP_AUTH_MODE=tokens") for p in problems)
    key = tmp_path / "privacy-hash.key"
    key.write_text("identity-test-identifier-hash-key-0123456789\n")
    assert not [p for p in settings(tmp_path, privacy_hash_key_file=key).validate() if "HASH_KEY" in p]
