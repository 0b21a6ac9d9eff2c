"""No service's NATS user may create or reconfigure a stream, against a real nats-server.

nats-server applies a stream's sources, mirror, republish and subject transform inside the account
without checking the requesting user's subject permissions: a user allowed STREAM.UPDATE of its own
stream could source PROFILES into it and republish everything to its own inbox. So the provisioner
(cdp_kit.provision, an operator identity) makes every stream, and each service verifies at start.
"""

from __future__ import annotations

import asyncio
import json

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RePublish, StreamSource

from cdp_kit.bus import (
    Bus,
    StreamMismatch,
    dead_letter_stream,
    events_raw_stream,
    privacy_stream,
    profiles_stream,
    subjects,
)
from cdp_kit.natsauth import (
    OPERATOR,
    OWNERSHIP_BUCKET,
    ROLES,
    NatsClientSettings,
    authorization_config,
    new_password,
    write_credentials,
)
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import provision
from cdp_kit.streamtable import STREAMS


@pytest.fixture
def server(tmp_path):
    passwords = {name: new_password() for name in ROLES}
    operator = new_password()
    for name, password in passwords.items():
        write_credentials(tmp_path / f"{name}.json", name, password)
    nats_server = NatsServer(
        store_dir=tmp_path / "nats", config=authorization_config(passwords, operator_password=operator)
    )
    nats_server.operator_password = operator  # type: ignore[attr-defined]
    nats_server.secrets = tmp_path  # type: ignore[attr-defined]
    nats_server.start()
    try:
        yield nats_server
    finally:
        nats_server.close()


async def operator(server):
    return await nats.connect(server.url, user=OPERATOR, password=server.operator_password)


def service(server, name: str):
    return Bus.connect(
        server.url, name=name, security=NatsClientSettings(credentials_file=server.secrets / f"{name}.json")
    )


async def api_call(nc, subject: str, body: dict | None = None) -> dict | None:
    """The API's answer, or None when the server dropped the request (a permissions violation)."""
    try:
        reply = await nc.request(subject, json.dumps(body or {}).encode(), timeout=1)
    except nats.errors.TimeoutError:
        return None
    return json.loads(reply.data)


async def provisioned(server, environ: dict[str, str] | None = None) -> list[str]:
    nc = await operator(server)
    try:
        return await provision(nc.jetstream(), {"CDP_PROVISION_OWNERSHIP_BUCKET": "true", **(environ or {})})
    finally:
        await nc.close()


async def test_no_role_may_create_update_delete_or_purge_any_stream(server):
    """For every role, on every stream (the ownership bucket and a new one too): a create or an update that
    sources PROFILES and republishes everything to the role's own inbox is dropped by the server, and so
    are delete and purge. Nothing changes: provisioning again finds every stream as specified."""
    await provisioned(server)
    nc = await operator(server)
    try:
        js = nc.jetstream()
        configs = {entry.name: (await js.stream_info(entry.name)).config.as_dict() for entry in STREAMS}
        kv = f"KV_{OWNERSHIP_BUCKET}"
        configs[kv] = (await js.stream_info(kv)).config.as_dict()
    finally:
        await nc.close()
    for role in ROLES:
        async with service(server, role) as bus:
            spy = {"sources": [{"name": subjects.PROFILES}], "republish": {"src": ">", "dest": f"_INBOX.{role}.spy.>"}}
            calls = []
            for stream, config in configs.items():
                calls.append((f"update {stream}", f"$JS.API.STREAM.UPDATE.{stream}", {**config, **spy}))
                calls.append((f"create {stream}", f"$JS.API.STREAM.CREATE.{stream}", {**config, **spy}))
                calls.append((f"purge {stream}", f"$JS.API.STREAM.PURGE.{stream}", None))
                calls.append((f"delete {stream}", f"$JS.API.STREAM.DELETE.{stream}", None))
            fresh = {"name": "SPY", "subjects": ["spy.>"], **spy}
            calls.append(("create a new stream", "$JS.API.STREAM.CREATE.SPY", fresh))
            answers = await asyncio.gather(*(api_call(bus.nc, subject, body) for _, subject, body in calls))
            allowed = [what for (what, _, _), answer in zip(calls, answers, strict=True) if answer is not None]
            assert allowed == [], f"{role} may {allowed}"
    assert await provisioned(server) == []  # every stream still as specified


