"""What the scoring service does when it stops, and that nothing in it holds the stop up.

Releasing partitions together (a replica stopping releases all of them): they drain at once, and what a
release must do is still done: every batch applied is durable and acknowledged, one last snapshot holds
each partition's final checkpoint, and the fields are forgotten. Each drain waits for its partition's
pull to return (up to the fetch timeout): drained one after the other, as they were, the service took
about a second per partition to stop.

The worker process stopped with a job it never read (a quality check sends the model's ONNX bytes,
more than a pipe holds): the service still exits, where the queue's feeder thread kept it alive."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, partition_for, profiles_stream, scores_stream, subjects
from cdp_kit.engine.pipeline import PartitionPipeline
from cdp_kit.storage import open_store
from cdp_scoring.engine import CHECKPOINTS, SNAPSHOTS, ScoringEngine
from cdp_scoring.modelstore import FolderModelStore
from cdp_scoring.stream import scoring_stream
from cdp_testing.onnx_models import logistic_model
from cdp_testing.streams import settled_consumer

PARTITIONS = 4
PERSONS = [f"p_{i:03d}" for i in range(16)]


def change(person: str, sessions: float) -> bytes:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.FromMilliseconds(1_790_000_000_000)
    message.computed["sessions_30d"].number_value = sessions
    return profile_pb2.ProfileChangedBatch(changes=[message]).SerializeToString()


@pytest.mark.timeout(60)
async def test_partitions_released_together_drain_at_once_and_still_snapshot(nats_server, tmp_path, monkeypatch):
    draining: set[int] = set()
    overlap = 0
    stop = PartitionPipeline.stop

    async def watched_stop(pipeline: PartitionPipeline) -> None:
        nonlocal overlap
        draining.add(pipeline.partition)
        overlap = max(overlap, len(draining))
        try:
            await stop(pipeline)
        finally:
            draining.discard(pipeline.partition)

    monkeypatch.setattr(PartitionPipeline, "stop", watched_stop)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="scoring") as bus:
        await bus.ensure_streams(profiles_stream(), scores_stream())
        engine = ScoringEngine(
            store, FolderModelStore(tmp_path / "models"), bus.publisher, partitions=PARTITIONS, telemetry=bus.telemetry
        )
        await engine.start()
        try:
            await engine.deploy(logistic_model(weights=[0.05, -0.03]), role=None)
            # No interval snapshot: the one found afterwards is the release's.
            stream = scoring_stream(engine, bus, partitions=PARTITIONS, batch_size=1, ack_wait=30, snapshot_every=3600)
            serving = asyncio.create_task(stream.serve(await stream.start()))
            last: dict[int, int] = {}
            for i, person in enumerate(PERSONS):
                p = partition_for(person, PARTITIONS)
                last[p] = (await bus.js.publish(subjects.profiles_changed(p), change(person, i + 1.0))).seq
            assert set(last) == set(range(PARTITIONS))

            async def checkpoints() -> dict[int, int]:
                found = {}
                for p in range(PARTITIONS):
                    record = await store.get(CHECKPOINTS, subjects.profiles_changed(p))
                    found[p] = record.doc.get("stream_seq", 0) if record is not None else 0
                return found

            deadline = time.monotonic() + 30
            while await checkpoints() != last:
                assert time.monotonic() < deadline, "every change applied within 30s"
                await asyncio.sleep(0.05)

            serving.cancel()  # releases every partition at once
            await asyncio.gather(serving, return_exceptions=True)

            assert overlap == PARTITIONS, f"at most {overlap} of {PARTITIONS} partitions drained at a time"
            for p, seq in last.items():
                snapshot = await store.get(SNAPSHOTS, subjects.profiles_changed(p))
                assert snapshot is not None and snapshot.doc["stream_seq"] == seq, p
                # Acknowledged before the stop returned; the server counts acks a moment later.
                info = await settled_consumer(bus.js, subjects.PROFILES, subjects.partition_durable("scoring", p))
                assert info.ack_floor.stream_seq == seq and not info.num_ack_pending
            assert not engine.ready and not engine.fields
            assert {record.key async for record in store.scan_all("scoring_fields")} == set(PERSONS)
        finally:
            await engine.stop()


def test_the_service_exits_after_stopping_a_worker_that_never_read_its_job():
    # In a process of its own: the hang was at interpreter shutdown, after everything else had stopped.
    code = textwrap.dedent(
        """
        import asyncio, contextlib
        from cdp_scoring.worker import Worker

        async def main():
            worker = Worker()

            async def job():
                onnx = b"x" * 2_000_000  # a model's bytes: far more than a pipe holds
                async with contextlib.aclosing(worker.run("quality", store_url="memory://", onnx=onnx)) as run:
                    async for _ in run:
                        pass

            task = asyncio.create_task(job())
            while worker._process is None:  # the job is queued as the process starts
                await asyncio.sleep(0)
            worker.stop()  # the service stopping: the process has not read the job yet
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            print("stopped")

        asyncio.run(main())
        """
    )
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the process did not exit after its worker was stopped") from exc
    assert result.returncode == 0 and "stopped" in result.stdout, result.stderr[-2000:]
