"""How often a dispatcher tries an action whose provider keeps failing, as an on-call engineer relies on it:
exactly CDP_ORCHESTRATION_MAX_ATTEMPTS real attempts with back-off, counted by the dispatcher in the
action's send record (so a restart in between continues the count), then a dead letter naming the reason,
the send record saying so and a metric counting it, and nothing more. A receiver asking for time (429)
uses none of the attempts. A refused outcome report is bounded the same way. Every test talks to a real
local receiver (or collector) over HTTP and a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, OutMessage, dead_letter_stream, partition_for, subjects
from cdp_kit.bus.consumer import DLQ_DETAIL, DLQ_REASON
from cdp_kit.errors import Unavailable
from cdp_kit.settings import SettingsError, load_settings
from cdp_kit.storage import Store, open_store
from cdp_orchestration import streams
from cdp_orchestration.channels import Channel, Outcome
from cdp_orchestration.channels.settings import WebhookSettings
from cdp_orchestration.channels.webhook import WebhookChannel
from cdp_orchestration.dispatch import MAX_ATTEMPTS, SENDS, CollectorReporter, dispatcher
from cdp_orchestration.settings import OrchestrationSettings
from cdp_testing.channels.webhook import LocalWebhookReceiver
from cdp_testing.metrics import MetricsCapture
from cdp_testing.waiting import eventually
from cdpctl.bus import dead_letters as cdpctl_dead_letters

from .conftest import dispatched

SECRET = "a-webhook-secret-of-some-length"
DURABLE = "orchestration-dispatch-webhook"
QUICK = (0.1,)  # the dispatcher's back-off between attempts, shortened for the tests


def webhook() -> WebhookChannel:
    # One request per dispatcher attempt: the channel's own in-process retries are off. The local
    # receiver is on 127.0.0.1, which webhooks reach only when it is listed.
    environ = {
        "CDP_WEBHOOK_SECRET": SECRET,
        "CDP_WEBHOOK_TIMEOUT": "5",
        "CDP_WEBHOOK_MAX_ATTEMPTS": "1",
        "CDP_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    }
    return WebhookChannel(load_settings(WebhookSettings, environ))


@dataclass
class Site:
    bus: Bus
    store: Store
    metrics: MetricsCapture

    async def publish(self, action_id: str, url: str, person_id: str = "person-1") -> None:
        message = pb.ActionMessage(action_id=action_id, person_id=person_id, channel="webhook", content={"body": "hi"})
        message.address.update({"webhook_url": url, "user_id": f"u-{person_id}"})
        subject = subjects.actions("webhook", partition_for(person_id, 4))
        [result] = await self.bus.publisher.publish_batch([OutMessage(subject, message.SerializeToString(), action_id)])
        assert result.ok

    @asynccontextmanager
    async def dispatching(self, channel: Channel, **options) -> AsyncIterator[None]:
        task = asyncio.create_task(dispatcher(self.bus, self.store, channel, **options).run())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close()

    async def dead_letters(self, action_id: str) -> list:
        """The DLQ messages of the webhook dispatcher for this action (their headers hold the reason)."""
        found, seq = [], 1
        while True:
            try:
                msg = await self.bus.js.get_msg(
                    subjects.DLQ, seq, subject=subjects.dead_letter(subjects.ACTIONS, DURABLE), next=True
                )
            except Exception:
                return found
            seq = msg.seq + 1
            if pb.ActionMessage.FromString(msg.data or b"").action_id == action_id:
                found.append(msg)

    async def record(self, action_id: str) -> dict:
        stored = await self.store.get(SENDS, action_id)
        return stored.doc if stored is not None else {}

    def dead_lettered_metric(self) -> dict[tuple[str, str], int]:
        _, points = self.metrics.collected().get("cdp.orchestration.dispatch.dead_lettered", ("", []))
        return {(p.attributes["channel"], p.attributes["reason"]): p.value for p in points}


@pytest.fixture
async def site(nats_server, tmp_path) -> AsyncIterator[Site]:
    metrics = MetricsCapture("orchestration")
    async with (
        Bus.connect(nats_server.url, name="dispatch-attempts", telemetry=metrics.telemetry) as bus,
        open_store(f"sqlite:///{tmp_path}/d.db") as store,
    ):
        await streams.ensure_streams(bus.js)
        await bus.ensure_streams(dead_letter_stream())
        yield Site(bus, store, metrics)


async def test_a_receiver_answering_500_gets_exactly_max_attempts_then_a_dead_letter_naming_the_reason(
    site, nats_server
):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(1_000, status=500)
        await site.publish("act-500", receiver.url())
        async with site.dispatching(webhook(), backoff=QUICK):
            [letter] = await eventually(lambda: site.dead_letters("act-500"), timeout=20)
            await eventually(lambda: dispatched(site.bus, "webhook"))  # nothing more is coming
            assert receiver.attempts == MAX_ATTEMPTS == 5  # the old figure, now counted by the dispatcher
            assert len(await site.dead_letters("act-500")) == 1
        assert letter.headers[DLQ_REASON] == "http_500"
        assert "5 attempts" in letter.headers[DLQ_DETAIL]
        # The action's own record says what became of it, and a metric counts it.
        record = await site.record("act-500")
        assert (record["status"], record["reason"], record["attempts"], record["dead_lettered"]) == (
            "failed",
            "http_500",
            5,
            True,
        )
        assert site.dead_lettered_metric() == {("webhook", "http_500"): 1}

        # Fixed, the dead letter is replayed (`cdpctl dlq ACTIONS ... --replay`): the action goes out once.
        receiver._failures.clear()
        await cdpctl_dead_letters(
            nats_server.url, subjects.dead_letter(subjects.ACTIONS, DURABLE), limit=10, replay=True
        )
        async with site.dispatching(webhook(), backoff=QUICK):
            await eventually(lambda: receiver.deliveries, timeout=10)
            record = await eventually(lambda: _final(site, "act-500", "accepted"), timeout=10)
            await eventually(lambda: dispatched(site.bus, "webhook"))  # nothing more is coming
        assert [d.headers["Idempotency-Key"] for d in receiver.deliveries] == ["act-500"]
        assert receiver.attempts == 6 and record["attempts"] == 1


async def test_the_bound_is_the_setting_and_a_channel_that_raises_uses_attempts_like_a_failure(site):
    class Broken(Channel):
        name = "webhook"

        def __init__(self) -> None:
            self.calls = 0

        async def send(self, action) -> Outcome:
            self.calls += 1
            raise RuntimeError("a fault in the adapter")

    channel = Broken()
    await site.publish("act-raises", "https://hooks.example/x")
    async with site.dispatching(channel, max_attempts=3, backoff=QUICK):
        [letter] = await eventually(lambda: site.dead_letters("act-raises"), timeout=20)
        await eventually(lambda: dispatched(site.bus, "webhook"))
    assert channel.calls == 3
    assert letter.headers[DLQ_REASON] == "error_RuntimeError"
    assert (await site.record("act-raises"))["status"] == "failed"


async def test_a_receiver_saying_later_many_times_then_taking_it_gets_it_once_using_no_attempts(site):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        # Eight 429s (more than the attempts), one 500 (an attempt), then it takes the action.
        receiver.fail_next(8, status=429)
        receiver.fail_next(1, status=500)
        await site.publish("act-429", receiver.url())
        async with site.dispatching(webhook(), max_attempts=2, backoff=QUICK):
            record = await eventually(lambda: _final(site, "act-429", "accepted"), timeout=20)
            await eventually(lambda: dispatched(site.bus, "webhook"))  # nothing more is coming
        assert [d.headers["Idempotency-Key"] for d in receiver.deliveries] == ["act-429"]  # delivered once
        assert receiver.attempts == 10
        assert (record["attempts"], record["deferrals"]) == (2, 8)  # the 500 and the 200; the 429s used none
        assert await site.dead_letters("act-429") == []


async def test_a_restart_between_attempts_continues_the_count(site):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(1_000, status=500)
        await site.publish("act-restart", receiver.url())
        # The second attempt soon after the first, then ten seconds (the server's redelivery delay of the
        # NAK) before a third: the stop comes between the second and the third unless the machine stalls
        # that long. A delivery cut short by the stop comes back after two.
        async with site.dispatching(webhook(), max_attempts=4, backoff=(0.1, 10.0), ack_wait=2.0):
            await eventually(lambda: receiver.attempts == 2, timeout=30)
            record = await eventually(lambda: _with(site, "act-restart", attempts=2), timeout=30)
            await asyncio.sleep(0.3)
        assert record["status"] == "pending"
        assert receiver.attempts == 2  # stopped between attempts: the next one is the new process's
        # A new process: a new dispatcher and channel over the same store and consumer.
        async with site.dispatching(webhook(), max_attempts=4, backoff=QUICK, ack_wait=2.0):
            [letter] = await eventually(lambda: site.dead_letters("act-restart"), timeout=60)
            await eventually(lambda: dispatched(site.bus, "webhook"))  # nothing more is coming
        assert receiver.attempts == 4
        assert letter.headers[DLQ_REASON] == "http_500"


async def test_a_dispatcher_dying_during_an_attempt_has_used_it(site):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        receiver.fail_next(1_000, status=500)
        await site.publish("act-crash", receiver.url())
        async with site.dispatching(webhook(), max_attempts=4, backoff=(0.5,), ack_wait=2.0):
            await eventually(lambda: receiver.attempts == 1, timeout=10)
            receiver.stall_next(1, seconds=3.0)  # the second attempt hangs at the receiver...
            await eventually(lambda: receiver.attempts == 2, timeout=10)
        # ...and the process dies while it does: the receiver may have acted on it, so it counts.
        async with site.dispatching(webhook(), max_attempts=4, backoff=QUICK, ack_wait=2.0):
            [letter] = await eventually(lambda: site.dead_letters("act-crash"), timeout=20)
            await eventually(lambda: dispatched(site.bus, "webhook"))  # nothing more is coming
        assert receiver.attempts == 4
        assert letter.headers[DLQ_REASON] == "http_500"


async def test_a_collector_refusing_the_outcome_is_asked_max_attempts_times_then_the_message_is_dead_lettered(site):
    posts: list[int] = []

    async def refuse(request: web.Request) -> web.Response:
        posts.append(len((await request.json())["batch"]))
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/v1/batch", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    collector = web.TCPSite(runner, "127.0.0.1", 0)
    await collector.start()
    report = CollectorReporter(f"http://127.0.0.1:{collector._server.sockets[0].getsockname()[1]}", "key")  # type: ignore[union-attr]
    try:
        async with LocalWebhookReceiver(secret=SECRET) as receiver:
            await site.publish("act-unreported", receiver.url())
            async with site.dispatching(webhook(), report=report, max_attempts=3, backoff=QUICK):
                [letter] = await eventually(lambda: site.dead_letters("act-unreported"), timeout=20)
                await eventually(lambda: dispatched(site.bus, "webhook"))  # nothing more is coming
            assert len(receiver.deliveries) == 1  # sent once: only the report was retried
    finally:
        await report.close()
        await runner.cleanup()
    assert posts == [1, 1, 1]
    assert letter.headers[DLQ_REASON] == "outcome_not_reported"
    record = await site.record("act-unreported")
    assert (record["status"], record["reported"]) == ("accepted", False)  # a replay posts it


def fault_on(
    store: Store,
    action_id: str,
    error: Callable[[], Exception],
    *,
    times: int = 1_000_000,
    reads: bool = True,
    writes: Callable[[dict], bool] = lambda doc: True,
) -> list[str]:
    """The store fails on this action's send record (`*`: every one) `times` times: on reads, and on the
    writes whose document `writes` picks (a value the store refuses); the calls that failed."""
    failed: list[str] = []
    get, bulk_write = store.get, store.bulk_write

    def fails(collection: str, key: str) -> bool:
        if collection == SENDS and action_id in (key, "*") and len(failed) < times:
            failed.append(key)
            return True
        return False

    async def faulty_get(collection, key):
        if reads and fails(collection, key):
            raise error()
        return await get(collection, key)

    async def faulty_bulk_write(ops):
        ops = list(ops)
        if any(fails(op.collection, op.key) for op in ops if writes(op.doc)):
            raise error()
        return await bulk_write(ops)

    store.get, store.bulk_write = faulty_get, faulty_bulk_write  # type: ignore[method-assign]
    return failed


async def test_a_store_fault_on_one_actions_record_costs_its_attempts_not_the_batch(site):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        # One batch: the faulty action, the same person's next one, another person's.
        await site.publish("act-bad", receiver.url(), person_id="person-1")
        await site.publish("act-next", receiver.url(), person_id="person-1")
        await site.publish("act-other", receiver.url(), person_id="person-2")
        failed = fault_on(site.store, "act-bad", lambda: RuntimeError("a record the store cannot read"))
        async with site.dispatching(webhook(), max_attempts=3, backoff=QUICK):
            for action_id in ("act-next", "act-other"):
                await eventually(lambda action_id=action_id: _final(site, action_id, "accepted"), timeout=10)
            [letter] = await eventually(lambda: site.dead_letters("act-bad"), timeout=10)
            await eventually(lambda: dispatched(site.bus, "webhook"))  # nothing more is coming
    assert letter.headers[DLQ_REASON] == "store_fault"
    assert "3 attempts" in letter.headers[DLQ_DETAIL] and "RuntimeError" in letter.headers[DLQ_DETAIL]
    assert failed == ["act-bad"] * 3  # one read per attempt, and no more once dead-lettered
    assert sorted(d.headers["Idempotency-Key"] for d in receiver.deliveries) == ["act-next", "act-other"]
    assert site.dead_lettered_metric() == {("webhook", "store_fault"): 1}


async def test_an_action_sent_whose_outcome_the_store_cannot_record_is_not_sent_again(site):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        await site.publish("act-sent", receiver.url())
        outcome = lambda doc: doc["status"] != "pending"  # noqa: E731
        fault_on(site.store, "act-sent", lambda: RuntimeError("a value the store refuses"), reads=False, writes=outcome)
        async with site.dispatching(webhook(), max_attempts=3, backoff=QUICK):
            [letter] = await eventually(lambda: site.dead_letters("act-sent"), timeout=10)
            await eventually(lambda: dispatched(site.bus, "webhook"))
    assert receiver.attempts == 1  # sent once, not once per attempt
    assert letter.headers[DLQ_REASON] == "store_fault"
    assert "sent (accepted) but not recorded" in letter.headers[DLQ_DETAIL]


async def test_a_store_failing_to_mark_one_outcome_reported_holds_nothing(site):
    posts: list[list[str]] = []

    async def report(events: list[dict]) -> bool:
        posts.append(sorted(event["properties"]["action_id"] for event in events))
        return True

    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        await site.publish("act-unmarked", receiver.url(), person_id="person-1")
        await site.publish("act-marked", receiver.url(), person_id="person-2")
        reported = lambda doc: doc.get("reported") is True  # noqa: E731
        fault_on(
            site.store, "act-unmarked", lambda: RuntimeError("a value the store refuses"), reads=False, writes=reported
        )
        async with site.dispatching(webhook(), backoff=QUICK, report=report):
            await eventually(lambda: _with(site, "act-marked", reported=True), timeout=10)
            # A batch handed back would be delivered again: the consumer holds nothing once it is all settled.
            await eventually(lambda: dispatched(site.bus, "webhook"))
    assert posts == [["act-marked", "act-unmarked"]]  # posted once, together
    assert receiver.attempts == 2
    assert (await site.record("act-unmarked"))["reported"] is False
    assert await site.dead_letters("act-unmarked") == []


async def test_a_store_down_for_a_whole_batch_costs_no_attempts(site):
    async with LocalWebhookReceiver(secret=SECRET) as receiver:
        await site.publish("act-outage", receiver.url())
        failed = fault_on(site.store, "*", lambda: Unavailable("sqlite store: disk full"), times=2)
        # Two attempts: charged one per fault, the action would be dead-lettered by the outage.
        async with site.dispatching(webhook(), max_attempts=2, backoff=QUICK):
            await eventually(lambda: len(failed) == 2, timeout=10)  # (the test's own reads come after)
            record = await eventually(lambda: _final(site, "act-outage", "accepted"), timeout=15)
        # Handed back whole twice - the kit retries an outage (Unavailable) in place, on the same delivery -
        # then sent once: one attempt, the one that reached the receiver.
        assert len(failed) == 2 and len(receiver.deliveries) == 1 and record["attempts"] == 1
    assert await site.dead_letters("act-outage") == []


async def _final(site: Site, action_id: str, status: str) -> dict | None:
    record = await site.record(action_id)
    return record if record.get("status") == status else None


async def _with(site: Site, action_id: str, **fields) -> dict | None:
    record = await site.record(action_id)
    return record if all(record.get(k) == v for k, v in fields.items()) else None


def test_max_attempts_is_a_setting_refused_at_start_when_it_cannot_bound_anything():
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}
    assert load_settings(OrchestrationSettings, environ).max_attempts == MAX_ATTEMPTS
    assert load_settings(OrchestrationSettings, {**environ, "CDP_ORCHESTRATION_MAX_ATTEMPTS": "8"}).max_attempts == 8
    for bad in ("0", "1000"):
        with pytest.raises(SettingsError) as refused:
            load_settings(OrchestrationSettings, {**environ, "CDP_ORCHESTRATION_MAX_ATTEMPTS": bad})
        [problem] = [p for p in refused.value.problems if "MAX_ATTEMPTS" in p]
        assert problem.startswith(f"CDP_ORCHESTRATION_MAX_ATTEMPTS={bad} is invalid")
