"""The log audit every story module ends with (conftest.py) finds what it is for: a secret of the workspace
or an identifier the story sent, in any service's or companion's log, named by file, line and kind, and
whole values only (a user id "ada" is not found inside "metadata")."""

from __future__ import annotations

import json

from conftest import audit_logs


def _workspace(tmp_path, lines: dict[str, list[str]]):
    home = tmp_path / "cdp-home"
    (home / "secrets" / "nats").mkdir(parents=True)
    (home / "logs").mkdir()
    (home / "secrets" / "sources.json").write_text(
        json.dumps({"sources": [{"id": "dev", "write_key": "wk_dev_0123456789abcdef"}]})
    )
    (home / "secrets" / "admin.token").write_text("cdp_admin_tok_abcdefghijklmnop\n")
    (home / "secrets" / "nats" / "profile.json").write_text(
        json.dumps({"user": "profile", "password": "nats-pass-XYZ987"})
    )
    for name, text in lines.items():
        (home / "logs" / name).write_text("\n".join(text) + "\n")
    return home


def test_a_clean_log_passes(tmp_path):
    home = _workspace(tmp_path, {"profile.log": ['{"msg":"profile built","person_id":"p-1","metadata":{}}']})
    assert audit_logs(home, {"ada", "ada@example.com"}) == []


def test_secrets_and_identifiers_are_found_by_file_line_and_kind(tmp_path):
    home = _workspace(
        tmp_path,
        {
            "collector.log": ['{"msg":"accepted"}', '{"msg":"bad key","key":"wk_dev_0123456789abcdef"}'],
            "crm-hubspot.log": ["GET /contacts?email=ADA@example.com", "auth Bearer pat-local-hubspot"],
            "profile.log": ['{"msg":"lookup","user_id":"ada"}', "connect nats://profile:nats-pass-XYZ987@host"],
            "scoring.log": ["token cdp_admin_tok_abcdefghijklmnop refused"],
        },
    )
    assert sorted(audit_logs(home, {"ada", "ada@example.com"})) == [
        "logs/collector.log:2: write key of source dev",
        "logs/crm-hubspot.log:1: identifier the story sent",
        "logs/crm-hubspot.log:1: identifier the story sent",  # the email, and "ada" within it
        "logs/crm-hubspot.log:2: credential CDP_DEV_HUBSPOT_TOKEN (crm-hubspot)",
        "logs/profile.log:1: identifier the story sent",
        "logs/profile.log:2: NATS password of profile",
        "logs/scoring.log:1: bearer token admin.token",
    ]
