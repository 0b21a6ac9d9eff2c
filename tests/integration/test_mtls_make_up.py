"""`make up` with mutual TLS between services (`cdpctl up --tls`, here through CDP_UP_TLS=1): every service
serves gRPC only over TLS and only to clients with a certificate from the workspace's CA, dials its peers
with its own certificate, and cdpctl does its work with its own. A client without a certificate, with one
from another CA, or speaking plaintext is refused on every service's gRPC port; the plaintext health-only
port answers probes."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp_testing.platform_run import RunningPlatform
from cdpctl import tls

SERVICES = ("collector", "identity", "profile", "scoring", "segmentation", "orchestration", "crm")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    # Without the channel servers and CRM emulators: what is tested is the services and the bus.
    with RunningPlatform(tmp_path_factory.mktemp("mtls"), env={"CDP_UP_TLS": "1"}, companions=False) as running:
        yield running


def cdpctl(platform: RunningPlatform, *args: str) -> str:
    result = platform.cdpctl(*args)
    assert result.returncode == 0, f"cdpctl {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result.stdout


def health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """The health answer, or the status code of the refusal."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_the_certificates_are_the_owners_alone(platform):
    client = platform.run["tls"]
    folder = Path(client["ca_file"]).parent
    assert folder == platform.home / "secrets" / "tls"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    names = {path.name for path in folder.iterdir()}
    assert {f"{name}.{kind}" for name in (*SERVICES, "cdpctl", "nats") for kind in ("crt", "key")} | {"ca.crt"} == names
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in folder.iterdir()} == {"0o600"}
    assert not any(name.startswith("ca.key") for name in names)  # nothing can sign another certificate


@pytest.mark.timeout(180)
def test_events_flow_and_cdpctl_works_over_mutual_tls(platform):
    status = json.loads(cdpctl(platform, "status", "--json"))
    assert status["healthy"], f"{status}\n{platform.log_tail()}"
    assert {name: svc["health"] for name, svc in status["services"].items()} == dict.fromkeys(SERVICES, "SERVING")

    # Collector (HTTP, unchanged) -> identity -> profile; segmentation defines its computed trait on profile
    # and orchestration reads profile, each with its own certificate; cdpctl reads with its own.
    cdpctl(platform, "journey", "create", str(ROOT / "docs/journeys/abandoned-cart.yaml"), "--publish")
    cdpctl(platform, "send", "identify", "--user-id", "tls-ada", "--traits", '{"first_name": "Ada"}')
    cdpctl(
        platform, "send", "track", "--user-id", "tls-ada", "--event", "Order Completed", "--properties", '{"total": 42}'
    )
    cdpctl(
        platform,
        "segment",
        "create",
        "tls_spenders",
        'sum(properties.total, event = "Order Completed", within 90d) > 40',
    )
    profile = json.loads(cdpctl(platform, "profile", "user_id", "tls-ada", "--wait", "30"))
    assert profile["traits"]["first_name"]["value"] == "Ada"
    deadline = time.monotonic() + 30
    while profile["personId"] not in cdpctl(platform, "segment", "members", "tls_spenders"):
        assert time.monotonic() < deadline, "the person never entered the segment"
        time.sleep(0.5)
    # Who asked is known by certificate: identity's own lookups answer cdpctl too.
    assert profile["personId"] in cdpctl(platform, "graph", "user_id", "tls-ada")


def test_every_grpc_port_refuses_clients_without_a_certificate_from_the_ca(platform, tmp_path):
    client = platform.run["tls"]
    ca = Path(client["ca_file"]).read_bytes()
    mine = tls.credentials(client)
    no_certificate = grpc.ssl_channel_credentials(root_certificates=ca)
    # A complete set from another development CA: a valid certificate, from the wrong authority.
    tls.ensure_certificates(tmp_path, ["stranger"])
    other = tls.files(tmp_path, "stranger")
    stranger = grpc.ssl_channel_credentials(
        root_certificates=ca,  # it trusts the platform's servers; they must not trust it
        private_key=Path(other["key_file"]).read_bytes(),
        certificate_chain=Path(other["cert_file"]).read_bytes(),
    )
    seen = {}
    for name in SERVICES:
        service = platform.service(name)
        address = service["grpc"]
        seen[name] = {
            "with cdpctl's certificate": health(address, mine),
            "plaintext": health(address, None),
            "no certificate": health(address, no_certificate),
            "another CA's certificate": health(address, stranger),
            "health port, plaintext": health(service["health"], None),
        }
    expected = {
        "with cdpctl's certificate": "SERVING",
        "plaintext": "UNAVAILABLE",
        "no certificate": "UNAVAILABLE",
        "another CA's certificate": "UNAVAILABLE",
        "health port, plaintext": "SERVING",
    }
    assert seen == dict.fromkeys(SERVICES, expected), platform.log_tail()


def test_the_health_port_serves_health_only(platform):
    from cdp.profile.v1 import profile_pb2, profile_pb2_grpc

    with grpc.insecure_channel(platform.service("profile")["health"]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            profile_pb2_grpc.ProfileServiceStub(channel).LookupProfile(
                profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value="tls-ada"),
                metadata=platform.admin_metadata,
                timeout=5,
            )
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
