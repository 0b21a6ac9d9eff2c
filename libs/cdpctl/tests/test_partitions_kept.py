"""A home keeps the partition count it started with: `cdpctl up` records it the first time and refuses to
start the same home with another one, naming both and the way out. A new home starts with 2; a home with
data from before the record keeps 8, the count every home had then."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import click
import nats
import pytest

from cdp_kit.bus import subjects
from cdp_kit.bus.partition_count import recorded
from cdp_kit.natsserver import NatsServer
from cdp_kit.streamtable import STREAMS
from cdp_testing.platform_run import PlatformError, RunningPlatform
from cdpctl.partitions import RECORD, home_partitions, keep_partitions, record


def test_the_first_start_records_the_count_and_a_later_one_must_match(tmp_path):
    keep_partitions(tmp_path, 8)
    assert json.loads((tmp_path / RECORD).read_text()) == {"partitions": 8}
    assert (tmp_path / RECORD).stat().st_mode & 0o777 == 0o600
    keep_partitions(tmp_path, 8)  # the same count: nothing to say
    with pytest.raises(click.ClickException) as refused:
        keep_partitions(tmp_path, 2)
    assert "started with CDP_PARTITIONS=8, not 2" in refused.value.message
    assert "start a new home" in refused.value.message
    assert json.loads((tmp_path / RECORD).read_text()) == {"partitions": 8}  # unchanged


def test_up_refuses_a_home_started_with_another_count_before_it_starts_anything(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / RECORD).write_text('{"partitions": 8}\n')
    done = subprocess.run(
        [sys.executable, "-c", "from cdpctl.cli import main; main()", "--home", str(home), "up"],
        env={**os.environ, "CDP_PARTITIONS": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "started with CDP_PARTITIONS=8, not 2" in done.stderr
    assert not (home / "nats" / "nats-server.log").exists()  # nats-server was never started


def test_a_new_home_starts_with_2_partitions_unless_cdp_partitions_says_otherwise(tmp_path):
    new, asked = tmp_path / "new", tmp_path / "asked"
    for home in (new, asked):
        home.mkdir()
    assert home_partitions(new, {}, data=[new / "data"]) == 2
    assert json.loads((new / RECORD).read_text()) == {"partitions": 2}
    assert home_partitions(new, {}, data=[new / "data"]) == 2  # kept
    assert home_partitions(asked, {"CDP_PARTITIONS": "4"}, data=[asked / "data"]) == 4
    assert home_partitions(asked, {}, data=[asked / "data"]) == 4  # unset: the home's count


def test_a_home_with_data_from_before_the_record_keeps_8_or_the_count_asked_recorded_once_provisioned(tmp_path):
    """The count asked is the provisioner's to check against what the streams show (a home started with
    4 before the record, upgraded as the trial did); nothing is recorded until it agreed."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "identity.db").write_bytes(b"SQLite format 3\x00")
    assert home_partitions(tmp_path, {"CDP_PARTITIONS": "4"}, data=[tmp_path / "data"]) == 4
    assert home_partitions(tmp_path, {}, data=[tmp_path / "data"]) == 8
    assert not (tmp_path / RECORD).exists()
    record(tmp_path, 8)
    assert json.loads((tmp_path / RECORD).read_text()) == {"partitions": 8}
    assert home_partitions(tmp_path, {}, data=[tmp_path / "data"]) == 8


def test_a_count_that_is_not_one_is_refused_by_name(tmp_path):
    with pytest.raises(click.ClickException, match=r"CDP_PARTITIONS='0' is invalid"):
        home_partitions(tmp_path, {"CDP_PARTITIONS": "0"}, data=[])
    (tmp_path / RECORD).write_text('{"partitions": "eight"}')
    with pytest.raises(click.ClickException, match="is not cdpctl's record"):
        home_partitions(tmp_path, {}, data=[])


async def _made_with(platform: RunningPlatform) -> tuple[set, list[str]]:
    """The counts the streams record, and identity's consumers."""
    nc = await platform.connect_nats()
    try:
        js = nc.jetstream()
        counts = {recorded((await js.stream_info(entry.name)).config) for entry in STREAMS}
        consumers = sorted(c.name for c in await js.consumers_info(subjects.EVENTS_RAW))
        return counts, consumers
    finally:
        await nc.close()


@pytest.mark.timeout(300)
def test_up_starts_a_new_home_with_2_partitions_everywhere(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "CDP_PARTITIONS"}
    with RunningPlatform(tmp_path, env=env, companions=False) as platform:
        assert json.loads((platform.home / RECORD).read_text()) == {"partitions": 2}
        counts, consumers = asyncio.run(_made_with(platform))
        assert counts == {2, None}  # every partitioned stream records 2 (PRIVACY and DLQ have none)
        assert consumers == ["identity-p0", "identity-p1"]
        auth = (platform.home / "nats" / "auth.conf").read_text()
        assert "identity-p1" in auth and "identity-p2" not in auth  # the users' permissions: 2 partitions


async def _forget_counts(url: str) -> None:
    """Every stream as cdp made it before it recorded the partition count: without one."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for entry in STREAMS:
            config = (await js.stream_info(entry.name)).config
            config.metadata = {k: v for k, v in (config.metadata or {}).items() if k.startswith("_nats.")} or None
            await js.update_stream(config)
            assert recorded((await js.stream_info(entry.name)).config) is None
    finally:
        await nc.close()


@pytest.mark.timeout(400)
def test_up_keeps_8_for_a_home_from_before_the_record(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "CDP_PARTITIONS"}
    with RunningPlatform(tmp_path, env={**env, "CDP_PARTITIONS": "8"}, companions=False) as platform:
        home = platform.home
    # The home as cdpctl left it before it recorded the count: data, no partitions.json, no count in the streams.
    (home / RECORD).unlink()
    with NatsServer(store_dir=home / "nats") as old:
        asyncio.run(_forget_counts(old.url))
    with RunningPlatform(tmp_path, env=env, companions=False) as platform:  # CDP_PARTITIONS unset, as for a new home
        assert json.loads((home / RECORD).read_text()) == {"partitions": 8}
        counts, consumers = asyncio.run(_made_with(platform))
        assert counts == {8, None}
        assert consumers == sorted(f"identity-p{p}" for p in range(8))


@pytest.mark.timeout(500)
def test_up_on_a_home_made_with_4_before_the_record_is_refused_naming_4_then_starts_with_4(tmp_path):
    """The upgrade trial's D1: a home the last release ran with CDP_PARTITIONS=4. Started without the
    variable it is refused by the provisioner naming the 4 its streams show, with nothing recorded; started
    as that refusal says, it runs and records 4."""
    env = {key: value for key, value in os.environ.items() if key != "CDP_PARTITIONS"}
    with RunningPlatform(tmp_path, env={**env, "CDP_PARTITIONS": "4"}, companions=False) as platform:
        home = platform.home
    (home / RECORD).unlink()
    with NatsServer(store_dir=home / "nats") as old:
        asyncio.run(_forget_counts(old.url))
    with pytest.raises(PlatformError) as refused:
        RunningPlatform(tmp_path, env=env, companions=False).start()
    assert "made with 4 partitions" in str(refused.value) and "CDP_PARTITIONS=4" in str(refused.value)
    assert not (home / RECORD).exists()
    with RunningPlatform(tmp_path, env={**env, "CDP_PARTITIONS": "4"}, companions=False) as platform:
        assert json.loads((home / RECORD).read_text()) == {"partitions": 4}
        counts, consumers = asyncio.run(_made_with(platform))
        assert counts == {4, None}
        assert consumers == sorted(f"identity-p{p}" for p in range(4))
