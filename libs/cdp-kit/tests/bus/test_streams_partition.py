"""Stream provisioning and the partition function, against a real nats-server."""

import asyncio

from nats.js import api

from cdp_kit.bus import StreamSpec, ensure_stream, events_raw_stream, owned_partitions, partition_for


async def test_ensure_stream_is_idempotent_and_applies_changes(nats_client):
    js = nats_client.jetstream()
    first = await ensure_stream(js, events_raw_stream())
    again = await ensure_stream(js, events_raw_stream())
    assert first.config.subjects == again.config.subjects == ["events.raw.>"]
    longer = await ensure_stream(js, events_raw_stream(max_age=30 * 86400))
    assert round(longer.config.max_age) == 30 * 86400


async def test_a_reader_creates_a_missing_stream_but_never_changes_its_owners_settings(nats_client):
    # Identity owns EVENTS_RAW's reading side but the collector configures it (retention, the
    # de-duplication window): identity starting after the collector must not put the defaults back.
    js = nats_client.jetstream()
    created = await ensure_stream(js, events_raw_stream(), update=False)  # a reader first: created
    assert round(created.config.max_age) == 7 * 86400
    owner = await ensure_stream(js, events_raw_stream(max_age=30 * 86400, duplicate_window=3600))
    assert round(owner.config.max_age) == 30 * 86400
    reader = await ensure_stream(js, events_raw_stream(), update=False)
    assert round(reader.config.max_age) == 30 * 86400
    assert round(reader.config.duplicate_window) == 3600


async def test_replicas_racing_to_create_a_stream_all_succeed(nats_client):
    js = nats_client.jetstream()
    spec = StreamSpec(name="RACE", subjects=("race.>",))
    infos = await asyncio.gather(*(ensure_stream(js, spec) for _ in range(8)))
    assert {i.config.name for i in infos} == {"RACE"}


async def test_partition_matches_nats_server_subject_mapping(nats_client):
    """Our partition function places a key where the server's `partition(n, wildcard)` mapping does."""
    js = nats_client.jetstream()
    n = 8
    await js.add_stream(
        api.StreamConfig(
            name="MAPPED",
            subjects=["keyed.*"],
            subject_transform=api.SubjectTransform(
                src="keyed.*", dest=f"mapped.{{{{partition({n},1)}}}}.{{{{wildcard(1)}}}}"
            ),
        )
    )
    keys = [f"user-{i}" for i in range(200)] + ["alice@example.com".replace(".", "_"), "0", "ÄÖÜ"]
    for key in keys:
        await js.publish(f"keyed.{key}", b"")
    for seq, key in enumerate(keys, start=1):
        msg = await js.get_msg("MAPPED", seq)
        assert msg.subject == f"mapped.{partition_for(key, n)}.{key}", key


def test_every_partition_has_exactly_one_owner():
    for replicas in (1, 2, 3, 5):
        owned = [p for ordinal in range(replicas) for p in owned_partitions(16, ordinal, replicas)]
        assert sorted(owned) == list(range(16))


async def test_a_stream_kept_longer_than_the_promised_30_days_is_said_at_start(nats_server, caplog):
    """A day-2 trial set CDP_PROFILE_CHANGES_RETENTION_DAYS=45 and nothing said that a deleted person's
    copies in PROFILES would now last 45 days, past what docs/privacy.md promises."""
    import logging

    from cdp_kit.bus import Bus, privacy_stream, profiles_stream

    caplog.set_level(logging.WARNING, logger="cdp.bus")
    async with Bus.connect(nats_server.url, name="profile") as bus:
        await bus.ensure_streams(profiles_stream(max_age=45 * 86400), privacy_stream(), events_raw_stream())
    [said] = [r for r in caplog.records if r.name == "cdp.bus" and "longer than the 30 days" in r.getMessage()]
    assert (said.stream, said.max_age_days) == ("PROFILES", 45.0)  # PRIVACY keeps for ever on purpose
