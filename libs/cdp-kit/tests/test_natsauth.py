"""NATS users per service against a real nats-server: each publishes only what it owns, credentials
rotate without a restart, and the connection can be TLS (mutual or not)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
from pathlib import Path

import nats
import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.js.api import AckPolicy, ConsumerConfig

from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    dead_letter_stream,
    events_raw_stream,
    events_resolved_stream,
    privacy_stream,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_kit.bus.consumer import may_read_messages
from cdp_kit.errors import Unauthenticated
from cdp_kit.natsauth import (
    MODEL_BUCKET,
    OPERATOR,
    ROLES,
    NatsClientSettings,
    ServerTls,
    authorization_config,
    new_password,
    write_credentials,
)
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import provision
from cdp_kit.settings import SettingsError


class Users:
    """A nats-server with every service's user (and the operator), and each user's credentials file."""

    def __init__(self, server: NatsServer, folder: Path) -> None:
        self.server = server
        self.folder = folder
        self.passwords = {name: new_password() for name in ROLES}
        self.operator_password = new_password()
        for name, password in self.passwords.items():
            write_credentials(self.file(name), name, password)

    def file(self, name: str) -> Path:
        return self.folder / f"{name}.nats.json"

    def config(self) -> str:
        return authorization_config(self.passwords, operator_password=self.operator_password)

    def security(self, name: str) -> NatsClientSettings:
        return NatsClientSettings(credentials_file=self.file(name))

    def reload(self) -> None:
        self.server.reload(self.config())

    async def operator(self):
        return await nats.connect(self.server.url, user=OPERATOR, password=self.operator_password)

    async def provision(self, environ: dict[str, str] | None = None) -> list[str]:
        nc = await self.operator()
        try:
            return await provision(nc.jetstream(), {"CDP_OWNERSHIP": "nats", **(environ or {})})
        finally:
            await nc.close()


@pytest.fixture
def users(tmp_path):
    server = NatsServer(store_dir=tmp_path / "nats")
    users = Users(server, tmp_path / "secrets")
    server.config = users.config()
    server.start()
    try:
        # The provisioner makes every stream and bucket with the operator's user, as `cdpctl up` does before
        # the services start: no service's user may create or update a stream (test_natsauth_streams.py).
        asyncio.run(users.provision())
        yield users
    finally:
        server.close()


def violations(server: NatsServer) -> list[str]:
    """The server's log lines of refused publishes and subscriptions ("Publish Violation - Subject …")."""
    return [line for line in server.log_path.read_text().splitlines() if " Violation - Subject " in line]


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_a_service_publishes_what_it_owns_and_nothing_else(users):
    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        await identity.ensure_streams(events_resolved_stream())
        ack = await identity.js.publish(subjects.events_resolved(0), b"resolved", timeout=5)
        assert ack.stream == subjects.EVENTS_RESOLVED

    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        # The profile service reads events.resolved (a durable consumer, fetch, ack) ...
        seen: list[bytes] = []

        async def handle(batch):
            seen.extend(d.msg.data for d in batch)

        runner = profile.consumer(
            ConsumerSpec(
                stream=subjects.EVENTS_RESOLVED,
                durable=subjects.partition_durable("profile", 0),
                filter_subjects=(subjects.events_resolved(0),),
            ),
            handle,
        )
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: seen == [b"resolved"])
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # ... publishes its own subject ...
        await profile.ensure_streams(profiles_stream())
        ack = await profile.js.publish(subjects.profiles_changed(0), b"changed", timeout=5)
        assert ack.stream == subjects.PROFILES
        # ... and cannot forge an identity decision: the server drops the publish and says why.
        with pytest.raises(nats.errors.TimeoutError):
            await profile.js.publish(subjects.events_resolved(0), b"forged", timeout=1)

    nc = await users.operator()
    try:
        info = await nc.jetstream().stream_info(subjects.EVENTS_RESOLVED)
        assert info.state.messages == 1  # only identity's
    finally:
        await nc.close()
    refused = violations(users.server)
    assert len(refused) == 1 and "Publish Violation" in refused[0]
    assert subjects.events_resolved(0) in refused[0] and "user:profile" in refused[0]


