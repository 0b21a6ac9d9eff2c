"""Shared setup of the timer tests (test_timer_rounds.py, test_adopt_timers.py, test_replay_clock.py): the
crash world's fixture, engines without a stream on one store and clock, the segments they serve and the
restart that replays a partition. Written once here so that each test states only what it is about.

Imported relatively (`from .timer_world import ...`), as the tests import test_stream's and
test_torn_snapshot's helpers: --import-mode=importlib keeps the test folder off sys.path. Fixtures are
bound by name in each test module (`world = timer_world.world`), pytest finding them there."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, profiles_stream, segments_stream, subjects
from cdp_kit.storage import open_store
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import SegmentationEngine
from cdp_testing.fakes import T0, Clock, Delivery

from .test_stream import nothing_after
from .test_torn_snapshot import PARTITIONS, change, crash_world

# In from `starts_at` for a minute.
WINDOW = "traits.starts_at < now and traits.starts_at > now - 1m"
STARTS = T0 + 30
TRIAL = "traits.trial_ends_at > now"
PAYING_TRIAL = 'in_segment("trial") and traits.level > 0'

Engines = Callable[[list[int]], SegmentationEngine]


@pytest.fixture
async def world(nats_server):
    async with crash_world(nats_server) as world:
        yield world


@pytest.fixture
async def engines(nats_server):
    """Engines without a stream on one memory store and clock, partitions arriving when told."""
    async with open_store("memory://") as store:
        async with Bus.connect(nats_server.url, name="segmentation-arrivals") as bus:
            await bus.ensure_streams(profiles_stream(), segments_stream())
            clock = Clock(T0)

            def engine(owned: list[int]) -> SegmentationEngine:
                return SegmentationEngine(
                    store, bus.publisher, partitions=PARTITIONS, owned=owned, telemetry=bus.telemetry, clock=clock
                )

            yield engine, clock, nats_server.url


def no_id_twice(published) -> None:
    twice = [key for key, n in collections.Counter(e.id for e in published).items() if n > 1]
    assert not twice, f"transitions published twice: {twice}"


async def quiet(replica) -> None:
    """Wait until `replica`'s stream is quiescent (a timer round holds the quiescence while it publishes)."""
    async with replica.stream.quiescent():
        pass


async def without_timer_loop(engine: SegmentationEngine) -> None:
    """End `engine`'s loops (the test fires its timers when it means to; a crash leaves no snapshot)."""
    for task in engine._tasks:
        task.cancel()
    await asyncio.gather(*engine._tasks, return_exceptions=True)
    engine._tasks.clear()


def never_snapshots(engine) -> None:
    """`engine`'s next snapshots never come: the process dies before them."""

    async def never() -> int:
        return 0

    engine.snapshot = never


def handed(person: str, at: float, partition: int, seq: int, **traits) -> list[Delivery]:
    batch = profile_pb2.ProfileChangedBatch(changes=[change(person, at, **traits)])
    return [Delivery(batch, subjects.profiles_changed(partition), seq)]


async def started(engine: Engines, owned: list[int], *, loops: bool = True) -> SegmentationEngine:
    """An engine serving `owned`, started; its timer loop ended unless `loops`."""
    started = engine(owned)
    await started.start()
    if not loops:
        await without_timer_loop(started)
    return started


async def live(engine: SegmentationEngine, name: str, definition: str) -> None:
    await engine.create(name, parse(definition))
    await engine.wait_live(name)


async def window_snapshotted(engine: Engines, owned: list[int], person: str) -> SegmentationEngine:
    """An engine serving `owned` with `window` live, p (partition 0) starting at STARTS, snapshotted."""
    first = await started(engine, owned)
    await live(first, "window", WINDOW)
    await first.handle(handed(person, T0, 0, 1, starts_at=STARTS))
    await first.snapshot()
    return first


async def in_trial(engine: Engines, person: str, *, loops: bool = True) -> SegmentationEngine:
    """An engine serving partition 1 with `trial` live, p (partition 1) in it until T0+60."""
    served = await started(engine, [1], loops=loops)
    await live(served, "trial", TRIAL)
    await served.handle(handed(person, T0, 1, 1, trial_ends_at=T0 + 60, level=1))
    return served


@contextlib.asynccontextmanager
async def restarted(
    engine: Engines, clock: Clock, at: float, owned: list[int], partition: int, *, fire: bool = True
) -> AsyncIterator[SegmentationEngine]:
    """A replica started at `at` serving `owned`, its timer loop ended (it would fire the timers at `at`
    before the replay), `partition` replayed from its snapshot and, if `fire`, its due timers fired; stopped
    when the block ends."""
    clock.now = at
    again = await started(engine, owned, loops=False)
    try:
        await again.replay(nothing_after(0), partitions=(partition,))  # nothing past its snapshot
        if fire:
            await again.fire_timers()
        yield again
    finally:
        await again.stop()
