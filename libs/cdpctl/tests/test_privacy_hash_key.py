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
