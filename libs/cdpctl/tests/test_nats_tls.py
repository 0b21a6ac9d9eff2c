"""`cdpctl up --tls` covers NATS: nats-server serves TLS with a certificate of its own from the workspace's
CA and requires a client certificate from that CA of every client (the chart's natsAuth.tls with
clientCertificate); each service connects with its own, cdpctl's bus commands and tests (through run.json)
with cdpctl's. Without --tls nothing of this is there.

The certificates and the configuration are checked here directly; the rest on a real `cdpctl up --tls`."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdp_kit.natsauth import NatsClientSettings
from cdp_testing.platform_run import RunningPlatform
from cdpctl import tls
from cdpctl.cli import main
from cdpctl.platform import NATS_SERVER_CONFIG, SERVICES, Workspace, nats_server_config

SERVICE_NAMES = tuple(svc.name for svc in SERVICES)


def _cert(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


# ------------------------------------------------------------------------------- without a platform


def test_nats_server_gets_a_certificate_that_serves_and_cannot_call_a_service(tmp_path):
    tls.ensure_certificates(tmp_path, ["profile"])
    where = tls.files(tmp_path, tls.NATS)
    cert = _cert(where["cert_file"])
    cert.verify_directly_issued_by(_cert(where["ca_file"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "nats" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}  # where make up listens
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_a_workspace_whose_certificates_predate_nats_gets_the_whole_set_again(tmp_path):
    tls.ensure_certificates(tmp_path, ["profile"])
    before = Path(tls.files(tmp_path, "profile")["cert_file"]).read_bytes()
    for kind in ("cert_file", "key_file"):
        Path(tls.files(tmp_path, tls.NATS)[kind]).unlink()
    tls.ensure_certificates(tmp_path, ["profile"])
    ca = _cert(tls.files(tmp_path, tls.NATS)["ca_file"])
    _cert(tls.files(tmp_path, tls.NATS)["cert_file"]).verify_directly_issued_by(ca)
    assert Path(tls.files(tmp_path, "profile")["cert_file"]).read_bytes() != before  # one CA for all


def test_each_service_connects_to_nats_with_its_own_certificate(tmp_path):
    assert tls.nats_client_environment(tmp_path, "segmentation") == {
        "CDP_NATS_TLS_CA_FILE": str(tls.tls_dir(tmp_path) / "ca.crt"),
        "CDP_NATS_TLS_CERT_FILE": str(tls.tls_dir(tmp_path) / "segmentation.crt"),
        "CDP_NATS_TLS_KEY_FILE": str(tls.tls_dir(tmp_path) / "segmentation.key"),
    }


def test_nats_server_requires_client_certificates_only_with_tls(tmp_path):
    ws = Workspace(tmp_path / "home")
    assert nats_server_config(ws) == NATS_SERVER_CONFIG  # `make up` without --tls: unchanged
    config = nats_server_config(ws, use_tls=True)
    assert config.startswith(NATS_SERVER_CONFIG)  # the users stay
    folder = tls.tls_dir(ws.root)
    assert f'cert_file: "{folder / "nats.crt"}"' in config
    assert f'key_file: "{folder / "nats.key"}"' in config
    assert f'ca_file: "{folder / "ca.crt"}"' in config
    assert "verify: true" in config


# ------------------------------------------------------------------------------- on `cdpctl up --tls`


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    # Without the channel servers and CRM emulators: what is tested is the services and the bus.
    with RunningPlatform(tmp_path_factory.mktemp("nats-tls"), env={"CDP_UP_TLS": "1"}, companions=False) as running:
        yield running


def cdpctl(platform: RunningPlatform, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`cdpctl --home <the platform's home> *args` in this process, as conftest's `Cli` runs it (an
    interpreter of its own per command, polled once a second by the lag loop, cost ~0.35 s of CPU each):
    the same command code, reading run.json's "tls" to present cdpctl's certificate."""
    try:
        done = CliRunner().invoke(main, ["--home", str(platform.home), *args], catch_exceptions=False)
    finally:
        tls.use_workspace(None)  # no later test in this process picks up this platform's certificate
    result = subprocess.CompletedProcess(args, done.exit_code, done.stdout, done.stderr)
    if ok:
        assert result.returncode == 0, f"cdpctl {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result


def connections(platform: RunningPlatform) -> list[dict]:
    with urllib.request.urlopen(f"{platform.run['nats_monitor']}/connz?auth=true&limit=1024", timeout=5) as reply:
        return json.loads(reply.read())["connections"]


