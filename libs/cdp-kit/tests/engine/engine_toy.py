"""A toy service for the engine's tests: per-key logs of applied inputs, one output message per input.

Input `<key>` on `toyin.<p>` (message id `in-<n>`) appends `in-<n>` to the stored list of `<key>` and
publishes `out-<n>` on `toyout.<p>`. So the store says whether every input was applied exactly once and
in order per key, and the output stream whether every output was stored exactly once.
"""

from __future__ import annotations

import asyncio
import random

import orjson

from cdp_kit.bus import Bus, OutMessage, StreamSpec, dead_letter_stream, partition_for
from cdp_kit.engine import Effects, EngineSpec, PartitionedEngine, Reject
from cdp_kit.errors import Unavailable
from cdp_kit.storage import MemoryStore, Put

IN_STREAM, IN_PREFIX = "TOYIN", "toyin"
OUT_STREAM, OUT_PREFIX = "TOYOUT", "toyout"
COUNTERS = "toy_counters"
CHECKPOINTS = "toy_checkpoints"


async def ensure_streams(bus: Bus) -> None:
    await bus.ensure_streams(
        StreamSpec(name=IN_STREAM, subjects=(f"{IN_PREFIX}.>",)),
        StreamSpec(name=OUT_STREAM, subjects=(f"{OUT_PREFIX}.>",)),
        dead_letter_stream(),
    )


def spec(partitions: int, **overrides) -> EngineSpec:
    base = dict(
        service="toy",
        stream=IN_STREAM,
        subject_prefix=IN_PREFIX,
        partitions=partitions,
        batch_size=8,
        in_flight=3,
        fetch_timeout=0.1,
        backoff=(0.05,),
        max_deliver=3,
        publish_backoff=(0.02, 0.1),
    )
    base.update(overrides)
    return EngineSpec(**base)


class Toy:
    """`poison` is rejected by decode; `boom` makes apply raise (every time)."""

    def __init__(self, store, *, on_apply=None) -> None:
        self.store = store
        self.cache: dict[int, dict[str, list[str]]] = {}
        self.on_apply = on_apply
        self.recoveries: list[int] = []

    def decode(self, delivery):
        key = delivery.data.decode()
        if key == "poison":
            raise Reject("invalid_toy", "key", "cannot be counted")
        return key, delivery.msg_id

    async def apply(self, partition, items):
        if self.on_apply is not None:
            await self.on_apply(partition, items)
        cache = self.cache.setdefault(partition, {})
        changed = {}
        messages = []
        for key, msg_id in items:
            if key == "boom":
                raise ValueError("boom")
            if key not in cache:
                record = await self.store.get(COUNTERS, key)
                cache[key] = record.doc["applied"] if record is not None else []
            cache[key] = changed[key] = [*cache[key], msg_id]  # a new list: submitted docs never change
            messages.append(OutMessage(f"{OUT_PREFIX}.{partition}", msg_id.encode(), "out-" + msg_id))
        return Effects([Put(COUNTERS, key, {"applied": applied}) for key, applied in changed.items()], messages)

    async def recover(self, partition):
        self.recoveries.append(partition)
        self.cache.pop(partition, None)


class CheckedStore(MemoryStore):
    """A memory store that can fail or hold commits, and checks on every landed write that the
    stored checkpoint never passes an input whose effect is not stored."""

    def __init__(self, positions: dict[str, tuple[str, int]]) -> None:
        super().__init__()
        self.positions = positions  # input id -> (key, stream position)
        self.fail_before = 0.0
        self.fail_after = 0.0
        self.down = False
        self.hold: asyncio.Event | None = None
        self.random = random.Random(0)
        self.violations: list[str] = []
        self.writes = 0
        self.failed_before = self.failed_after = 0
        self.latency = 0.0  # up to this many seconds per commit

    async def _bulk_write(self, ops):
        if self.hold is not None and any(getattr(op, "collection", "") == COUNTERS for op in ops):
            await self.hold.wait()
        if self.latency:
            await asyncio.sleep(self.random.uniform(0, self.latency))
        if self.down or self.random.random() < self.fail_before:
            self.failed_before += 1
            raise Unavailable("store down")
        result = await super()._bulk_write(ops)
        self.writes += 1
        self._check()
        if self.random.random() < self.fail_after:
            self.failed_after += 1
            raise Unavailable("store timed out after writing")  # landed, reported failed
        return result

    def _check(self) -> None:
        counters = self._collections.get(COUNTERS)
        checkpoints = self._collections.get(CHECKPOINTS)
        if checkpoints is None:
            return
        applied = set()
        for entry in counters.entries.values() if counters is not None else ():
            applied.update(orjson.loads(entry.blob)["applied"])
        stored = {subject: orjson.loads(e.blob)["stream_seq"] for subject, e in checkpoints.entries.items()}
        for msg_id, (key, seq, subject) in self.positions.items():
            if seq <= stored.get(subject, 0) and key not in ("poison", "boom") and msg_id not in applied:
                self.violations.append(f"{subject}: checkpoint {stored[subject]} passes {msg_id} at {seq}")


async def publish_inputs(bus: Bus, keys: list[str], partitions: int, positions: dict, start: int = 0) -> list[str]:
    messages = []
    for n, key in enumerate(keys, start):
        p = partition_for(key, partitions)
        messages.append(OutMessage(f"{IN_PREFIX}.{p}", key.encode(), f"in-{n}"))
    results = await bus.publisher.publish_batch(messages)
    for message, result in zip(messages, results, strict=True):
        assert result.ok
        positions[message.msg_id] = (message.payload.decode(), result.seq, message.subject)
    return [m.msg_id for m in messages]


def engine(bus, store, partitions, logic=None, **overrides) -> tuple[PartitionedEngine, Toy]:
    logic = logic or Toy(store)
    return PartitionedEngine(logic, spec(partitions, **overrides), bus=bus, store=store), logic


async def outputs(bus: Bus) -> list[str]:
    """Every message id in the output stream, in stream order."""
    info = await bus.js.stream_info(OUT_STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await bus.js.get_msg(OUT_STREAM, seq)
        ids.append(msg.headers["Nats-Msg-Id"])
    return ids


async def checkpoint_of(store, subject: str = f"{IN_PREFIX}.0") -> int:
    """The stored checkpoint of `subject` (0: none; a partition's owner claims the record when it starts)."""
    record = await store.get(CHECKPOINTS, subject)
    return record.doc.get("stream_seq", 0) if record is not None else 0


async def applied(store) -> dict[str, list[str]]:
    return {r.key: r.doc["applied"] async for r in store.scan_all(COUNTERS)}


async def until(predicate, timeout=15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)
