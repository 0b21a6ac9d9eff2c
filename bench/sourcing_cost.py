"""What a stream that sources another costs nats-server, per message sourced: nats-server's CPU for the same
messages published to a partitioned stream and read by one pull consumer per partition, either straight
from that stream (`direct`) or from a second stream that sources it with a subject transform, as
orchestration's `ORCHESTRATION` sources `events.resolved` and `profiles.changed` (`sourced`); `none`
publishes and reads nothing back (what storing them costs).

    .venv/bin/python bench/sourcing_cost.py                          # 20,000 messages of 2,000 bytes
    .venv/bin/python bench/sourcing_cost.py --messages 50000 --size 700

Messages are published in bursts (one per partition, then a pause), as identity and profile publish their
batches. Printed per mode: nats-server's CPU (Linux schedstat) per message, from the first publish until the
consumers acknowledged the last. `sourced - direct` is what the copy costs: stored a second time, sourced
(an internal consumer and its flow control) and delivered from the copy instead of the original.

A measuring tool for people (no benchlib result file); it runs for under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import nats
from nats.js import api
from pipeline_parts import schedstat

from cdp_kit.natsserver import NatsServer

PARTITIONS = 16


async def run(mode: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await js.add_stream(name="SRC", subjects=["src.*"], storage=api.StorageType.FILE)
            read_stream, read_prefix = "SRC", "src"
            if mode == "sourced":
                await js.add_stream(
                    api.StreamConfig(
                        name="IN",
                        subjects=["in.*"],
                        storage=api.StorageType.FILE,
                        sources=[
                            api.StreamSource(
                                name="SRC",
                                subject_transforms=[api.SubjectTransform(src="src.*", dest="in.{{wildcard(1)}}")],
                            )
                        ],
                    )
                )
                read_stream, read_prefix = "IN", "in"
            subs = []
            if mode != "none":
                for p in range(PARTITIONS):
                    subs.append(await js.pull_subscribe(f"{read_prefix}.{p}", durable=f"c{p}", stream=read_stream))
            payload = b"x" * args.size
            received = 0
            all_in = asyncio.Event()

            async def consume(sub) -> None:
                nonlocal received
                while True:
                    try:
                        msgs = await sub.fetch(100, timeout=0.5)
                    except (TimeoutError, nats.errors.TimeoutError):
                        continue
                    for msg in msgs:
                        await msg.ack()
                    received += len(msgs)
                    if received >= args.messages:
                        all_in.set()

            before = schedstat(server._proc.pid)
            started = time.monotonic()
            tasks = [asyncio.create_task(consume(sub)) for sub in subs]
            for start in range(0, args.messages, PARTITIONS):
                acks = [
                    js.publish(f"src.{i % PARTITIONS}", payload, headers={"Nats-Msg-Id": f"m{i}"})
                    for i in range(start, min(args.messages, start + PARTITIONS))
                ]
                await asyncio.gather(*acks)
                await asyncio.sleep(args.pause)
            if mode != "none":
                await all_in.wait()
            after = schedstat(server._proc.pid)
            elapsed = time.monotonic() - started
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await nc.close()
        finally:
            server.stop()
    cpu = after[0] - before[0]
    print(
        f"{mode:8s} {args.messages} messages in {elapsed:.1f} s: nats-server {1e6 * cpu / args.messages:.1f} us/message"
    )
    return cpu / args.messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=2_000, help="payload bytes")
    parser.add_argument("--pause", type=float, default=0.005, help="seconds between bursts (one per partition)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    found: dict[str, list[float]] = {"none": [], "direct": [], "sourced": []}
    for _ in range(args.rounds):
        for mode in found:
            found[mode].append(asyncio.run(run(mode, args)))
    best = {mode: min(values) for mode, values in found.items()}
    print(
        f"best of {args.rounds}: stored only {1e6 * best['none']:.1f} us, direct {1e6 * best['direct']:.1f} us, "
        f"sourced {1e6 * best['sourced']:.1f} us per message; the copy costs {1e6 * (best['sourced'] - best['direct']):.1f} us"
    )


if __name__ == "__main__":
    main()
