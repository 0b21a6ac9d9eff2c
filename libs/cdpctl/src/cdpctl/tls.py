"""Mutual TLS between the services `cdpctl up --tls` runs (CDP_UP_TLS=1), and cdpctl's own client side.

`ensure_certificates` makes a development CA and one certificate per service (plus one for cdpctl, a
client like any other) under the workspace's `secrets/tls/`, owner-only (folder 0700, files 0600). The
same certificate serves a service's gRPC port and identifies it when it dials its peers
(`cdp_kit.service.client_channel`): each service gets CDP_TLS_CERT_FILE / CDP_TLS_KEY_FILE and
CDP_TLS_CLIENT_CA_FILE (the CA, which both requires client certificates on its port and is the root it
trusts when it calls a peer). A certificate names its service (CN, and a DNS name) and 127.0.0.1 /
localhost, where `make up` listens. The files are kept across runs and made again, all together, when one
is missing or about to expire.

With TLS on, the gRPC port accepts nothing else: no plaintext, no client without a certificate from this
CA. Kubelet-style probes get `CDP_HEALTH_PORT`, a plaintext port serving only grpc.health.v1 (run.json
records it as each service's "health"); cdpctl itself checks health and calls services over mutual TLS
with its own certificate, found through run.json's "tls". The collector's tracking HTTP API and the CRM
connector's webhooks stay plain HTTP (their callers are outside the platform).

NATS is under the same CA (`nats_server_config`, `nats_client_environment`): nats-server serves its
client port with the "nats" certificate (server use only: it cannot call a service) and requires every
client to present a certificate from the CA, as the chart's `natsAuth.tls` with `clientCertificate`
does. Each service connects with its own certificate (CDP_NATS_TLS_CA_FILE / _CERT_FILE / _KEY_FILE,
read by the kit's bus), cdpctl and tests with cdpctl's (`nats_context`, from run.json's "tls"); a
client without one, or speaking plain TCP, is refused. Its user and password are still asked for: TLS
says who may connect, the NATS user what it may do. The monitoring port stays plain HTTP on loopback.

The private keys never leave the files: nothing here logs or prints them.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cdpctl.platform import write_private

if TYPE_CHECKING:  # imported where used: every cdpctl command loads this module, few make certificates
    import ssl

    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CLIENT = "cdpctl"  # the certificate cdpctl (and tests, through run.json) present
NATS = "nats"  # nats-server's certificate: serves its client port, never a client itself
CA_DAYS = 365
LEAF_DAYS = 90
RENEW_BEFORE = datetime.timedelta(days=7)


def tls_dir(root: Path) -> Path:
    return root / "secrets" / "tls"


def files(root: Path, name: str) -> dict[str, str]:
    """Where `name`'s certificate and key are, and the CA: run.json's "tls" for cdpctl."""
    folder = tls_dir(root)
    return {
        "ca_file": str(folder / "ca.crt"),
        "cert_file": str(folder / f"{name}.crt"),
        "key_file": str(folder / f"{name}.key"),
    }


def _name(common: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cdp make up"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _still_good(path: Path, now: datetime.datetime) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc - RENEW_BEFORE > now


def ensure_certificates(root: Path, names: list[str] | tuple[str, ...]) -> None:
    """A CA and a certificate per name (and cdpctl's), made unless every one exists and is not about to
    expire. Made all together: certificates from an earlier CA never mix with a new one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = tls_dir(root)
    now = datetime.datetime.now(datetime.UTC)
    everyone = [*names, CLIENT, NATS]
    wanted = [Path(files(root, n)[k]) for n in everyone for k in ("cert_file", "key_file")] + [folder / "ca.crt"]
    if all(p.exists() for p in wanted) and all(_still_good(p, now) for p in wanted if p.suffix == ".crt"):
        return
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix: two workspaces' CAs are never the same name (nor, of course, the same key).
    ca_name = _name(f"cdp development CA {secrets.token_hex(4)}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    for name in everyone:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            # Every service is both: it serves its port and dials its peers with the same certificate.
            # nats-server only serves: its certificate does not get it into a service's gRPC port.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH]
                    if name == NATS
                    else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        where = files(root, name)
        write_private(Path(where["key_file"]), _pem_key(key))
        write_private(Path(where["cert_file"]), cert.public_bytes(serialization.Encoding.PEM))
    write_private(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    # The CA's key is not kept: nothing signs again until the whole set is made anew.


def service_environment(root: Path, name: str, health_port: int) -> dict[str, str]:
    """What turns mutual TLS on for one service: its certificate and key, the CA its clients' and its
    peers' certificates must chain to, and the plaintext health-only port."""
    where = files(root, name)
    return {
        "CDP_TLS_CERT_FILE": where["cert_file"],
        "CDP_TLS_KEY_FILE": where["key_file"],
        "CDP_TLS_CLIENT_CA_FILE": where["ca_file"],
        "CDP_HEALTH_PORT": str(health_port),
    }


def nats_client_environment(root: Path, name: str) -> dict[str, str]:
    """What makes one service connect to nats-server over mutual TLS (the kit's `NatsClientSettings`): the
    CA that signed the server's certificate, and its own certificate and key."""
    where = files(root, name)
    return {
        "CDP_NATS_TLS_CA_FILE": where["ca_file"],
        "CDP_NATS_TLS_CERT_FILE": where["cert_file"],
        "CDP_NATS_TLS_KEY_FILE": where["key_file"],
    }


def nats_server_config(root: Path) -> str:
    """nats-server's `tls {}` block: its certificate on the client port, and a client certificate from
    the CA required of everyone (the chart's natsAuth.tls with clientCertificate)."""
    from cdp_kit.natsauth import ServerTls

    where = files(root, NATS)
    return ServerTls(
        cert_file=Path(where["cert_file"]), key_file=Path(where["key_file"]), client_ca=Path(where["ca_file"])
    ).config()


def nats_context(client: dict[str, str] | None) -> ssl.SSLContext | None:
    """The TLS context a NATS connection presents from run.json's "tls" (None: plain TCP)."""
    from cdp_kit.natsauth import client_tls_context

    return client_tls_context(client)


def credentials(client: dict[str, str]) -> grpc.ChannelCredentials:
    """Channel credentials from run.json's "tls" (CA, certificate, key)."""
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=Path(client["ca_file"]).read_bytes(),
        private_key=Path(client["key_file"]).read_bytes(),
        certificate_chain=Path(client["cert_file"]).read_bytes(),
    )


# ------------------------------------------------------------------ cdpctl's channels to the services

# Which workspace's run.json says whether the platform speaks TLS (set by the CLI group for every
# command), or the client files themselves (set by `cdpctl up` before run.json exists).
_workspace_root: Path | None = None
_client: dict[str, str] | None = None


def use_workspace(root: Path) -> None:
    global _workspace_root
    _workspace_root = root


def use_client(client: dict[str, str] | None) -> None:
    global _client
    _client = client


def client_files() -> dict[str, str] | None:
    """cdpctl's certificate, key and CA when the platform runs with TLS, else None."""
    if _client is not None:
        return _client
    if _workspace_root is None:
        return None
    import json

    try:
        state = json.loads((_workspace_root / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return state.get("tls") or None


#: The most a service sends in one answer (profile's export: `cdp_profile.__main__.MAX_SEND_BYTES`, kept
#: equal by test_found_s42_cdpctl; the others send at most the kit's 16 MiB): gRPC's own client default is
#: 4 MiB, and a person's export whose profile part passed it (200 events of 25 KB; a timeline holds up to
#: 1,000 of up to 32 KB) came back with profile under "missing" however often it was asked. Not imported:
#: cdp_kit.service costs every command 80 ms.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),)


def aio_channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel to a service: mutual TLS with cdpctl's certificate when the platform uses it."""
    import grpc.aio

    client = client_files()
    if client is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, credentials(client), options=CHANNEL_OPTIONS)


def channel(address: str) -> grpc.Channel:
    """A blocking channel to a service, as `aio_channel`."""
    import grpc

    client = client_files()
    if client is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, credentials(client), options=CHANNEL_OPTIONS)
