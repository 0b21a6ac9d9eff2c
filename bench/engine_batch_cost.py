"""What one batch costs the kit's partitioned engine, whatever the service: CPU per batch of a
`PartitionedEngine` whose logic does next to nothing, on a real nats-server and the SQLite store.

    .venv/bin/python bench/engine_batch_cost.py                      # 1,000 batches of 1 message
    .venv/bin/python bench/engine_batch_cost.py --messages 2000 --batch 10 --no-writes --no-messages
    .venv/bin/python bench/engine_batch_cost.py --second engine     # a second stream, an engine of its own
    .venv/bin/python bench/engine_batch_cost.py --second input      # ... or a second input of the same engine

Messages (700 bytes, like an event) are published to one partition a burst at a time (`--batch`
messages, then a pause), so the engine takes each burst as one batch - as every service does at low and
moderate rates, when its consumer is idle when a message comes. Per batch the logic returns one small
write (`--no-writes`: none) and one message to publish (`--no-messages`: none); the engine adds the
checkpoint and the outbox record, commits, publishes, acknowledges. Printed: CPU per batch and per
message of this process (the engine and the publisher feeding it: every thread) and of nats-server
(Linux schedstat). In the whole pipeline at 1,000 events/s most batches are a few messages, so this fixed
cost, paid by each of the eight engines a message crosses, is most of the CPU per event
(bench_pipeline's `cpu_ms_per_event`); it shrinks per event as batches grow under load.

`--second`: each burst also comes on a second stream (as profile reads events and the scores they lead
to), read either by a second engine sharing the first one's write chain (profile before it put both on
one engine) or as a second input of the same engine (`PartitionedEngine(also=...)`); CPU is then per
message of both streams.

A measuring tool for people (no benchlib result file); it runs for a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nats.js.errors import NotFoundError
from pipeline_parts import schedstat

from cdp_kit.bus import Bus, OutMessage, subjects
from cdp_kit.bus.streams import events_raw_stream, events_resolved_stream
from cdp_kit.engine import Effects, EngineSpec, PartitionedEngine, WriteChain
from cdp_kit.natsserver import NatsServer
from cdp_kit.storage import Put, open_store
from cdp_kit.telemetry import setup_telemetry


class Nearly:
    """A logic that does next to nothing: one small write and one message per batch (each optional)."""

    def __init__(self, writes: bool, messages: bool, tag: str = "o") -> None:
        self.writes = writes
        self.messages = messages
        self.tag = tag
        self.batches = 0

    def decode(self, delivery):
        return delivery.data

    async def apply(self, partition: int, items: list) -> Effects:
        self.batches += 1
        writes = [Put("cost_state", f"{self.tag}{partition}", {"n": len(items)})] if self.writes else []
        messages = (
            [OutMessage(f"cost.out.{partition}", b"x" * 100, f"{self.tag}-{self.batches}")] if self.messages else []
        )
        return Effects(writes, messages)

    async def recover(self, partition: int) -> None:
        pass


async def measure(args: argparse.Namespace) -> dict:
    gc.set_threshold(50_000, 20, 100)  # as the services run
    logic = Nearly(not args.no_writes, not args.no_messages)
    second = Nearly(not args.no_writes, not args.no_messages, tag="s")
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            async with (
                open_store(f"sqlite:///{tmp}/cost.db") as store,
                Bus.connect(server.url, name="engine", telemetry=setup_telemetry("cost")) as bus,
                Bus.connect(server.url, name="feeder") as feeder,
            ):
                await bus.ensure_streams(events_raw_stream(), events_resolved_stream())
                await bus.js.add_stream(name="COST_OUT", subjects=["cost.out.>"])
                spec = EngineSpec(
                    service="cost", stream=subjects.EVENTS_RAW, subject_prefix=subjects.EVENTS_RAW_PREFIX, partitions=1
                )
                spec2 = EngineSpec(
                    service="cost2",
                    stream=subjects.EVENTS_RESOLVED,
                    subject_prefix=subjects.EVENTS_RESOLVED_PREFIX,
                    partitions=1,
                )
                chain = WriteChain(store)
                also = [(second, spec2)] if args.second == "input" else []
                engines = [PartitionedEngine(logic, spec, bus=bus, store=store, chain=chain, also=also)]
                if args.second == "engine":
                    engines.append(PartitionedEngine(second, spec2, bus=bus, store=store, chain=chain))
                tasks = [asyncio.create_task(engine.run()) for engine in engines]
                for engine in engines:
                    await engine.wait_ready()
                subject, payload = subjects.events_raw(0), b"e" * 700
                inputs = [(subjects.EVENTS_RAW, "cost", subject)]
                if args.second != "none":
                    inputs.append((subjects.EVENTS_RESOLVED, "cost2", subjects.events_resolved(0)))

                async def feed(count: int, tag: str) -> None:
                    for start in range(0, count, args.batch):
                        burst = range(start, min(count, start + args.batch))
                        await feeder.publisher.publish_batch(
                            [OutMessage(to, payload, f"{tag}{name}{i}") for _, name, to in inputs for i in burst]
                        )
                        await asyncio.sleep(args.pause)
                    for stream, name, _ in inputs:
                        while True:
                            try:
                                info = await bus.js.consumer_info(stream, subjects.partition_durable(name, 0))
                            except NotFoundError:
                                # Being restarted at its floor (a reconnect on a busy machine): ask again.
                                await asyncio.sleep(0.05)
                                continue
                            if not info.num_pending and not info.num_ack_pending:
                                break
                            await asyncio.sleep(0.05)

                await feed(50, "warm-")
                batches0, cpu0, nats0 = logic.batches, time.process_time(), schedstat(server._proc.pid)
                await feed(args.messages, "m-")
                cpu, nats1 = time.process_time() - cpu0, schedstat(server._proc.pid)
                batches = logic.batches - batches0
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            server.stop()
    nats = (nats1[0] - nats0[0]) if nats0 and nats1 else float("nan")
    messages = args.messages * (1 if args.second == "none" else 2)
    return {
        "messages": messages,
        "batches": batches,
        "process_ms_per_batch": 1000 * cpu / batches,
        "process_us_per_message": 1e6 * cpu / messages,
        "nats_ms_per_batch": 1000 * nats / batches,
        "nats_us_per_message": 1e6 * nats / messages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1, help="messages published together (one batch)")
    parser.add_argument("--pause", type=float, default=0.004, help="seconds between bursts")
    parser.add_argument("--no-writes", action="store_true", help="the logic writes nothing (the checkpoint still is)")
    parser.add_argument("--no-messages", action="store_true", help="the logic publishes nothing")
    parser.add_argument(
        "--second",
        choices=("none", "engine", "input"),
        default="none",
        help="each burst on a second stream too, read by an engine of its own or as the engine's second input",
    )
    args = parser.parse_args()
    found = asyncio.run(measure(args))
    print(
        f"{found['messages']} messages in {found['batches']} batches (of the first stream): this process "
        f"{found['process_ms_per_batch']:.3f} ms CPU per batch ({found['process_us_per_message']:.0f} us per message), "
        f"nats-server {found['nats_ms_per_batch']:.3f} ms per batch ({found['nats_us_per_message']:.0f} us per message)"
    )


if __name__ == "__main__":
    main()
