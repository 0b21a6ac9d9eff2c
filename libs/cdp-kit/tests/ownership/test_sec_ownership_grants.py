"""The partition ownership bucket is shared, its keys are not: under its own NATS user a service keeps its
leases (on the bucket the provisioner makes, and on one made before by a version without direct gets), and cannot
list, read, follow or write another service's keys, nor reach another's scan by name. Real nats-server,
each service's real permissions."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import nats
import nats.errors
import pytest

from cdp_kit.bus import Bus
from cdp_kit.natsauth import OWNERSHIP_BUCKET
from cdp_kit.ownership.nats_kv import NatsKvLeaseStore, nats_kv_ownership

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_natsauth import Users, api_call, api_calls, violations

KV_STREAM = f"KV_{OWNERSHIP_BUCKET}"
PROFILE_KEYS = f"$KV.{OWNERSHIP_BUCKET}.profile"


@pytest.fixture
def users(tmp_path):
    from cdp_kit.natsserver import NatsServer

    server = NatsServer(store_dir=tmp_path / "nats")
    users = Users(server, tmp_path / "secrets")
    server.config = users.config()
    server.start()
    try:
        # The bucket, as the provisioner makes it (cdp_kit.provision): no service's user may create it.
        asyncio.run(users.provision())
        yield users
    finally:
        server.close()


async def profile_holds_partition_0(users) -> None:
    async with Bus.connect(users.server.url, name="profile", security=users.security("profile")) as profile:
        store = await NatsKvLeaseStore.open(profile.js, "profile")
        await store.heartbeat("profile-0")
        assert await store.write(0, "profile-0", None) is not None


async def test_another_services_leases_cannot_be_listed_read_or_followed(users):
    await profile_holds_partition_0(users)
    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        nc = identity.nc
        inbox = nc.new_inbox()  # identity's own inbox: where a consumer of its would deliver
        watch = {"deliver_subject": inbox, "deliver_policy": "last_per_subject", "ack_policy": "none"}
        # A watch (nats.py's kv.watch / keys): the nameless create, its filter in the body.
        nameless = {"stream_name": KV_STREAM, "config": {**watch, "filter_subject": f"{PROFILE_KEYS}.>"}}
        # A named scan of profile's keys: the filter in the subject is profile's.
        named = {"stream_name": KV_STREAM, "config": {**watch, "name": "s1", "filter_subject": f"{PROFILE_KEYS}.>"}}
        # A get with the key in the body (any key), and a direct get of profile's key.
        get = {"last_by_subj": f"{PROFILE_KEYS}.partitions.0"}
        refused = {
            "watch": (f"$JS.API.CONSUMER.CREATE.{KV_STREAM}", nameless),
            "named scan": (f"$JS.API.CONSUMER.CREATE.{KV_STREAM}.s1.{PROFILE_KEYS}.>", named),
            "get, the key in the body": (f"$JS.API.STREAM.MSG.GET.{KV_STREAM}", get),
            "direct get, the key in the body": (f"$JS.API.DIRECT.GET.{KV_STREAM}", get),
            "direct get": (f"$JS.API.DIRECT.GET.{KV_STREAM}.{PROFILE_KEYS}.partitions.0", None),
            # Nor another's consumer by name (a scan cut short), nor flow control on the bucket.
            "delete a scan": (f"$JS.API.CONSUMER.DELETE.{KV_STREAM}.profile-scan-0", None),
            "a scan's info": (f"$JS.API.CONSUMER.INFO.{KV_STREAM}.profile-scan-0", None),
        }
        assert await api_calls(nc, refused) == dict.fromkeys(refused)
        # Identity's own filter in the subject, profile's in the body: the server refuses the mismatch.
        own = f"$KV.{OWNERSHIP_BUCKET}.identity.>"
        answer = await api_call(
            nc, f"$JS.API.CONSUMER.CREATE.{KV_STREAM}.s2.{own}", named | {"config": {**named["config"], "name": "s2"}}
        )
        assert answer is not None and "error" in answer
        several = {**watch, "name": "s3", "filter_subjects": [own, f"{PROFILE_KEYS}.>"]}
        answer = await api_call(
            nc, f"$JS.API.CONSUMER.CREATE.{KV_STREAM}.s3.{own}", {"stream_name": KV_STREAM, "config": several}
        )
        assert answer is not None and "error" in answer
        # The kit's own reader refuses a key outside the group before asking.
        store = await NatsKvLeaseStore.open(identity.js, "identity")
        with pytest.raises(ValueError, match="not in group"):
            await store.kv.scan("profile.partitions.>")
        with pytest.raises(nats.errors.TimeoutError):
            await store.kv.put("profile.partitions.0", b"identity-0")
    operator = await users.operator()
    try:
        kv = await operator.jetstream().key_value(OWNERSHIP_BUCKET)
        assert (await kv.get("profile.partitions.0")).value == b"profile-0"  # untouched
        # No consumer was left behind by the refused attempts.
        names = [c.name for c in await operator.jetstream().consumers_info(KV_STREAM)]
        assert not any(name.startswith(("s1", "s2", "s3")) for name in names)
    finally:
        await operator.close()
    assert any("CONSUMER.CREATE" in line for line in violations(users.server))


@pytest.mark.parametrize("made_before", [False, True], ids=["bucket-provisioned", "bucket-without-direct-gets"])
async def test_a_service_keeps_its_leases_under_its_own_user(users, made_before):
    if made_before:
        # The bucket as earlier versions created it (no direct gets): a running platform's, upgraded.
        operator = await users.operator()
        await operator.jetstream().delete_key_value(OWNERSHIP_BUCKET)
        await operator.jetstream().create_key_value(bucket=OWNERSHIP_BUCKET, history=1)
        await operator.close()
    await profile_holds_partition_0(users)
    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        store = await NatsKvLeaseStore.open(identity.js, "identity")
        # Neither allows direct gets (the provisioner makes the bucket without them: a direct get's answer
        # goes to any reply subject, and streams store it; tests/security/test_sec_stored_answers.py).
        assert not store.kv._direct
        assert await store.members() == {} and await store.leases() == {}  # profile's are not listed
        await store.heartbeat("pod-0")
        await store.heartbeat("pod-1")
        await store.leave("pod-1")
        assert set(await store.members()) == {"pod-0"}
        first = await store.write(0, "pod-0", None)
        assert first is not None
        assert await store.write(0, "pod-1", None) is None  # taken: a create-if-absent loses
        freed = await store.write(0, "", first)
        assert freed is not None and (await store.leases())[0].holder == ""
        assert await store.write(0, "pod-1", first) is None  # a stale revision loses
        # One key read by itself (segmentation's percentiles), and a key deleted then created again.
        await store.kv.put("identity.percentiles.values", b"v1")
        assert (await store.kv.get("identity.percentiles.values")).value == b"v1"
        await store.kv.delete("identity.percentiles.values")
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await store.kv.get("identity.percentiles.values")
        assert await store.kv.create("identity.percentiles.values", b"v2") > 0

        # The protocol itself, two members under the same user: each ends with half the partitions.
        one = await nats_kv_ownership(identity.js, group="identity", partitions=4, identity="a", ttl=3.0)
        two = await nats_kv_ownership(identity.js, group="identity", partitions=4, identity="b", ttl=3.0)
        await one.start()
        await two.start()
        try:
            for _ in range(100):
                if len(one.owned()) == 2 and len(two.owned()) == 2:
                    break
                await asyncio.sleep(0.1)
            assert sorted(one.owned() | two.owned()) == [0, 1, 2, 3] and len(one.owned()) == 2
        finally:
            await one.stop()
            await two.stop()
    assert violations(users.server) == []


async def test_scans_leave_no_consumers_behind(users, monkeypatch):
    from cdp_kit.ownership import group_kv

    monkeypatch.setattr(group_kv, "SCAN_CONSUMER_LIFETIME", 1.0)
    async with Bus.connect(users.server.url, name="identity", security=users.security("identity")) as identity:
        store = await NatsKvLeaseStore.open(identity.js, "identity")
        await store.heartbeat("pod-0")
        for _ in range(5):
            assert set(await store.members()) == {"pod-0"}
    operator = await users.operator()
    try:
        js = operator.jetstream()
        for _ in range(100):
            if not await js.consumers_info(KV_STREAM):
                break
            await asyncio.sleep(0.1)
        assert await js.consumers_info(KV_STREAM) == []
    finally:
        await operator.close()


def test_the_bucket_grants_name_the_services_own_keys():
    from cdp_kit.natsauth import ROLES, permissions

    for name, role in ROLES.items():
        granted = [s for s in permissions(role)["publish"]["allow"] if KV_STREAM in s or "$KV." in s]
        own = f"$KV.{OWNERSHIP_BUCKET}.{name}.>"
        for subject in granted:
            assert subject.endswith(own) or subject.endswith(f".{KV_STREAM}"), (name, subject)
        assert json.dumps(granted).count("STREAM.UPDATE") == 0, name
