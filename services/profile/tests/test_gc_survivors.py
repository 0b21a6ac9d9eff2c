"""The profile process never pays a generation-1 collection: what survives generation 0 for
`GC_THRESHOLD[1]` collections is frozen instead (`cdp_profile.__main__.freeze_survivors`), so the hot
profiles' growing objects are not rescanned, a pause of the event loop of ~0.4 s every ~85 s at 1,000
events/s in the pipeline benchmark (bench/stall_report.py on a `--trace` run)."""

from __future__ import annotations

import gc

import pytest

from cdp_profile.__main__ import GC_THRESHOLD, freeze_survivors


@pytest.fixture
def profile_gc():
    """The collector as the profile process sets it up, restored after the test."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.set_threshold(*GC_THRESHOLD)
    gc.callbacks.append(freeze_survivors)
    try:
        yield
    finally:
        gc.callbacks.remove(freeze_survivors)
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.collect()


def test_long_lived_objects_are_frozen_not_rescanned(profile_gc):
    """Many more surviving objects than 20 young collections' worth: generation 0 is collected, generation
    1 never, and the survivors end up frozen (each young collection still scans only the young)."""
    before = [entry["collections"] for entry in gc.get_stats()]
    kept = [{"event": [i]} for i in range(GC_THRESHOLD[0] * (GC_THRESHOLD[1] + 5))]
    after = [entry["collections"] for entry in gc.get_stats()]
    assert after[0] - before[0] > GC_THRESHOLD[1]
    assert after[1] == before[1]
    assert gc.get_freeze_count() >= GC_THRESHOLD[0] * GC_THRESHOLD[1]
    assert len(kept) > 0


def test_young_garbage_cycles_are_still_collected(profile_gc):
    """A reference cycle that dies young is found by the generation-0 collections as before."""

    class Node:
        pass

    found = []

    def count(phase: str, info: dict) -> None:
        if phase == "stop":
            found.append(info["collected"])

    gc.callbacks.append(count)
    try:
        for _ in range(GC_THRESHOLD[0] * 2):
            node = Node()
            node.me = node
    finally:
        gc.callbacks.remove(count)
    assert sum(found) >= GC_THRESHOLD[0]


async def test_a_sweep_frees_the_cycles_that_died_frozen(profile_gc):
    """What freezing keeps is not kept for ever: a cycle frozen alive and dropped afterwards is freed by
    the next sweep, and what is still alive is frozen again."""
    import asyncio
    import weakref

    from cdp_profile.__main__ import sweep_frozen

    class Node:
        pass

    node = Node()
    node.me = node
    alive = [Node() for _ in range(100)]
    gc.freeze()
    dropped = weakref.ref(node)
    del node
    gc.collect()
    assert dropped() is not None  # frozen: not collected
    sweep = asyncio.create_task(sweep_frozen(every=0.01))
    try:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if dropped() is None:
                break
    finally:
        sweep.cancel()
    assert dropped() is None
    assert gc.get_freeze_count() >= len(alive)
