"""Under `make up` orchestration reaches the profile service, as its journeys need: a journey whose
conditions read past events (`performed("Product Viewed", within 30d)`) is published only once the
computed traits behind them are defined there (profile:admin)."""

import json
from pathlib import Path

from cdp_kit.auth import token_digest
from cdpctl.platform import ORCHESTRATION, SERVICES, Workspace, service_environment


def test_orchestration_gets_the_profile_address_and_a_token_that_may_define_computed_traits(tmp_path):
    ws = Workspace(tmp_path / "home")
    ws.prepare(SERVICES)
    env = service_environment(
        ws,
        ORCHESTRATION,
        nats_url="nats://127.0.0.1:4222",
        grpc_port=50056,
        metrics_port=9469,
        http_port=None,
        peers={"profile": "127.0.0.1:50053", "segmentation": "127.0.0.1:50055"},
        named_ports={"collector.http": 8080},
    )
    assert env["CDP_PROFILE_ADDRESS"] == "127.0.0.1:50053"
    tokens = json.loads(ws.tokens_file.read_text())["tokens"]
    token = env.get("CDP_PROFILE_TOKEN") or Path(env["CDP_PROFILE_TOKEN_FILE"]).read_text().strip()
    (entry,) = [t for t in tokens if t["sha256"] == token_digest(token)]
    assert "profile:admin" in entry["scopes"]
    # Journeys are checked against the segments segmentation has (segmentation:read), with the same token.
    assert env["CDP_SEGMENTATION_ADDRESS"] == "127.0.0.1:50055"
    assert env["CDP_SEGMENTATION_TOKEN_FILE"] == env["CDP_PROFILE_TOKEN_FILE"]
    assert "segmentation:read" in entry["scopes"]
