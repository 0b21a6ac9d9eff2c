"""A service's outgoing calls present its renewed client certificate, and trust its renewed CA, without a
restart: cert-manager renews the Secret the pod mounts, and the next call goes out with the new set, on the
stubs built at start too. Calls started before the renewal finish where they started; a set that does not
hold together keeps the last good one in use, with one warning."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cdp_kit import tls_client
from cdp_kit.service import client_channel
from cdp_kit.settings import ServiceSettings, env
from cdp_kit.tls_reload import ServerCertificates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tls_reload import SecretVolume, _make_ca

NAME = "kit-tls-client"
TLS_LOG = tls_client.log.name  # "cdp.service.tls", the reload's logger on both sides


@dataclasses.dataclass(frozen=True)
class CallerSettings(ServiceSettings):
    profile_address: str = env("CDP_PROFILE_ADDRESS", "")


def _serial(pem: Path | bytes) -> int:
    return x509.load_pem_x509_certificate(pem if isinstance(pem, bytes) else pem.read_bytes()).serial_number


class Peer:
    """A gRPC server requiring client certificates, served from a Secret volume it reloads (the kit's
    ServerCertificates); every method answers with the serial of the client certificate of its connection
    and the authorization the call carried. `Held` answers once `release` is set."""

    def __init__(self, volume: SecretVolume) -> None:
        self.volume = volume
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.address = ""

    @staticmethod
    def _who(context: grpc.aio.ServicerContext) -> bytes:
        serial = _serial(context.auth_context()["x509_pem_cert"][0])
        authorization = dict(context.invocation_metadata()).get("authorization", "")
        return f"{serial:x} {authorization}".encode()

    async def _unary(self, request: bytes, context) -> bytes:
        return self._who(context)

    async def _held(self, request: bytes, context) -> bytes:
        who = self._who(context)
        self.arrived.set()
        await self.release.wait()
        return who

    async def _unary_stream(self, request: bytes, context) -> AsyncIterator[bytes]:
        for _ in range(2):
            yield self._who(context)

    async def _stream_unary(self, requests, context) -> bytes:
        async for _request in requests:
            pass
        return self._who(context)

    async def _stream_stream(self, requests, context) -> AsyncIterator[bytes]:
        async for _request in requests:
            yield self._who(context)

    async def __aenter__(self) -> Peer:
        certificates = ServerCertificates(
            self.volume.path("tls.crt"), self.volume.path("tls.key"), self.volume.path("ca.crt"), "kit-tls-peer"
        )
        credentials = grpc.dynamic_ssl_server_credentials(
            certificates.initial(), certificates.fetch, require_client_authentication=True
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Peer",
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
                        "Held": grpc.unary_unary_rpc_method_handler(self._held),
                        "UnaryStream": grpc.unary_stream_rpc_method_handler(self._unary_stream),
                        "StreamUnary": grpc.stream_unary_rpc_method_handler(self._stream_unary),
                        "StreamStream": grpc.stream_stream_rpc_method_handler(self._stream_stream),
                    },
                ),
            )
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self.server, self.address = server, f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_exc) -> None:
        assert self.server is not None
        await self.server.stop(0)


class PeerStub:
    """What a generated stub is: the four kinds of multicallable, made once on the channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Unary = channel.unary_unary("/test.Peer/Unary", _registered_method=True)
        self.Held = channel.unary_unary("/test.Peer/Held", _registered_method=True)
        self.UnaryStream = channel.unary_stream("/test.Peer/UnaryStream", _registered_method=True)
        self.StreamUnary = channel.stream_unary("/test.Peer/StreamUnary", _registered_method=True)
        self.StreamStream = channel.stream_stream("/test.Peer/StreamStream", _registered_method=True)

    async def every_kind(self) -> set[bytes]:
        """What the peer answered to a call of each kind."""

        async def two():
            yield b"1"
            yield b"2"

        answers = [await self.Unary(b"", timeout=10)]
        answers += [reply async for reply in self.UnaryStream(b"", timeout=10)]
        answers.append(await self.StreamUnary(two(), timeout=10))
        answers += [reply async for reply in self.StreamStream(two(), timeout=10)]
        assert len(answers) == 6
        return set(answers)


def _client_files(ca: dict[str, Path], key_from: dict[str, Path] | None = None) -> dict[str, bytes]:
    """What the Secret of a service holds when it calls with its certificate from `ca`."""
    return {
        "tls.crt": ca["client.crt"].read_bytes(),
        "tls.key": (key_from or ca)["client.key"].read_bytes(),
        "ca.crt": ca["ca.crt"].read_bytes(),
    }


def _peer_files(ca: dict[str, Path]) -> dict[str, bytes]:
    return {name: ca[name].read_bytes() for name in ("tls.crt", "tls.key", "ca.crt")}