@pytest.mark.timeout(240)
def test_events_and_cdpctls_bus_commands_go_over_mutual_tls(platform):
    # Every service is connected, as its own user, over TLS.
    by_user = {c.get("authorized_user", ""): c for c in connections(platform)}
    assert set(SERVICE_NAMES) <= set(by_user), sorted(by_user)
    assert {name: bool(by_user[name].get("tls_version")) for name in SERVICE_NAMES} == dict.fromkeys(
        SERVICE_NAMES, True
    )

    # collector (HTTP) -> events.raw -> identity -> events.resolved -> profile, all on the TLS bus.
    cdpctl(platform, "send", "identify", "--user-id", "nats-tls-ada", "--traits", '{"first_name": "Ada"}')
    profile = json.loads(cdpctl(platform, "profile", "user_id", "nats-tls-ada", "--wait", "60").stdout)
    assert profile["traits"]["first_name"]["value"] == "Ada"

    # `cdpctl lag` and `dlq` reach the bus with cdpctl's certificate (run.json's "tls").
    deadline = time.monotonic() + 60
    while True:
        rows = json.loads(cdpctl(platform, "lag", "--json").stdout)
        consumers = {(row["stream"], row["consumer"]) for row in rows}
        behind = [row for row in rows if row["pending"] or row["ack_pending"]]
        if ("EVENTS_RESOLVED", "profile-p0") in consumers and not behind:
            break
        assert time.monotonic() < deadline, f"consumers behind: {behind}"
        time.sleep(1)
    assert json.loads(cdpctl(platform, "dlq", "--json").stdout) == {"dead_letters": [], "replayed": 0, "more": False}
    misspelt = cdpctl(platform, "dlq", "EVENTS_RAW", "no-such-consumer", ok=False)
    assert misspelt.returncode == 2 and "no consumer named 'no-such-consumer'" in misspelt.stderr, misspelt.stderr

    # `delete --wait` follows the privacy consumers on the bus the same way.
    deleted = json.loads(
        cdpctl(platform, "delete", "user_id", "nats-tls-ada", "--yes", "--wait", "--timeout", "90").stdout
    )
    assert deleted["acknowledged"] and all(deleted["acknowledged"].values()), deleted


async def _refusal(url: str, **options) -> str:
    """Why nats-server refused a connection (its class name), or "connected"."""
    try:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False, **options)
    except Exception as exc:  # what nats.py raises differs by the step that failed
        return type(exc).__name__
    await nc.close()
    return "connected"


def _plain_client_answer(url: str) -> tuple[dict, bytes]:
    """A client speaking plain TCP, as nats.py without TLS would if it did not upgrade: the server's INFO,
    and what it answers to a CONNECT and a PING sent in the clear."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.settimeout(10)
        info = b""
        while not info.endswith(b"\r\n"):
            info += sock.recv(4096)
        connect = {"user": where.username, "pass": where.password, "verbose": False, "pedantic": False}
        try:
            sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            answer = b""
    return json.loads(info.removeprefix(b"INFO ").strip()), answer


@pytest.mark.asyncio
async def test_nats_refuses_clients_without_a_certificate_from_the_ca(platform, tmp_path):
    url = platform.nats_url  # the operator's user and password: only the certificate is missing
    client = platform.run["tls"]
    ca_only = ssl.create_default_context(cafile=client["ca_file"])
    tls.ensure_certificates(tmp_path, ["stranger"])  # a complete set from another development CA
    other = tls.files(tmp_path, "stranger")
    stranger = ssl.create_default_context(cafile=client["ca_file"])  # trusts the platform's server...
    stranger.load_cert_chain(other["cert_file"], other["key_file"])  # ...which must not trust it
    seen = {
        "with cdpctl's certificate": await _refusal(url, tls=platform.nats_tls),
        "nats.py without TLS options": await _refusal(url),
        "the CA but no certificate": await _refusal(url, tls=ca_only),
        "another CA's certificate": await _refusal(url, tls=stranger),
    }
    assert seen["with cdpctl's certificate"] == "connected"
    assert {k: v for k, v in seen.items() if v == "connected"} == {"with cdpctl's certificate": "connected"}, seen

    info, answer = _plain_client_answer(url)
    assert info["tls_required"] is True and info.get("tls_verify") is True, info
    assert b"PONG" not in answer, answer  # nothing is served in the clear

    # The run.json helper tests use (cdp_testing) connects as cdpctl does.
    nc = await platform.connect_nats()
    try:
        assert (await nc.jetstream().stream_info("EVENTS_RAW")).config.name == "EVENTS_RAW"
    finally:
        await nc.close()
    # And a service's own settings (CDP_NATS_TLS_* as `cdpctl up` sets them) are what its bus presents.
    service = NatsClientSettings.from_environment(tls.nats_client_environment(platform.home, "profile"))
    assert await _refusal(url, tls=service.tls_context()) == "connected"


@pytest.mark.timeout(240)
def test_rotation_and_a_restarted_nats_server_keep_tls(platform):
    # A service given new credentials reconnects with them, still with its certificate.
    # (cdpctl's own wait, 90 s, reports a service that does not follow)
    cdpctl(platform, "nats-rotate", "segmentation", "--timeout", "90")
    by_user = {c.get("authorized_user", ""): c for c in connections(platform)}
    assert "segmentation" not in by_user and by_user["segmentation.2"].get("tls_version"), sorted(by_user)

    # nats-server that dies comes back with the same TLS configuration; the services reconnect over it.
    platform.wait_nats_restarted(platform.kill_nats())
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(OSError):
            by_user = {c.get("authorized_user", ""): c for c in connections(platform)}
            expected = {"segmentation.2" if name == "segmentation" else name for name in SERVICE_NAMES}
            if expected <= set(by_user) and all(by_user[name].get("tls_version") for name in expected):
                break
        assert time.monotonic() < deadline, f"not all services reconnected over TLS: {sorted(by_user)}"
        time.sleep(1)
    info, answer = _plain_client_answer(platform.nats_url)
    assert info["tls_required"] is True and b"PONG" not in answer
