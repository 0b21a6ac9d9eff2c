"""`cdpctl up --tls`'s certificates: owner-only, kept across runs, made again together, and what a service
gets in its environment."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdpctl import tls


def _cert(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def test_each_service_gets_a_certificate_from_one_ca_readable_by_its_owner_only(tmp_path):
    tls.ensure_certificates(tmp_path, ["identity", "profile"])
    folder = tls.tls_dir(tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == [
        "ca.crt", "cdpctl.crt", "cdpctl.key", "identity.crt", "identity.key", "nats.crt", "nats.key",
        "profile.crt", "profile.key",
    ]  # fmt: skip
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}
    ca = _cert(tls.files(tmp_path, "profile")["ca_file"])
    cert = _cert(tls.files(tmp_path, "profile")["cert_file"])
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"profile", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)


def test_certificates_are_kept_and_made_again_all_together(tmp_path):
    tls.ensure_certificates(tmp_path, ["profile"])
    first = Path(tls.files(tmp_path, "profile")["cert_file"]).read_bytes()
    tls.ensure_certificates(tmp_path, ["profile"])
    assert Path(tls.files(tmp_path, "profile")["cert_file"]).read_bytes() == first
    # A new service (or a lost file) makes the whole set again, from a new CA every old one is not from.
    tls.ensure_certificates(tmp_path, ["profile", "identity"])
    ca = _cert(tls.files(tmp_path, "identity")["ca_file"])
    assert Path(tls.files(tmp_path, "profile")["cert_file"]).read_bytes() != first
    _cert(tls.files(tmp_path, "profile")["cert_file"]).verify_directly_issued_by(ca)
    assert _cert(tls.files(tmp_path, "cdpctl")["cert_file"]).not_valid_after_utc > datetime.datetime.now(
        datetime.UTC
    ) + datetime.timedelta(days=30)


def test_a_service_serves_tls_requires_client_certificates_and_has_a_plain_health_port(tmp_path):
    env = tls.service_environment(tmp_path, "scoring", 23456)
    assert env == {
        "CDP_TLS_CERT_FILE": str(tls.tls_dir(tmp_path) / "scoring.crt"),
        "CDP_TLS_KEY_FILE": str(tls.tls_dir(tmp_path) / "scoring.key"),
        "CDP_TLS_CLIENT_CA_FILE": str(tls.tls_dir(tmp_path) / "ca.crt"),
        "CDP_HEALTH_PORT": "23456",
    }
