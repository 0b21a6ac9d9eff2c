"""Services over mutual TLS, as the prod values run them: identity serves TLS and requires client
certificates; profile serves TLS and calls identity with its own certificate for LookupProfile."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_identity.__main__ import setup as identity_setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus import Bus, OutMessage, events_raw_stream, partition_for
from cdp_kit.service import serving
from cdp_profile.__main__ import setup as profile_setup
from cdp_profile.settings import ProfileSettings


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue(tmp_path, common: str, ca_key, ca_cert, *, is_ca: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject if ca_cert else _name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key or key, hashes.SHA256())
    cert_file, key_file = tmp_path / f"{common}.crt", tmp_path / f"{common}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key, cert, cert_file, key_file


@pytest.mark.timeout(60)
async def test_profile_looks_up_through_identity_over_mutual_tls(nats_server, tmp_path):
    ca_key, ca_cert, ca_file, _ = issue(tmp_path, "cdp-ca", None, None, is_ca=True)
    _, _, identity_cert, identity_key = issue(tmp_path, "identity", ca_key, ca_cert)
    _, _, profile_cert, profile_key = issue(tmp_path, "profile", ca_key, ca_cert)
    _, _, client_cert, client_key = issue(tmp_path, "client", ca_key, ca_cert)
    common = dict(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2,
        shutdown_grace=1.0, tls_client_ca_file=ca_file,
    )  # fmt: skip
    identity = IdentitySettings(
        **common, tls_cert_file=identity_cert, tls_key_file=identity_key, store_url="memory://", batch_size=10
    )
    async with serving(identity, identity_setup) as i:
        profile = ProfileSettings(
            **common,
            tls_cert_file=profile_cert,
            tls_key_file=profile_key,
            store_url="memory://",
            identity_address=f"localhost:{i.grpc.port}",
        )
        async with serving(profile, profile_setup) as p, Bus.connect(nats_server.url, name="tls-test") as bus:
            await bus.ensure_streams(events_raw_stream())
            event = events_pb2.Event(
                message_id="m1", source_id="web", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id="tls-user"
            )
            event.traits.update({"plan": "pro"})
            await bus.publisher.publish_batch(
                [OutMessage(f"events.raw.{partition_for('tls-user', 2)}", event.SerializeToString(), "web:m1")]
            )
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca_file.read_bytes(),
                private_key=client_key.read_bytes(),
                certificate_chain=client_cert.read_bytes(),
            )
            async with grpc.aio.secure_channel(f"localhost:{p.grpc.port}", credentials) as channel:
                stub = profile_pb2_grpc.ProfileServiceStub(channel)
                request = profile_pb2.LookupProfileRequest(identifier_type="user_id", identifier_value="tls-user")
                found = None
                for _ in range(200):
                    try:
                        found = await stub.LookupProfile(request, timeout=5)
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    await asyncio.sleep(0.05)
                assert found is not None and found.traits["plan"].value.string_value == "pro"
            # Without a client certificate the server refuses the connection.
            plain = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{p.grpc.port}", plain) as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await profile_pb2_grpc.ProfileServiceStub(channel).LookupProfile(request, timeout=5)