async def test_a_service_cannot_read_another_services_replies(users):
    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        await profile.nc.subscribe(f"_INBOX.{'identity'}.>")
        await profile.nc.flush()
        await until(lambda: any("Subscription Violation" in line for line in violations(users.server)))


async def test_without_credentials_or_with_a_wrong_password_nothing_connects(users, tmp_path):
    with pytest.raises(Unauthenticated, match="authorization violation"):
        async with Bus.connect(users.server.url, name="profile", security=NatsClientSettings()):
            pass
    wrong = tmp_path / "wrong.json"
    write_credentials(wrong, "profile", "not-the-password")
    with pytest.raises(Unauthenticated, match="CDP_NATS_CREDENTIALS_FILE"):
        async with Bus.connect(
            users.server.url, name="profile", connect_timeout=1, security=NatsClientSettings(credentials_file=wrong)
        ):
            pass


async def test_rotated_credentials_take_effect_without_a_restart(users):
    old = users.passwords["profile"]
    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        await profile.ensure_streams(profiles_stream())
        await _rotated(users, profile)
    stale = users.folder / "stale.json"
    write_credentials(stale, "profile", old)
    with pytest.raises(Unauthenticated):
        async with Bus.connect(users.server.url, name="profile", security=NatsClientSettings(credentials_file=stale)):
            pass


async def test_a_rotation_is_taken_up_when_the_user_was_looked_up_meanwhile(users):
    """The consumers' lag poll asks the connection for its user (`may_read_messages`, the role's read
    rights) at its first poll of each consumer; the client hands it the credentials file's `user`, which
    took the lookup for a CONNECT. A lookup between a rotation's rewrite and the bus's next look at the
    file (here: right after the rewrite, before the look) hid the rewrite: no reconnect came, in 15 s or
    ever (`cdpctl nats-rotate` gave up after 30 s in tests/integration/test_nats_make_up.py)."""
    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        await profile.ensure_streams(profiles_stream())
        # The lag poll's lookup, right after the rewrite, before the bus looks.
        await _rotated(users, profile, after_rewrite=lambda: may_read_messages(profile.nc, subjects.EVENTS_RESOLVED))


async def _rotated(users, profile: Bus, after_rewrite=lambda: None) -> None:
    """Make before break on the profile service's connection: the server knows the new user, the service's
    file is rewritten (`after_rewrite` then runs; the bus reconnects with it by itself within 15 s), then the
    old user goes, and the connection goes on publishing as the new one."""
    reconnected = asyncio.Event()
    profile.nc._reconnected_cb = _set(reconnected)
    users.passwords["profile.2"] = new_password()
    users.reload()
    write_credentials(users.file("profile"), "profile.2", users.passwords["profile.2"])
    after_rewrite()
    await asyncio.wait_for(reconnected.wait(), 15)
    del users.passwords["profile"]
    users.reload()
    await asyncio.sleep(0.5)  # the server has applied it (a connection still on the old user is closed now)
    ack = await profile.js.publish(subjects.profiles_changed(1), b"after rotation", timeout=5)
    assert ack.seq == 1 and profile.connected


def _set(event: asyncio.Event):
    async def callback() -> None:
        event.set()

    return callback


def test_client_settings_name_each_bad_variable(tmp_path):
    bad = tmp_path / "creds.json"
    bad.write_text("user=profile")
    with pytest.raises(SettingsError) as info:
        NatsClientSettings.from_environment(
            {"CDP_NATS_CREDENTIALS_FILE": str(bad), "CDP_NATS_TLS_CERT_FILE": str(tmp_path / "missing.pem")}
        )
    message = str(info.value)
    assert "CDP_NATS_CREDENTIALS_FILE" in message and "CDP_NATS_TLS_CERT_FILE" in message
    assert "CDP_NATS_TLS_KEY_FILE" in message  # the pair is incomplete