async def test_a_service_starts_on_provisioned_streams_and_not_before(server):
    async with service(server, "collector") as collector:
        assert collector.provisioned
        with pytest.raises(StreamMismatch, match=r"stream EVENTS_RAW does not exist.*cdpctl up"):
            await collector.ensure_streams(events_raw_stream())
    made = await provisioned(server)
    assert f"created stream {subjects.EVENTS_RAW}" in made and f"created stream KV_{OWNERSHIP_BUCKET}" in made
    async with service(server, "collector") as collector:
        await collector.ensure_streams(events_raw_stream())
        await collector.ensure_read_streams(privacy_stream())


async def test_a_service_refuses_to_start_on_a_stream_given_a_republish_naming_it(server):
    """The operator (simulating the attack) gives EVENTS_RAW a republish and PROFILES a source: the owner
    and every reader refuse to start, naming the stream, the setting and the fix; the provisioner puts
    both back, and they start."""
    await provisioned(server)
    nc = await operator(server)
    try:
        js = nc.jetstream()
        raw = (await js.stream_info(subjects.EVENTS_RAW)).config
        raw.republish = RePublish(src=">", dest="_INBOX.collector.spy.>")
        await js.update_stream(raw)
        profiles = (await js.stream_info(subjects.PROFILES)).config
        profiles.sources = [StreamSource(name=subjects.PRIVACY)]
        await js.update_stream(profiles)
    finally:
        await nc.close()
    async with service(server, "collector") as collector:
        with pytest.raises(StreamMismatch) as refused:
            await collector.ensure_streams(events_raw_stream())
        message = str(refused.value)
        assert "stream EVENTS_RAW" in message and "republish" in message and "_INBOX.collector.spy.>" in message
        assert "cdpctl up" in message and "provisioning Job" in message
    async with service(server, "identity") as identity:
        with pytest.raises(StreamMismatch, match=r"stream EVENTS_RAW .*republish"):
            await identity.ensure_read_streams(events_raw_stream())
    async with service(server, "segmentation") as segmentation:
        with pytest.raises(StreamMismatch, match=r"stream PROFILES .*sources"):
            await segmentation.ensure_read_streams(profiles_stream())
    fixed = await provisioned(server)
    assert any(line.startswith("updated stream EVENTS_RAW") and "republish" in line for line in fixed)
    assert any(line.startswith("updated stream PROFILES") and "sources" in line for line in fixed)
    async with service(server, "collector") as collector:
        await collector.ensure_streams(events_raw_stream())
    async with service(server, "segmentation") as segmentation:
        await segmentation.ensure_read_streams(profiles_stream(), dead_letter_stream())


async def test_orchestration_verifies_its_sourced_input_stream(server):
    """ORCHESTRATION sources other streams by its spec: as provisioned it passes; with one more source
    (PRIVACY, say) it is refused."""
    from cdp_kit.streamtable import orchestration_input_stream, orchestration_timers_stream

    await provisioned(server)
    async with service(server, "orchestration") as bus:
        await bus.ensure_created(orchestration_timers_stream(), orchestration_input_stream())
    nc = await operator(server)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(subjects.ORCHESTRATION)).config
        config.sources = [*config.sources, StreamSource(name=subjects.PRIVACY)]
        await js.update_stream(config)
    finally:
        await nc.close()
    async with service(server, "orchestration") as bus:
        with pytest.raises(StreamMismatch, match=r"stream ORCHESTRATION .*sources"):
            await bus.ensure_created(orchestration_input_stream())


