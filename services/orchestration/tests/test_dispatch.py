"""Channel dispatchers: each action reaches its channel once, however often its message is delivered."""

from __future__ import annotations

import asyncio

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, OutMessage, subjects
from cdp_kit.storage import open_store
from cdp_orchestration import streams
from cdp_orchestration.channels import Channel, Outcome
from cdp_orchestration.dispatch import SENDS, dispatcher


class Counting(Channel):
    name = "webhook"

    def __init__(self, failures: int = 0) -> None:
        self.sent: list[str] = []
        self.failures = failures

    async def send(self, action) -> Outcome:
        if self.failures:
            self.failures -= 1
            return Outcome.failed("provider_unavailable", retryable=True, retry_after=0.1)
        self.sent.append(action.action_id)
        return Outcome.accepted(provider_id=f"p-{action.action_id}")


async def test_an_action_delivered_twice_is_sent_once_and_a_retryable_failure_is_retried(nats_server, tmp_path):
    async with (
        Bus.connect(nats_server.url, name="dispatch-test") as bus,
        open_store(f"sqlite:///{tmp_path}/d.db") as store,
    ):
        await streams.ensure_streams(bus.js)
        channel = Counting(failures=1)
        runner = dispatcher(bus, store, channel)
        task = asyncio.create_task(runner.run())
        message = pb.ActionMessage(
            action_id="a1",
            person_id="p1",
            channel="webhook",
            content={"body": "hi"},
            address={"webhook_url": "https://h"},
        )
        # The same action twice, as two messages (a re-publication after the duplicate window).
        for msg_id in ("a1", "a1-again"):
            [result] = await bus.publisher.publish_batch(
                [OutMessage(subjects.actions("webhook", 0), message.SerializeToString(), msg_id)]
            )
            assert result.ok
        for _ in range(200):
            if channel.sent and await store.get(SENDS, "a1") is not None:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert channel.sent == ["a1"]
        record = (await store.get(SENDS, "a1")).doc
        assert record["status"] == "accepted" and record["provider_id"] == "p-a1"