# ------------------------------------------------------------------------------------------------ TLS


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert, key) -> tuple[Path, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdp test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, *, server: bool):
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    ca_file = folder / "ca.crt"
    folder.mkdir(parents=True, exist_ok=True)
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _write(folder / "server", *leaf("nats", server=True))
    client_cert, client_key = _write(folder / "client", *leaf("profile", server=False))
    return {"ca": ca_file, "server_cert": server_cert, "server_key": server_key, "cert": client_cert, "key": client_key}


async def test_the_bus_connects_over_tls_and_checks_the_server(tmp_path):
    certs = certificates(tmp_path / "certs")
    server = NatsServer(
        store_dir=tmp_path / "nats", config=ServerTls(certs["server_cert"], certs["server_key"]).config()
    )
    with server:
        async with Bus.connect(server.url, name="profile", security=NatsClientSettings(tls_ca_file=certs["ca"])) as bus:
            await bus.ensure_streams(profiles_stream())
            assert (await bus.js.publish(subjects.profiles_changed(0), b"x", timeout=5)).seq == 1
        # A client that does not trust the server's CA does not connect.
        with pytest.raises(Unauthenticated, match="TLS"):
            async with Bus.connect(
                server.url, name="profile", connect_timeout=1, security=NatsClientSettings(tls_ca_file=certs["cert"])
            ):
                pass


async def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    certs = certificates(tmp_path / "certs")
    tls = ServerTls(certs["server_cert"], certs["server_key"], client_ca=certs["ca"])
    with NatsServer(store_dir=tmp_path / "nats", config=tls.config()) as server:
        mutual = NatsClientSettings(tls_ca_file=certs["ca"], tls_cert_file=certs["cert"], tls_key_file=certs["key"])
        async with Bus.connect(server.url, name="profile", security=mutual) as bus:
            await bus.ensure_streams(profiles_stream())
        with pytest.raises(Unauthenticated, match="TLS"):
            async with Bus.connect(
                server.url, name="profile", connect_timeout=1, security=NatsClientSettings(tls_ca_file=certs["ca"])
            ):
                pass


async def test_a_service_keeps_its_partition_leases_and_cannot_touch_anothers(users):
    from cdp_kit.ownership.nats_kv import NatsKvLeaseStore

    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        store = await NatsKvLeaseStore.open(identity.js, "identity")
        await store.heartbeat("pod-0")
        assert set(await store.members()) == {"pod-0"}
        lease = await store.write(0, "pod-0", None)
        assert lease is not None and (await store.leases())[0].holder == "pod-0"
        # The profile service's leases are not identity's to take.
        theirs = await NatsKvLeaseStore.open(identity.js, "profile")
        with pytest.raises(nats.errors.TimeoutError):
            await theirs.kv.put("profile.partitions.0", b"pod-0")


async def test_scoring_keeps_its_models_in_its_object_store(users):
    # The bucket is the provisioner's to make (CDP_SCORING_MODEL_STORE=nats://<bucket>), scoring's to fill.
    await users.provision({"CDP_SCORING_MODEL_STORE": f"nats://{MODEL_BUCKET}"})
    async with Bus.connect(users.server.url, name="scoring", security=users.security("scoring")) as scoring:
        store = await scoring.js.object_store(MODEL_BUCKET)
        await store.put("churn/3", b"onnx bytes" * 50_000)
        again = await scoring.js.object_store(MODEL_BUCKET)
        assert (await again.get("churn/3")).data == b"onnx bytes" * 50_000
    assert violations(users.server) == []


async def test_a_refusal_names_the_server_but_never_the_password_in_its_url(users):
    url = users.server.url.replace("nats://", "nats://profile:s3cret-in-url@")
    with pytest.raises(Unauthenticated) as info:
        async with Bus.connect(url, name="profile", security=NatsClientSettings()):
            pass
    assert "s3cret-in-url" not in str(info.value) and f"127.0.0.1:{users.server.port}" in str(info.value)