async def test_a_push_consumers_deliveries_into_another_streams_subject_are_not_stored(server):
    """Consumer creation stays with the services (their own consumers, by name). A push consumer whose
    deliver subject is another stream's subject (privacy.deleted, events.resolved.0) delivers there as a
    core message the stream does not store: no forged deletion, no forged event."""
    await provisioned(server)
    async with service(server, "identity") as identity:
        await identity.js.publish(subjects.events_resolved(0), b"resolved", timeout=5)
    async with service(server, "profile") as profile:
        # Profile's own durable on EVENTS_RESOLVED, made a push consumer into PRIVACY's subject.
        config = ConsumerConfig(
            durable_name="profile-p0", ack_policy=AckPolicy.NONE, deliver_subject=subjects.PRIVACY_DELETED
        )
        await profile.js.add_consumer(subjects.EVENTS_RESOLVED, config)
        # Its ownership scan consumer (its own keys), delivering into events.resolved.0.
        await profile.js.publish(f"$KV.{OWNERSHIP_BUCKET}.profile.members.x", b"member", timeout=5)
        scan = {
            "stream_name": f"KV_{OWNERSHIP_BUCKET}",
            "config": {
                "name": "profile-scan-spy",
                "deliver_subject": subjects.events_resolved(0),
                "filter_subject": f"$KV.{OWNERSHIP_BUCKET}.profile.>",
                "ack_policy": "none",
                "deliver_policy": "all",
            },
        }
        answer = await api_call(
            profile.nc,
            f"$JS.API.CONSUMER.CREATE.KV_{OWNERSHIP_BUCKET}.profile-scan-spy.$KV.{OWNERSHIP_BUCKET}.profile.>",
            scan,
        )
        assert answer is not None and "error" not in answer
        await asyncio.sleep(1.0)
    nc = await operator(server)
    try:
        js = nc.jetstream()
        assert (await js.stream_info(subjects.PRIVACY)).state.messages == 0
        assert (await js.stream_info(subjects.EVENTS_RESOLVED)).state.messages == 1  # identity's only
    finally:
        await nc.close()


async def test_a_service_waits_for_the_provisioner_when_told_to(server):
    """Under the chart the provisioning Job runs beside the services: with CDP_NATS_PROVISION_WAIT a
    service waits for its streams instead of stopping at once."""
    security = NatsClientSettings(credentials_file=server.secrets / "collector.json", provision_wait=30)
    async with Bus.connect(server.url, name="collector", security=security) as collector:
        starting = asyncio.create_task(collector.ensure_streams(events_raw_stream()))
        await asyncio.sleep(1.0)
        assert not starting.done()
        await provisioned(server)
        await asyncio.wait_for(starting, 10)


