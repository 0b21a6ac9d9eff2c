"""The key a `cdpctl up` home's profile and collector hash deleted persons' identifiers with: one file for
both, readable by its owner only, made once and never replaced (deletion notices made with it are kept for
ever, and one whose key is gone no longer suppresses its person's events)."""

from __future__ import annotations

import stat

from cdp_kit.identifier_hash import read_key_file
from cdpctl.platform import SERVICES, Workspace, service_environment


def environment(ws: Workspace, name: str) -> dict[str, str]:
    [svc] = [s for s in SERVICES if s.name == name]
    peers = {peer: "127.0.0.1:1" for peer in svc.calls}
    return service_environment(ws, svc, nats_url="nats://127.0.0.1:4222", grpc_port=1, metrics_port=2,
                               http_port=None, peers=peers, named_ports={"collector.http": 8080, "crm.http": 8035})  # fmt: skip


def test_profile_and_the_collector_share_one_private_key_made_once(tmp_path):
    ws = Workspace(tmp_path / "home")
    ws.prepare()
    profile = environment(ws, "profile")["CDP_PRIVACY_HASH_KEY_FILE"]
    assert environment(ws, "collector")["CDP_PRIVACY_HASH_KEY_FILE"] == profile
    key_file = ws.privacy_hash_key_file()
    assert str(key_file) == profile
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    keys = read_key_file(key_file)  # a key the services accept
    assert not keys.development

    again = Workspace(tmp_path / "home")
    environment(again, "profile")
    assert read_key_file(again.privacy_hash_key_file()).current.id == keys.current.id


def test_the_secret_files_reach_only_the_services_that_read_them(tmp_path, monkeypatch):
    """A service that never reads the write keys or the hash key does not get their paths: a compromised
    scoring or CRM process finds neither in its environment, as in the chart (mountSources,
    mountPrivacyHashKey). Set in the shell that ran `make up`, they are not passed on either."""
    ws = Workspace(tmp_path / "home")
    ws.prepare()
    monkeypatch.setenv("CDP_COLLECTOR_SOURCES_FILE", "/somewhere/sources.json")
    monkeypatch.setenv("CDP_PRIVACY_HASH_KEY_FILE", "/somewhere/hash.key")
    given = {
        svc.name: {
            v for v in ("CDP_COLLECTOR_SOURCES_FILE", "CDP_PRIVACY_HASH_KEY_FILE") if v in environment(ws, svc.name)
        }
        for svc in SERVICES
    }
    assert given == {
        "collector": {"CDP_COLLECTOR_SOURCES_FILE", "CDP_PRIVACY_HASH_KEY_FILE"},
        "identity": {"CDP_PRIVACY_HASH_KEY_FILE"},
        "profile": {"CDP_PRIVACY_HASH_KEY_FILE"},
        "scoring": set(),
        "segmentation": set(),
        "orchestration": set(),
        "crm": set(),
    }
    assert environment(ws, "collector")["CDP_COLLECTOR_SOURCES_FILE"] == str(ws.sources_file)