def test_every_stream_and_announcement_of_the_vocabulary_has_a_role():
    """A stream or core subject added to cdp_kit.bus.subjects without a role in cdp_kit.natsauth would be
    refused to every service under make up and the chart: the table must grow with the vocabulary."""
    made = {s for role in ROLES.values() for s in (*role.configures, *role.creates)}
    assert set(subjects.STREAM_SUBJECTS) - made == set(), "streams nobody may create"
    announcements = {
        value
        for name, value in vars(subjects).items()
        if name.isupper() and isinstance(value, str) and "." in value and name.endswith(("_CHANGED", "_DRIFT"))
    }
    published = {s for role in ROLES.values() for s in role.publishes}
    assert announcements - published == set(), "core subjects nobody may publish"
    followed = {s for role in ROLES.values() for s in role.subscribes}
    assert {a for a in announcements if a != subjects.MODELS_DRIFT} - followed == set()


# What the server answers a JetStream API request it refused: nothing (the publish is dropped), so the
# request times out; a request it took answers JSON, with "error" when the API itself said no.
async def api_call(nc, subject: str, body: dict | None = None) -> dict | None:
    try:
        reply = await nc.request(subject, json.dumps(body or {}).encode(), timeout=1)
    except nats.errors.TimeoutError:
        return None
    return json.loads(reply.data)


async def api_calls(nc, attempts: dict[str, tuple[str, dict | None]]) -> dict[str, dict | None]:
    """`api_call` for each of `attempts` (what -> (subject, body)), all at once: a refusal is a timeout, and
    waiting them out one after another would cost a second each."""
    replies = await asyncio.gather(*(api_call(nc, subject, body) for subject, body in attempts.values()))
    return dict(zip(attempts, replies, strict=True))


def test_only_a_streams_owner_may_reconfigure_it():
    """`configures` means STREAM.UPDATE: retention, limits, subjects. A service that merely reads a stream
    (or sources it) creates it when missing and never changes it, or any of them could shrink the
    owner's stream to nothing."""
    owners = {
        subjects.EVENTS_RAW: "collector",
        subjects.EVENTS_RESOLVED: "identity",
        subjects.IDENTITY: "identity",
        subjects.PROFILES: "profile",
        subjects.PRIVACY: "profile",
        subjects.SCORES: "scoring",
        subjects.SEGMENTS: "segmentation",
    }
    for stream, owner in owners.items():
        configuring = sorted(name for name, role in ROLES.items() if stream in role.configures)
        assert configuring == [owner], f"{stream} may be reconfigured by {configuring}, not only {owner}"


async def test_a_reader_cannot_reconfigure_a_stream_it_does_not_own(users):
    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        await profile.ensure_streams(profiles_stream(), privacy_stream())
    for reader, stream in (("crm", subjects.PROFILES), ("crm", subjects.PRIVACY), ("identity", subjects.PRIVACY)):
        async with Bus.connect(users.server.url, name=reader, security=users.security(reader)) as bus:
            config = (await bus.js.stream_info(stream)).config.as_dict()
            shrunk = {**config, "max_msgs": 1}
            assert await api_call(bus.nc, f"$JS.API.STREAM.UPDATE.{stream}", shrunk) is None, (reader, stream)
    # Starting as they do still works: they create what is missing and leave the rest alone.
    async with Bus.connect(users.server.url, name="crm", security=users.security("crm")) as crm:
        await crm.ensure_read_streams(profiles_stream(), segments_stream(), privacy_stream())
    nc = await users.operator()
    try:
        assert (await nc.jetstream().stream_info(subjects.PROFILES)).config.max_msgs == -1
    finally:
        await nc.close()


async def test_the_edge_configures_its_own_stream_and_no_other(users):
    """The collector consumes nothing, so it has no dead letters to keep either: an update of DLQ (its
    limits, or its subjects made to capture another's) is not its to make."""
    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        await profile.ensure_streams(dead_letter_stream(), privacy_stream())
        configs = {s: (await profile.js.stream_info(s)).config.as_dict() for s in (subjects.DLQ, subjects.PRIVACY)}
    async with Bus.connect(users.server.url, name="collector", security=users.security("collector")) as collector:
        await collector.ensure_streams(events_raw_stream())
        updates = {
            stream: (f"$JS.API.STREAM.UPDATE.{stream}", {**config, "max_msgs": 1}) for stream, config in configs.items()
        }
        assert await api_calls(collector.nc, updates) == dict.fromkeys(configs)
    assert ROLES["collector"].configures == (subjects.EVENTS_RAW,)


