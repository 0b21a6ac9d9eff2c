"""`cdpctl lag` tells a stuck consumer from a busy one: the age of each consumer's oldest message not yet
acknowledged, and with `--watch N` how fast its backlog drains. An on-call trial had counts only, so telling
the two apart meant sampling twice by hand. On a real nats-server, with a consumer that does not acknowledge."""

from __future__ import annotations

import asyncio
import json
import re
import time

from cdp_kit.bus import Bus, OutMessage, events_raw_stream
from cdpctl import bus as bus_module
from cdpctl.bus import age_text


async def lag_of(bus_cli, consumer: str, *args: str) -> dict:
    result = await bus_cli.run("lag", "--json", *args)
    assert result.exit_code == 0, result.output
    (row,) = [row for row in json.loads(result.output) if row["consumer"] == consumer]
    return row


async def test_lag_shows_the_age_of_the_oldest_unacknowledged_message_until_it_is_acknowledged(bus_cli):
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream())
        await bus.js.add_consumer(
            "EVENTS_RAW", durable_name="profile-p0", filter_subject="events.raw.0", ack_policy="explicit"
        )
        assert (await lag_of(bus_cli, "profile-p0"))["oldest_age_seconds"] is None  # nothing waits

        # Another partition's message first (older, not this consumer's), then two of its own.
        await bus.publisher.publish_batch([OutMessage("events.raw.1", b"other", "o-1")])
        await asyncio.sleep(1.0)
        published = time.time()
        await bus.publisher.publish_batch([OutMessage("events.raw.0", f"m{i}".encode(), f"m-{i}") for i in range(2)])
        reader = await bus.js.pull_subscribe_bind(durable="profile-p0", stream="EVENTS_RAW")
        (first,) = await reader.fetch(1, timeout=5)  # delivered, not acknowledged
        await asyncio.sleep(1.0)

        row = await lag_of(bus_cli, "profile-p0")
        assert (row["pending"], row["ack_pending"]) == (1, 1)
        age = row["oldest_age_seconds"]
        assert 1.0 <= age <= time.time() - published + 0.5, row  # its own oldest, not the other partition's
        await asyncio.sleep(0.5)
        assert (await lag_of(bus_cli, "profile-p0"))["oldest_age_seconds"] > age  # still waiting: older
        table = (await bus_cli.run("lag")).output
        (line,) = [line for line in table.splitlines() if "profile-p0" in line]
        assert "oldest" in table and re.search(r"\b\d+s\b", line), table  # e.g. "2s"

        await first.ack_sync()
        (second,) = await reader.fetch(1, timeout=5)
        await second.ack_sync()
        row = await lag_of(bus_cli, "profile-p0")
        assert (row["pending"], row["ack_pending"], row["oldest_age_seconds"]) == (0, 0, None), row
        await reader.unsubscribe()


async def test_lag_watch_shows_a_growing_backlog_and_a_stuck_consumer(bus_cli, monkeypatch):
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream())
        await bus.js.add_consumer("EVENTS_RAW", durable_name="profile-p0", ack_policy="explicit")
        await bus.publisher.publish_batch([OutMessage("events.raw.0", b"x", f"a-{i}") for i in range(2)])
        loop = asyncio.get_running_loop()

        def four_more_arrive(seconds: float) -> None:
            # Between the two samples (the command runs off this loop, in a thread): the backlog grows by 4.
            batch = [OutMessage("events.raw.0", b"y", f"b-{i}") for i in range(4)]
            asyncio.run_coroutine_threadsafe(bus.publisher.publish_batch(batch), loop).result(10)
            time.sleep(seconds)

        monkeypatch.setattr(bus_module, "_pause", four_more_arrive)
        row = await lag_of(bus_cli, "profile-p0", "--watch", "1")
        assert (row["pending"], row["backlog_change"], row["floor_moved"]) == (6, 4, False), row
        assert row["drain_per_second"] < 0, row  # growing

        result = await bus_cli.run("lag", "--watch", "1")
        assert result.exit_code == 0, result.output
        assert "stuck" in result.output, result.output


def test_an_age_reads_as_an_operator_says_it():
    assert [age_text(s) for s in (None, 0.4, 42, 252, 11100, 187200)] == ["-", "0s", "42s", "4m12s", "3h05m", "2d04h"]
