"""Partition ownership through leases in a NATS KV bucket, each member on its own connection to a real
nats-server (a crash closes it)."""

from __future__ import annotations

import asyncio
import itertools
from contextlib import AsyncExitStack

import nats
import pytest
from ownership_scenarios import (
    PARTITIONS,
    TTL,
    Ledger,
    Member,
    churn,
    killed_member_loses_partitions_after_ttl,
    member_cut_off_from_the_store_stops_before_others_take_over,
    scale_one_three_two,
    slow_releaser_delays_the_new_owner,
)

from cdp_kit.ownership import OwnershipSettings, StaticOwnership, ownership_from_settings
from cdp_kit.ownership.nats_kv import nats_kv_ownership
from cdp_kit.settings import SettingsError, load_settings
from cdp_testing.waiting import eventually


@pytest.fixture
async def make(nats_server):
    async with AsyncExitStack() as stack:

        async def make_member(name: str, ledger: Ledger, release_delay: float) -> Member:
            nc = await nats.connect(nats_server.url, max_reconnect_attempts=0)
            stack.push_async_callback(nc.close)
            ownership = await nats_kv_ownership(
                nc.jetstream(), group="identity", partitions=PARTITIONS, identity=name, ttl=make_member.ttl
            )
            member = Member(name, ownership, ledger, release_delay, cut=nc.close)
            return await member.start()

        make_member.ttl = TTL  # short, so the expiry scenarios are quick
        yield make_member


async def test_scaling_one_three_two_moves_each_partition_once_and_never_to_two_holders(make, nats_client):
    # The bucket as the store creates it, watched from the start: every write to every lease, in order.
    kv = await nats_client.jetstream().create_key_value(bucket="CDP_OWNERSHIP", history=1)
    watcher = await kv.watch("identity.partitions.>")
    writes: list[tuple[int, str]] = []
    seen: dict[int, int] = {}  # partition -> the latest revision the watcher delivered

    async def record():
        async for entry in watcher:
            if entry is not None:
                partition = int(entry.key.rsplit(".", 1)[1])
                writes.append((partition, (entry.value or b"").decode()))
                seen[partition] = entry.revision

    recorder = asyncio.create_task(record())
    # Moves here go by release, not expiry: a TTL long enough that one slow round on a busy machine
    # seldom fences a member (which, correctly, drops its leases and takes them back: the scenario counts
    # those retakes apart from moves, `Ledger.retakes`).
    make.ttl = 4 * TTL
    ledger = await scale_one_three_two(make)
    # Every lease's last write delivered to the watcher (a busy machine delivers it late), then stop it.
    latest = {p: (await kv.get(f"identity.partitions.{p}")).revision for p in range(PARTITIONS)}
    await eventually(lambda: all(seen.get(p, 0) >= revision for p, revision in latest.items()), timeout=30)
    recorder.cancel()
    await watcher.stop()

    # In the bucket too, a lease goes from one holder to another only through "free": the old owner
    # wrote it free after its release, the new owner took it after that. Only a lease its holder let go by
    # fencing itself is not freed: the new owner took it once it had expired.
    for p in range(PARTITIONS):
        holders = [holder for partition, holder in writes if partition == p]
        assert holders and holders[-1] == "", f"partition {p}: {holders}"
        handovers = list(itertools.pairwise(holders))
        taken = [(old, new) for old, new in handovers if old and new and old != new]
        assert all((old, p) in ledger.fences for old, _ in taken), f"partition {p}: {holders}, {ledger.fences}"


async def test_a_crashed_member_loses_its_partitions_after_the_ttl(make):
    await killed_member_loses_partitions_after_ttl(make)


async def test_a_slow_releaser_delays_the_new_owner_instead_of_overlapping(make):
    # The hand-over goes by release, not expiry: a TTL long enough that one slow renewal round on a busy
    # machine (tests run in parallel) does not fence the releaser mid-drain. The drain stays twice the TTL.
    make.ttl = 3 * TTL
    await slow_releaser_delays_the_new_owner(make)


async def test_members_coming_and_going_mid_hand_off_never_overlap(make):
    await churn(make)


async def test_a_member_cut_off_from_the_store_stops_working_before_its_partitions_move(make):
    await member_cut_off_from_the_store_stops_before_others_take_over(make)


async def test_groups_share_a_bucket_without_sharing_partitions(nats_client):
    js = nats_client.jetstream()
    identity = await nats_kv_ownership(js, group="identity", partitions=4, identity="pod-0", ttl=TTL)
    profile = await nats_kv_ownership(js, group="profile", partitions=4, identity="pod-0", ttl=TTL)
    changes = identity.changes()
    seen = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)
    await identity.start()
    await profile.start()
    assert identity.owned() == profile.owned() == frozenset(range(4))
    assert await seen == {0}  # each acquisition is announced as it happens
    await changes.aclose()
    await identity.stop()
    await profile.stop()
    assert identity.owned() == profile.owned() == frozenset()


async def test_settings_pick_the_kind_and_reject_bad_values(nats_client):
    static = load_settings(OwnershipSettings, {"CDP_REPLICAS": "3", "CDP_POD_ORDINAL": "1"})
    chosen = await ownership_from_settings(static, group="identity", partitions=8)
    assert isinstance(chosen, StaticOwnership)
    await chosen.start()
    assert chosen.owned() == {1, 4, 7}

    leased = load_settings(OwnershipSettings, {"CDP_OWNERSHIP": "nats"})  # identity: host-pid
    chosen = await ownership_from_settings(leased, group="identity", partitions=2, js=nats_client.jetstream())
    await chosen.start()
    assert chosen.owned() == {0, 1}
    await chosen.stop()

    with pytest.raises(SettingsError) as bad:
        load_settings(OwnershipSettings, {"CDP_OWNERSHIP": "zookeeper", "CDP_OWNERSHIP_TTL": "0"})
    assert "CDP_OWNERSHIP" in str(bad.value)
    with pytest.raises(SettingsError, match="CDP_OWNERSHIP_TTL"):
        load_settings(OwnershipSettings, {"CDP_OWNERSHIP_TTL": "-1"})


async def test_records_no_member_wrote_cost_a_member_nothing(nats_server, nats_client):
    """nats-server answers an API request on whatever reply subject it names, and the bucket stores such an
    answer (JSON) under that key (docs/security.md, the known gap): any NATS user can plant records under a
    group's keys. A key that is no partition failed every round (every member then fenced itself and let go
    of every partition); a planted member took a share of the partitions for as long as it was planted again;
    a planted lease kept its partition from everyone for a TTL. Now they cost nothing."""
    kv = await nats_client.jetstream().create_key_value(bucket="CDP_OWNERSHIP", history=1)
    answer = b'{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","error":{"code":404}}'
    await kv.put("identity.partitions.x", answer)
    await kv.put("identity.members.ghost", answer)
    await kv.put("identity.partitions.0", answer)
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=0)
    try:
        ownership = await nats_kv_ownership(
            nc.jetstream(), group="identity", partitions=PARTITIONS, identity="identity-0", ttl=TTL
        )
        await ownership.start()
        try:
            assert ownership.owned() == set(range(PARTITIONS))  # no ghost's share; partition 0 taken at once
            for _ in range(3):  # rounds go on: none fails, none fences
                await ownership._round()
            assert ownership.owned() == set(range(PARTITIONS))
            assert (await kv.get("identity.partitions.0")).value == b"identity-0"
        finally:
            await ownership.stop()
    finally:
        await nc.close()