async def test_the_edge_cannot_touch_another_services_consumer_of_privacy(users):
    """The collector is the service exposed to the internet. It reads privacy.deleted (suppressions), but
    holding consumer rights on PRIVACY would let it rewrite, drain or delete identity's consumer of
    deletions, by name: the server cannot tell a consumer's owner from its name."""
    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        await identity.ensure_streams(privacy_stream())
        config = ConsumerConfig(durable_name="identity-privacy-0", ack_policy=AckPolicy.EXPLICIT, description="ours")
        await identity.js.add_consumer(subjects.PRIVACY, config)
    async with Bus.connect(users.server.url, name="collector", security=users.security("collector")) as collector:
        nc = collector.nc
        tampered = {"stream_name": subjects.PRIVACY, "config": {**config.as_dict(), "description": "tampered"}}
        unnamed = {"stream_name": subjects.PRIVACY, "config": {**tampered["config"], "name": "identity-privacy-0"}}
        del unnamed["config"]["durable_name"]
        attempts = {
            "create, the name in the body": ("$JS.API.CONSUMER.CREATE.PRIVACY", unnamed),
            "create by name": ("$JS.API.CONSUMER.CREATE.PRIVACY.identity-privacy-0", tampered),
            "durable create": ("$JS.API.CONSUMER.DURABLE.CREATE.PRIVACY.identity-privacy-0", tampered),
            "fetch": ("$JS.API.CONSUMER.MSG.NEXT.PRIVACY.identity-privacy-0", {"batch": 1, "expires": 200_000_000}),
            "delete": ("$JS.API.CONSUMER.DELETE.PRIVACY.identity-privacy-0", None),
        }
        assert await api_calls(nc, attempts) == dict.fromkeys(attempts)
    nc = await users.operator()
    try:
        info = await nc.jetstream().consumer_info(subjects.PRIVACY, "identity-privacy-0")
        assert info.config.description == "ours"
    finally:
        await nc.close()


# Services sharing a stream, each with a consumer of its own there: (stream, the consumer's service, its
# name, the other service reading the same stream, that one's own consumer).
SHARED_STREAMS = (
    (subjects.PRIVACY, "identity", "identity-privacy-0", "orchestration", "orchestration-privacy"),
    (subjects.PRIVACY, "orchestration", "orchestration-privacy", "crm", "crm-privacy"),
    (subjects.EVENTS_RESOLVED, "profile", "profile-p0", "scoring", "scoring-quality-labels"),
    (subjects.PROFILES, "scoring", "scoring-p0", "segmentation", "segmentation-p0"),
)