def _trusting_both(files: dict[str, bytes], one: dict[str, Path], two: dict[str, Path]) -> dict[str, bytes]:
    """`files` with a CA file holding both CAs: a peer that accepts either's clients, a client that accepts
    either's servers."""
    return {**files, "ca.crt": one["ca.crt"].read_bytes() + two["ca.crt"].read_bytes()}


@pytest.fixture(autouse=True)
def own_sets(monkeypatch):
    """The process's sets (`tls_client._SHARED`) are the test's own, and let go after it: those of earlier
    tests, kept for the process's life, would go on reporting `cdp.tls.certificate.not_after` for NAME."""
    monkeypatch.setattr(tls_client, "_SHARED", {})


@pytest.fixture
def every_call_looks(monkeypatch):
    """The files are stat'ed at each call rather than once a second: a renewal is seen by the next call."""
    monkeypatch.setattr(tls_client, "CHECK_SECONDS", 0.0)


def _caller(volume: SecretVolume, peer: Peer) -> CallerSettings:
    return CallerSettings(
        nats_url="nats://unused:4222",
        service_name=NAME,
        auth_mode="none",
        profile_address=peer.address,
        tls_cert_file=volume.path("tls.crt"),
        tls_key_file=volume.path("tls.key"),
        tls_client_ca_file=volume.path("ca.crt"),
    )


