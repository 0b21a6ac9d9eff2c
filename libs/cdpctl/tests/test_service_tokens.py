"""The tokens `cdpctl up` gives the services for their calls to each other: each service presents a token
of its own, carrying the read scope of each peer it calls (`ServiceProcess.calls`, as the chart's `calls`)
and its own extra scopes, and nothing else - so a service's token cannot call a service it does not call."""

from __future__ import annotations

from cdp_kit.auth import TokenAuthenticator
from cdpctl.platform import SERVICES, Workspace, service_environment

# The services whose gRPC API checks scopes of its own (`<service>:read` and up).
CALLABLE = ("identity", "profile", "scoring", "segmentation", "orchestration")


def test_each_services_token_reads_only_the_peers_it_calls(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.prepare()
    peers = {name: f"127.0.0.1:{50000 + i}" for i, name in enumerate(CALLABLE)}
    authenticator = TokenAuthenticator(ws.tokens_file)
    seen = set()
    for svc in SERVICES:
        env = service_environment(
            ws,
            svc,
            nats_url="nats://127.0.0.1:4222",
            grpc_port=1,
            metrics_port=2,
            http_port=None,
            peers=peers,
            named_ports={"collector.http": 8080, "crm.http": 8035},
        )
        files = {env[f"CDP_{peer.upper()}_TOKEN_FILE"] for peer in svc.calls}
        if not svc.calls:
            assert not [v for v in env if v.endswith("_TOKEN_FILE") and v.startswith("CDP_")], svc.name
            continue
        (token_file,) = files  # one token for all its calls
        caller = authenticator.authenticate(f"Bearer {open(token_file).read().strip()}")
        seen.add(caller.name)
        for peer in CALLABLE:
            assert caller.allows(f"{peer}:read") == (peer in svc.calls), f"{svc.name} reading {peer}"
        assert all(caller.allows(scope) for scope in svc.extra_scopes), svc.name
        assert not caller.allows("profile:admin") or "profile:admin" in svc.extra_scopes, svc.name
    assert len(seen) == len([svc for svc in SERVICES if svc.calls]), "a token of its own per calling service"