async def test_a_service_cannot_touch_another_services_consumer_of_a_shared_stream(users):
    """PRIVACY, EVENTS_RESOLVED and PROFILES each feed several services: each may create, fetch from,
    acknowledge on and delete its own consumers, by name, and none of another's - not even by a nameless
    create carrying the name in its body, which the server would take as an update of that consumer."""
    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        await identity.ensure_streams(events_resolved_stream())
        await identity.js.publish(subjects.events_resolved(0), b"resolved", timeout=5)
    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        await profile.ensure_streams(profiles_stream(), privacy_stream())
        await profile.js.publish(subjects.profiles_changed(0), b"changed", timeout=5)
        await profile.js.publish(subjects.PRIVACY_DELETED, b"deleted", timeout=5)
    for stream, owner, name, other, own in SHARED_STREAMS:
        config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, description="ours")
        async with Bus.connect(users.server.url, name=owner, security=users.security(owner)) as bus:
            await bus.js.add_consumer(stream, config)
            # One message delivered and not yet acknowledged: its reply subject is the acknowledgement.
            (delivered,) = await (await bus.js.pull_subscribe_bind(durable=name, stream=stream)).fetch(1, timeout=5)
            async with Bus.connect(users.server.url, name=other, security=users.security(other)) as theirs:
                nc = theirs.nc
                tampered = {"stream_name": stream, "config": {**config.as_dict(), "description": "tampered"}}
                unnamed = {"stream_name": stream, "config": {**tampered["config"], "name": name}}
                del unnamed["config"]["durable_name"]
                attempts = {
                    "create, the name in the body": (f"$JS.API.CONSUMER.CREATE.{stream}", unnamed),
                    "create by name": (f"$JS.API.CONSUMER.CREATE.{stream}.{name}", tampered),
                    "durable create": (f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}", tampered),
                    "fetch": (f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", {"batch": 1, "expires": 200_000_000}),
                    "info": (f"$JS.API.CONSUMER.INFO.{stream}.{name}", None),
                    "delete": (f"$JS.API.CONSUMER.DELETE.{stream}.{name}", None),
                }
                assert await api_calls(nc, attempts) == dict.fromkeys(attempts), (other, name)
                before = len(violations(users.server))
                await nc.publish(delivered.reply, b"+ACK")  # acknowledge what the owner was given
                await nc.flush()
                await until(lambda before=before: len(violations(users.server)) > before)
                # Its own consumer of the same stream it keeps as before: created, read, deleted.
                await theirs.js.add_consumer(stream, ConsumerConfig(durable_name=own, ack_policy=AckPolicy.EXPLICIT))
                assert (await theirs.js.consumer_info(stream, own)).name == own
                assert await theirs.js.delete_consumer(stream, own)
        nc = await users.operator()
        try:
            info = await nc.jetstream().consumer_info(stream, name)
            assert info.config.description == "ours", name
            assert info.num_ack_pending == 1, f"{other} acknowledged {name}'s message"
        finally:
            await nc.close()


async def test_no_service_may_reconfigure_the_dead_letters_and_every_consumer_writes_its_own(users):
    """Every service that consumes writes what it gives up on into DLQ (`dlq.<stream>.<its consumer>`);
    no service may update the stream (shrink it, or widen its subjects over another's): not even identity,
    whose settings shape it, since the provisioner configures every stream."""
    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        await identity.ensure_streams(dead_letter_stream())  # verified: as the provisioner made it
        config = (await identity.js.stream_info(subjects.DLQ)).config.as_dict()
        assert await api_call(identity.nc, f"$JS.API.STREAM.UPDATE.{subjects.DLQ}", config) is None
    for service in ("profile", "scoring", "segmentation", "orchestration", "crm"):
        async with Bus.connect(users.server.url, name=service, security=users.security(service)) as bus:
            await bus.ensure_read_streams(dead_letter_stream())  # as it starts: created if missing, no more
            first = ROLES[service].consumers[0]  # a per-partition or per-replica name: its first one
            stream, name = first.stream, first.name.replace("{partition}", "0").replace("{ordinal}", "0")
            ack = await bus.js.publish(subjects.dead_letter(stream, name), b"gave up", timeout=5)
            assert ack.stream == subjects.DLQ
            refusals = {
                "shrink": (f"$JS.API.STREAM.UPDATE.{subjects.DLQ}", {**config, "max_msgs": 1}),
                "purge": (f"$JS.API.STREAM.PURGE.{subjects.DLQ}", None),
            }
            # Not another service's consumer's dead letters either (waited for beside the refusals above).
            forged = bus.js.publish(subjects.dead_letter(subjects.EVENTS_RAW, "identity-p0"), b"forged", timeout=1)
            answered, forging = await asyncio.gather(api_calls(bus.nc, refusals), forged, return_exceptions=True)
            assert answered == dict.fromkeys(refusals), service
            assert isinstance(forging, nats.errors.TimeoutError), (service, forging)


def test_a_consumer_granted_by_any_name_is_on_a_stream_nobody_else_consumes():
    """`ANY` is the one grant not by name: safe only where no other role has a consumer to tamper with."""
    from cdp_kit.natsauth import ANY

    for name, role in ROLES.items():
        for consumer in role.consumers:
            if consumer.name == ANY:
                others = sorted(n for n, r in ROLES.items() if n != name and consumer.stream in r.consumes)
                assert others == [], f"{name} may touch any consumer of {consumer.stream}, which {others} consume"
