"""A gRPC server's certificate renewed in place (cert-manager updating the Secret a pod mounts) is served to
new connections without a restart; a set that does not hold together keeps the last good one served."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cdp_kit.service import serving
from cdp_kit.settings import ServiceSettings
from cdp_kit.telemetry import setup_telemetry
from cdp_kit.tls_reload import ServerCertificates, certificate_facts
from cdpctl import tls

NAME = "kit-tls"


def _make_ca(root: Path) -> dict[str, Path]:
    """A development CA's files: the server's certificate and key, the CA, and a client's certificate and key."""
    tls.ensure_certificates(root, [NAME])
    server, client = tls.files(root, NAME), tls.files(root, tls.CLIENT)
    return {
        "tls.crt": Path(server["cert_file"]),
        "tls.key": Path(server["key_file"]),
        "ca.crt": Path(server["ca_file"]),
        "client.crt": Path(client["cert_file"]),
        "client.key": Path(client["key_file"]),
    }


class SecretVolume:
    """A folder laid out as the kubelet mounts a Secret: `tls.crt -> ..data/tls.crt`, `..data -> ..<version>`,
    and an update writes a new version folder, then swaps `..data` by a rename."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.version = 0

    def publish(self, files: dict[str, bytes]) -> None:
        self.version += 1
        version = self.folder / f"..v{self.version}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        staging = self.folder / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.folder / "..data")
        for name in files:
            link = self.folder / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def path(self, name: str) -> Path:
        return self.folder / name


def _served(ca: dict[str, Path], key_from: dict[str, Path] | None = None) -> dict[str, bytes]:
    return {
        "tls.crt": ca["tls.crt"].read_bytes(),
        "tls.key": (key_from or ca)["tls.key"].read_bytes(),
        "ca.crt": ca["ca.crt"].read_bytes(),
    }


async def _check(port: int, ca: dict[str, Path]) -> grpc.StatusCode:
    """A health check over a new connection from a client of `ca` (trusting only that CA)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca["ca.crt"].read_bytes(),
        private_key=ca["client.key"].read_bytes(),
        certificate_chain=ca["client.crt"].read_bytes(),
    )
    # Its own subchannel pool: never a connection another channel already made.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


def _not_after(reader: InMemoryMetricReader) -> list[float]:
    data = reader.get_metrics_data()
    return [
        point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "cdp.tls.certificate.not_after"
        for point in metric.data.data_points
        if point.attributes.get("service") == NAME
    ]


def _expiry(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


async def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cdp.service.tls")
    a, b = _make_ca(tmp_path / "a"), _make_ca(tmp_path / "b")
    secret = SecretVolume(tmp_path / "secret")
    secret.publish(_served(a))
    settings = ServiceSettings(
        nats_url="nats://unused:4222",
        service_name=NAME,
        grpc_host="127.0.0.1",
        auth_mode="none",
        shutdown_grace=1.0,
        tls_cert_file=secret.path("tls.crt"),
        tls_key_file=secret.path("tls.key"),
        tls_client_ca_file=secret.path("ca.crt"),
    )
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(NAME, metric_readers=[reader])

    async def setup(_runtime):
        return None

    async with serving(settings, setup, telemetry=telemetry) as rt:
        port = rt.grpc.port
        assert await _check(port, a) == grpc.StatusCode.OK
        assert await _check(port, b) == grpc.StatusCode.UNAVAILABLE  # B's client trusts only B's CA
        assert _not_after(reader) == [_expiry(a["tls.crt"])]

        secret.publish(_served(b))  # the renewal: another CA's set, swapped in as the kubelet does
        assert await _check(port, b) == grpc.StatusCode.OK
        assert await _check(port, a) == grpc.StatusCode.UNAVAILABLE
        assert _not_after(reader) == [_expiry(b["tls.crt"])]
        taken = [r for r in caplog.records if r.levelno == logging.INFO and "renewed" in r.getMessage()]
        assert len(taken) == 1

        # A certificate with another certificate's key: B's set stays served, and one warning says why.
        secret.publish(_served(a, key_from=b))
        assert await _check(port, b) == grpc.StatusCode.OK
        assert await _check(port, b) == grpc.StatusCode.OK
        assert await _check(port, a) == grpc.StatusCode.UNAVAILABLE
        assert _not_after(reader) == [_expiry(b["tls.crt"])]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "CDP_TLS_CERT_FILE and CDP_TLS_KEY_FILE" in warnings[0]
        key_text = a["tls.key"].read_text() + b["tls.key"].read_text()
        assert not any(line in r.getMessage() for r in caplog.records for line in key_text.splitlines()[1:-1])

        # Put right, the next connection takes it.
        secret.publish(_served(a))
        assert await _check(port, a) == grpc.StatusCode.OK
        assert _not_after(reader) == [_expiry(a["tls.crt"])]


def test_a_set_that_does_not_hold_together_stops_start_up_naming_the_variables(tmp_path):
    a, b = _make_ca(tmp_path / "a"), _make_ca(tmp_path / "b")
    certificates = ServerCertificates(a["tls.crt"], b["tls.key"], a["ca.crt"], NAME)
    with pytest.raises(ValueError, match="CDP_TLS_CERT_FILE and CDP_TLS_KEY_FILE"):
        certificates.initial()
    half = tmp_path / "half.crt"
    half.write_bytes(a["tls.crt"].read_bytes()[:200])
    with pytest.raises(ValueError, match="CDP_TLS_CERT_FILE"):
        ServerCertificates(half, a["tls.key"], None, NAME).initial()


def test_the_serial_and_expiry_are_read_from_the_certificate(tmp_path):
    a = _make_ca(tmp_path / "a")
    for path in (a["tls.crt"], a["ca.crt"]):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        assert certificate_facts(path.read_bytes()) == (cert.serial_number, cert.not_valid_after_utc)
    # Past 2049 a certificate's times are GeneralizedTime, before it UTCTime (RFC 5280).
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "far")])
    far = datetime.datetime(2051, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(2**150 + 7)
        .not_valid_before(datetime.datetime(2049, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(far)
        .sign(key, hashes.SHA256())
    )
    assert certificate_facts(cert.public_bytes(serialization.Encoding.PEM)) == (2**150 + 7, far)
    with pytest.raises(ValueError):
        certificate_facts(b"not a certificate")


def test_the_fetcher_never_raises_into_grpc(tmp_path):
    a = _make_ca(tmp_path / "a")
    folder = tmp_path / "files"
    folder.mkdir()
    for name in ("tls.crt", "tls.key"):
        shutil.copy(a[name], folder / name)
    certificates = ServerCertificates(folder / "tls.crt", folder / "tls.key", None, NAME)
    certificates.initial()
    assert certificates.fetch() is None  # unchanged
    (folder / "tls.key").unlink()  # mid-swap: a file missing
    assert certificates.fetch() is None
    shutil.copy(a["tls.key"], folder / "tls.key")
    assert certificates.fetch() is not None  # the same, good set again: taken