def _client_not_after(reader: InMemoryMetricReader) -> list[float]:
    data = reader.get_metrics_data()
    return [
        point.value
        for resource in (data.resource_metrics if data is not None else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "cdp.tls.certificate.not_after"
        for point in metric.data.data_points
        if point.attributes.get("service") == NAME and point.attributes.get("side") == "client"
    ]


def _expiry(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


async def test_a_stub_built_before_the_renewal_calls_with_the_renewed_certificate(tmp_path, every_call_looks, caplog):
    caplog.set_level(logging.INFO, logger="cdp.service.tls")
    one, two = _make_ca(tmp_path / "ca1"), _make_ca(tmp_path / "ca2")
    token = tmp_path / "profile.token"
    token.write_text("cdp_peer\n")
    served, mine = SecretVolume(tmp_path / "peer"), SecretVolume(tmp_path / "mine")
    served.publish(_peer_files(one))  # the peer requires client certificates from CA-1
    mine.publish(_client_files(one))
    reader = InMemoryMetricReader()
    # A provider of the test's own, never the process's global one: set as the global provider (what
    # setup_telemetry does when none is set yet), the default meter of the channels of earlier tests, which
    # share NAME, would report to this reader too ([CA-1's expiry] * 2 when another test ran first).
    meter = MeterProvider(metric_readers=[reader]).get_meter(f"cdp.{NAME}")

    async with Peer(served) as peer:
        environ = {"CDP_PROFILE_TOKEN_FILE": str(token)}
        async with client_channel(_caller(mine, peer), peer.address, environ=environ, meter=meter) as channel:
            stub = PeerStub(channel)
            assert await stub.every_kind() == {f"{_serial(one['client.crt']):x} Bearer cdp_peer".encode()}
            assert _client_not_after(reader) == [_expiry(one["client.crt"])]

            # cert-manager moves both to CA-2: the peer takes its set at the next handshake (its own reload),
            # and from then on requires client certificates from CA-2.
            served.publish(_peer_files(two))
            mine.publish(_client_files(two))
            # The same stub, the same channel: the calls present the certificate from CA-2, trust the peer's
            # new one, and still carry the token (the channel's interceptors).
            assert await stub.every_kind() == {f"{_serial(two['client.crt']):x} Bearer cdp_peer".encode()}
            assert _client_not_after(reader) == [_expiry(two["client.crt"])]
            renewed = [r.getMessage() for r in caplog.records if "client certificate renewed" in r.getMessage()]
            assert len(renewed) == 1
            assert f"{_serial(two['client.crt']):x}" in renewed[0]
            # A multicallable made after the renewal, and the channel's state, are those of the new set.
            assert await channel.unary_unary("/test.Peer/Unary")(b"", timeout=10) == (
                f"{_serial(two['client.crt']):x} Bearer cdp_peer".encode()
            )
            await channel.channel_ready()
            assert channel.get_state() == grpc.ChannelConnectivity.READY


async def test_a_call_in_flight_during_the_renewal_completes_on_its_channel(tmp_path, every_call_looks, monkeypatch):
    monkeypatch.setattr(tls_client, "RETIRE_SECONDS", 3600.0)  # closed when idle, not at the deadline
    one, two = _make_ca(tmp_path / "ca1"), _make_ca(tmp_path / "ca2")
    served, mine = SecretVolume(tmp_path / "peer"), SecretVolume(tmp_path / "mine")
    # A peer trusting both CAs' clients, so the call that started with CA-1's certificate may go on.
    served.publish(_trusting_both(_peer_files(one), one, two))
    mine.publish(_client_files(one))
    trust_both = _trusting_both(_client_files(two), one, two)

    token = tmp_path / "profile.token"
    token.write_text("cdp_peer\n")
    environ = {"CDP_PROFILE_TOKEN_FILE": str(token)}  # calls go through the bearer interceptors

    async with Peer(served) as peer, client_channel(_caller(mine, peer), peer.address, environ=environ) as channel:
        stub = PeerStub(channel)
        held = asyncio.ensure_future(stub.Held(b"", timeout=30))
        await peer.arrived.wait()  # the call is at the peer, on the first channel

        mine.publish(trust_both)
        assert await stub.Unary(b"", timeout=10) == f"{_serial(two['client.crt']):x} Bearer cdp_peer".encode()
        assert isinstance(channel, tls_client.FollowingChannel)
        assert channel.retiring == 1  # the first channel stays open for the call it carries

        peer.release.set()
        assert await held == f"{_serial(one['client.crt']):x} Bearer cdp_peer".encode()
        await channel.retired()  # closed once its last call ended
        assert channel.retiring == 0
        assert await stub.Unary(b"", timeout=10) == f"{_serial(two['client.crt']):x} Bearer cdp_peer".encode()


async def test_a_set_that_does_not_hold_together_keeps_the_last_good_one_with_one_warning(
    tmp_path, every_call_looks, caplog
):
    one, two = _make_ca(tmp_path / "ca1"), _make_ca(tmp_path / "ca2")
    served, mine = SecretVolume(tmp_path / "peer"), SecretVolume(tmp_path / "mine")
    served.publish(_trusting_both(_peer_files(one), one, two))
    mine.publish(_client_files(one))

    async with Peer(served) as peer:
        first = client_channel(_caller(mine, peer), peer.address, environ={})
        second = client_channel(_caller(mine, peer), peer.address, environ={})  # another peer's, same files
        async with first, second:
            stubs = [PeerStub(first), PeerStub(second)]
            caplog.clear()
            # CA-2's client certificate with CA-1's client key: a renewal written wrong.
            mine.publish(_client_files(two, key_from=one))
            for _ in range(3):
                for stub in stubs:
                    assert await stub.every_kind() == {f"{_serial(one['client.crt']):x} ".encode()}
            # The TLS code's warnings (cdp.service.tls): caplog also takes what any thread of the process logs
            # meanwhile, such as work an earlier test of the same xdist worker left running.
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == TLS_LOG]
            assert len(warnings) == 1  # for the process, not per channel or per call
            assert "CDP_TLS_CERT_FILE and CDP_TLS_KEY_FILE" in warnings[0]
            assert f"{_serial(one['client.crt']):x}" in warnings[0]  # the one still presented
            secret = one["client.key"].read_text() + two["client.key"].read_text()
            assert not any(line in r.getMessage() for r in caplog.records for line in secret.splitlines()[1:-1])

            # Put right, the next call takes it (trusting CA-1 still, which the peer's certificate is from).
            mine.publish(_trusting_both(_client_files(two), one, two))
            for stub in stubs:
                assert await stub.every_kind() == {f"{_serial(two['client.crt']):x} ".encode()}
            assert len([r for r in caplog.records if r.levelno == logging.WARNING and r.name == TLS_LOG]) == 1


async def test_the_files_are_looked_at_once_a_second_at_most(tmp_path, monkeypatch):
    one, two = _make_ca(tmp_path / "ca1"), _make_ca(tmp_path / "ca2")
    served, mine = SecretVolume(tmp_path / "peer"), SecretVolume(tmp_path / "mine")
    served.publish(_trusting_both(_peer_files(one), one, two))
    mine.publish(_client_files(one))
    clock = [1000.0]
    monkeypatch.setattr(tls_client, "monotonic", lambda: clock[0])
    stats = []
    real_stat = tls_client.ClientCertificates._stat
    monkeypatch.setattr(tls_client.ClientCertificates, "_stat", lambda self: stats.append(1) or real_stat(self))

    async with Peer(served) as peer, client_channel(_caller(mine, peer), peer.address, environ={}) as channel:
        stub = PeerStub(channel)
        stats.clear()
        mine.publish(_trusting_both(_client_files(two), one, two))
        for _ in range(5):
            assert await stub.Unary(b"", timeout=10) == f"{_serial(one['client.crt']):x} ".encode()
        assert stats == []
        clock[0] += tls_client.CHECK_SECONDS
        assert await stub.Unary(b"", timeout=10) == f"{_serial(two['client.crt']):x} ".encode()
        assert await stub.Unary(b"", timeout=10) == f"{_serial(two['client.crt']):x} ".encode()
        assert stats == [1]