async def test_the_provisioners_own_user_provisions_and_does_nothing_else(tmp_path):
    """The chart's provisioning Job connects as `provision`: it may create and update every stream, the
    ownership bucket's and the model store's, and may neither publish nor read a message."""
    from cdp_kit.natsauth import MODEL_BUCKET, PROVISIONER
    from cdp_kit.provision import run

    password = new_password()
    write_credentials(tmp_path / "provision.json", PROVISIONER, password)
    operator_password = new_password()
    config = authorization_config({PROVISIONER: password}, operator_password=operator_password)
    nats_server = NatsServer(store_dir=tmp_path / "nats", config=config)
    nats_server.start()
    try:
        security = NatsClientSettings(credentials_file=tmp_path / "provision.json")
        environ = {
            "CDP_SCORING_MODEL_STORE": f"nats://{MODEL_BUCKET}",
            "CDP_CRM_RETENTION_DAYS": "3",
            "CDP_PROVISION_OWNERSHIP_BUCKET": "true",
        }
        made = await run(nats_server.url, environ=environ, security=security)
        assert len(made) == len(STREAMS) + 2  # every stream, the ownership bucket's, the model store's
        assert await run(nats_server.url, environ=environ, security=security) == []
        changed = await run(nats_server.url, environ={**environ, "CDP_CRM_RETENTION_DAYS": "5"}, security=security)
        assert changed == [f"updated stream {subjects.CRM} (max_age {3 * 86_400.0!r} -> {5 * 86_400.0!r})"]
        async with Bus.connect(nats_server.url, name=PROVISIONER, security=security) as bus:
            # Each refusal is a timeout: waited for together.
            forged = bus.js.publish(subjects.PRIVACY_DELETED, b"forged", timeout=1)
            refused = (
                api_call(bus.nc, f"$JS.API.STREAM.DELETE.{subjects.PRIVACY}"),
                api_call(bus.nc, f"$JS.API.STREAM.PURGE.{subjects.PRIVACY}"),
                api_call(bus.nc, f"$JS.API.STREAM.MSG.GET.{subjects.PROFILES}", {"seq": 1}),
            )
            forging, *answers = await asyncio.gather(forged, *refused, return_exceptions=True)
            assert isinstance(forging, nats.errors.TimeoutError), forging
            assert answers == [None, None, None]
    finally:
        nats_server.close()


async def test_the_ownership_bucket_is_made_only_when_a_service_uses_it(server):
    made = await provisioned(server, {"CDP_PROVISION_OWNERSHIP_BUCKET": "false"})
    assert f"created stream KV_{OWNERSHIP_BUCKET}" not in made
    assert f"created stream KV_{OWNERSHIP_BUCKET}" in await provisioned(server, {"CDP_OWNERSHIP": "nats"})


async def test_a_push_consumer_delivering_into_the_jetstream_api_reconfigures_nothing(server):
    """Orchestration publishes to ACTIONS and keeps consumers of it: a message holding a stream update,
    delivered by its own consumer made a push consumer into `$JS.API.STREAM.UPDATE.EVENTS_RAW`, is not
    taken as an API request: EVENTS_RAW keeps no republish."""
    await provisioned(server)
    nc = await operator(server)
    try:
        raw = (await nc.jetstream().stream_info(subjects.EVENTS_RAW)).config.as_dict()
    finally:
        await nc.close()
    evil = {**raw, "republish": {"src": ">", "dest": "_INBOX.orchestration.spy.>"}}
    async with service(server, "orchestration") as bus:
        await bus.js.publish(subjects.actions("email", 0), json.dumps(evil).encode(), timeout=5)
        config = ConsumerConfig(
            durable_name="orchestration-dispatch-email",
            ack_policy=AckPolicy.NONE,
            deliver_subject=f"$JS.API.STREAM.UPDATE.{subjects.EVENTS_RAW}",
            filter_subject=subjects.actions_of("email"),
        )
        await bus.js.add_consumer(subjects.ACTIONS, config)
        await asyncio.sleep(1.5)
    nc = await operator(server)
    try:
        assert (await nc.jetstream().stream_info(subjects.EVENTS_RAW)).config.republish is None
    finally:
        await nc.close()


async def test_a_bucket_the_provisioner_did_not_make_stops_a_service_naming_the_provisioner(server):
    from cdp_kit.errors import Unavailable
    from cdp_kit.ownership.group_kv import GroupKv
    from cdp_scoring.modelstore import ObjectModelStore

    async with service(server, "profile") as bus:
        with pytest.raises(Unavailable) as refused:
            await GroupKv.open(bus.js, OWNERSHIP_BUCKET, "profile")
    assert f"the {OWNERSHIP_BUCKET} bucket does not exist" in str(refused.value)
    assert "python -m cdp_kit.provision" in str(refused.value)
    async with service(server, "scoring") as bus:
        with pytest.raises(Unavailable) as refused:
            await ObjectModelStore(bus.js, "cdp-models").put("churn", "1", b"onnx")
    assert "the OBJ_cdp-models bucket does not exist" in str(refused.value)
