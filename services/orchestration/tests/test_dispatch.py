"""Channel dispatchers: each action reaches its channel once, however often its message is delivered, and its
outcome goes back to the collector as an event (once it is accepted there)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, OutMessage, partition_for, subjects
from cdp_kit.settings import SettingsError, load_settings
from cdp_kit.storage import open_store
from cdp_orchestration import streams
from cdp_orchestration.channels import Channel, Outcome
from cdp_orchestration.channels.settings import WebhookSettings
from cdp_orchestration.channels.webhook import WebhookChannel
from cdp_orchestration.dispatch import MAX_ATTEMPTS, PENDING, SENDS, CollectorReporter, Opens, dispatcher
from cdp_orchestration.settings import OrchestrationSettings
from cdp_orchestration.state import prepare_store
from cdp_testing.waiting import eventually

from .conftest import dispatched


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


async def _outcome(store, action_id: str) -> dict | None:
    """The action's send record once it holds an outcome (while its attempts go on it is "pending")."""
    stored = await store.get(SENDS, action_id)
    return stored.doc if stored is not None and stored.doc["status"] != PENDING else None


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
            if channel.sent and await _outcome(store, "a1") is not None:
                break
            await asyncio.sleep(0.05)
        await eventually(lambda: dispatched(bus, "webhook"))  # the second message worked through too
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert channel.sent == ["a1"]
        record = (await store.get(SENDS, "a1")).doc
        assert record["status"] == "accepted" and record["provider_id"] == "p-a1"


async def test_the_outcome_goes_to_the_collector_and_a_refused_report_is_retried_without_sending_again(
    nats_server, tmp_path, aiohttp_unused_port=None
):
    received: list[dict] = []
    answers = [503, 200]  # the collector refuses the first post

    async def batch(request: web.Request) -> web.Response:
        assert request.headers["Authorization"].startswith("Basic ")
        received.append(await request.json())
        return web.json_response({}, status=answers.pop(0) if answers else 200)

    app = web.Application()
    app.router.add_post("/v1/batch", batch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    report = CollectorReporter(f"http://127.0.0.1:{port}", "outcomes-key")
    try:
        async with (
            Bus.connect(nats_server.url, name="dispatch-test") as bus,
            open_store(f"sqlite:///{tmp_path}/d.db") as store,
        ):
            await streams.ensure_streams(bus.js)
            channel = Counting()
            task = asyncio.create_task(dispatcher(bus, store, channel, report=report).run())
            message = pb.ActionMessage(
                action_id="a2",
                person_id="p2",
                journey_id="j",
                channel="webhook",
                content={"body": "hi"},
                address={"user_id": "u2"},
            )
            [result] = await bus.publisher.publish_batch(
                [OutMessage(subjects.actions("webhook", 1), message.SerializeToString(), "a2")]
            )
            assert result.ok
            for _ in range(200):
                stored = await store.get(SENDS, "a2")
                if stored is not None and stored.doc["reported"]:
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await report.close()
        await runner.cleanup()
    assert channel.sent == ["a2"]  # sent once, reported twice (the first report refused)
    assert len(received) == 2
    [event] = received[-1]["batch"]
    assert event["event"] == "Message Sent" and event["messageId"] == "outcome:a2:sent"
    assert event["properties"]["action_id"] == "a2" and event["properties"]["journey_id"] == "j"
    # Sent under the person's userId, which identity resolves to them; never under the person id.
    assert event["userId"] == "u2" and "anonymousId" not in event


async def _collector() -> tuple[web.AppRunner, str, list[dict]]:
    received: list[dict] = []

    async def batch(request: web.Request) -> web.Response:
        received.extend((await request.json())["batch"])
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/batch", batch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", received


async def test_outcomes_go_in_under_an_identifier_identity_knows_and_never_under_the_person_id(nats_server, tmp_path):
    runner, url, received = await _collector()
    report = CollectorReporter(url, "outcomes-key")
    messages = {
        "with-user": {"user_id": "ada", "anonymous_id": "visitor-7"},
        "anonymous": {"anonymous_id": "visitor-9"},
        "nobody": {},  # a person no event has named yet (enrolled through the API)
    }
    try:
        async with (
            Bus.connect(nats_server.url, name="dispatch-test") as bus,
            open_store(f"sqlite:///{tmp_path}/d.db") as store,
        ):
            await streams.ensure_streams(bus.js)
            channel = Counting()
            task = asyncio.create_task(dispatcher(bus, store, channel, report=report).run())
            for action_id, ids in messages.items():
                message = pb.ActionMessage(
                    action_id=action_id, person_id=f"person-{action_id}", channel="webhook", content={"body": "hi"}
                )
                message.address.update(ids)
                [result] = await bus.publisher.publish_batch(
                    [OutMessage(subjects.actions("webhook", 0), message.SerializeToString(), action_id)]
                )
                assert result.ok
            for _ in range(200):
                records = [await store.get(SENDS, a) for a in messages]
                if all(r is not None and r.doc["reported"] for r in records):
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await report.close()
        await runner.cleanup()
    assert sorted(channel.sent) == sorted(messages)  # every action was sent
    by_action = {e["properties"]["action_id"]: e for e in received}
    assert set(by_action) == {"with-user", "anonymous"}
    assert by_action["with-user"]["userId"] == "ada" and "anonymousId" not in by_action["with-user"]
    assert by_action["anonymous"]["anonymousId"] == "visitor-9" and "userId" not in by_action["anonymous"]
    # With neither, the outcome stays here: posting it under the person id would make a new person.
    assert records[2].doc["reported"] == "unattributed" and records[2].doc["status"] == "accepted"


WELCOME = {
    "id": "welcome",
    "version": 1,
    "name": "Welcome",
    "priority": 10,
    "timezone": "UTC",
    "entry": {"api": True},
    "reentry": "always",
    "nodes": [{"id": "hook", "type": "action", "channel": "webhook", "purpose": "Service", "template": {"body": "hi"}}],
}


async def test_an_outcome_recorded_before_the_person_had_an_identifier_goes_in_once_they_have_one(world_factory):
    collector, url, received = await _collector()
    report = CollectorReporter(url, "outcomes-key")
    world = await world_factory()
    await prepare_store(world.store)
    await world.publish_journey(WELCOME)
    await world.start()
    channel = Counting()
    task = asyncio.create_task(dispatcher(world.bus, world.store, channel, report=report).run())
    try:
        # Enrolled through the API before any event of theirs: the send has no identifier to go in under.
        await world.profile("newcomer", consent={"purpose:Service": True}, webhook_url="https://h")
        body = {"person_id": "newcomer", "journey_id": "welcome", "idempotency_key": "k1"}
        [result] = await world.bus.publisher.publish_batch(
            [streams.command(world.partition("newcomer"), "enroll", body, "enroll-k1")]
        )
        assert result.ok
        [action_id] = await world.eventually(lambda: channel.sent)
        record = await world.eventually(lambda: world.store.get(SENDS, action_id))
        assert record.doc["reported"] == "unattributed" and received == []
        # They open a message too (as MarkInboxRead records it): recorded, not posted either.
        await Opens(world.store, report).opened("newcomer", ["inbox-1"])
        assert received == []
        # Their first event names them: the outcome goes in under that userId, and nothing is sent again.
        await world.event("newcomer", "Page Viewed", "e-page-1", user_id="u-newcomer")
        await world.eventually(lambda: len(received) == 2)
        await world.eventually(lambda: _reported(world, action_id))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await report.close()
        await collector.cleanup()
    by_id = {event["messageId"]: event for event in received}
    assert set(by_id) == {f"outcome:{action_id}:sent", "outcome:inbox-1:opened"}
    assert all(event["userId"] == "u-newcomer" for event in received)
    assert channel.sent == [action_id]


async def _reported(world, action_id: str) -> bool:
    stored = await world.store.get(SENDS, action_id)
    return stored is not None and stored.doc["reported"] is True


class Receiver:
    """A local webhook receiver on a free port: POST /hook goes to the subclass's `_receive`."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_post("/hook", self._receive)
        self.runner = web.AppRunner(self.app)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]

    async def _receive(self, request: web.Request) -> web.Response:
        raise NotImplementedError


class SlowProvider(Receiver):
    """A webhook receiver that takes `delay` seconds per request and records when each request for each
    action started and ended, and the most requests it ever had in flight at once. `throttle_first`
    answers the first request 429 with that Retry-After (seconds)."""

    def __init__(self, delay: float, *, throttle_first: float | None = None) -> None:
        self.delay = delay
        self.throttle_first = throttle_first
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[tuple[str, float, float, int]] = []  # action id, started, ended, status
        super().__init__()

    async def _receive(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        status = 200
        if self.throttle_first is not None:
            status, retry_after, self.throttle_first = 429, self.throttle_first, None
            self.requests.append((request.headers["Idempotency-Key"], started, time.monotonic(), status))
            return web.Response(status=429, headers={"Retry-After": str(int(retry_after))})
        self.requests.append((request.headers["Idempotency-Key"], started, time.monotonic(), status))
        return web.Response(status=status)

    def sent(self) -> list[str]:
        return [action_id for action_id, _, _, status in self.requests if status == 200]


def webhook_channel(**more: str) -> WebhookChannel:
    environ = {
        "CDP_WEBHOOK_SECRET": "a-webhook-secret-of-some-length",
        "CDP_WEBHOOK_TIMEOUT": "5",
        "CDP_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",  # the local receivers; a private host must be listed
        **more,
    }
    return WebhookChannel(load_settings(WebhookSettings, environ))


async def _publish_actions(bus: Bus, url: str, actions: list[tuple[str, str]]) -> None:
    messages = []
    for action_id, person_id in actions:
        message = pb.ActionMessage(action_id=action_id, person_id=person_id, channel="webhook", content={"body": "hi"})
        message.address.update({"webhook_url": url, "user_id": f"u-{person_id}"})
        partition = partition_for(person_id, 4)
        messages.append(OutMessage(subjects.actions("webhook", partition), message.SerializeToString(), action_id))
    results = await bus.publisher.publish_batch(messages)
    assert all(result.ok for result in results)


async def test_a_batch_goes_to_a_slow_provider_concurrently_each_action_once_in_order_per_person(nats_server, tmp_path):
    provider = SlowProvider(delay=0.3)
    url = await provider.start()
    collector, collector_url, received = await _collector()
    posts: list[int] = []
    reporter = CollectorReporter(collector_url, "outcomes-key")

    async def report(events: list[dict]) -> bool:
        posts.append(len(events))
        return await reporter(events)

    # Eight people with one action each, and one of them with a second action the journey sent later.
    actions = [(f"act-{n}", f"person-{n}") for n in range(8)] + [("act-0-later", "person-0")]
    channel = webhook_channel()
    try:
        async with (
            Bus.connect(nats_server.url, name="dispatch-test") as bus,
            open_store(f"sqlite:///{tmp_path}/d.db") as store,
        ):
            await streams.ensure_streams(bus.js)
            await _publish_actions(bus, url, actions)  # all waiting before the dispatcher fetches
            task = asyncio.create_task(dispatcher(bus, store, channel, report=report).run())
            for _ in range(200):
                records = [await store.get(SENDS, action_id) for action_id, _ in actions]
                if all(r is not None and r.doc["reported"] is True for r in records):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a redelivery would send again now
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await channel.close()
        await reporter.close()
        await collector.cleanup()
        await provider.runner.cleanup()
    # The provider saw the batch's requests at the same time, not one after another.
    assert provider.max_in_flight > 1
    assert sorted(provider.sent()) == sorted(action_id for action_id, _ in actions)  # each once
    # One person's actions still go out in the order the journey made them: the later one waits.
    timings = {action_id: (started, ended) for action_id, started, ended, _ in provider.requests}
    assert timings["act-0-later"][0] >= timings["act-0"][1]
    # Every outcome went in, in fewer collector calls than actions.
    assert sorted(e["properties"]["action_id"] for e in received) == sorted(a for a, _ in actions)
    assert len(posts) < len(actions)


async def test_a_provider_asking_to_wait_holds_the_actions_not_yet_sent(nats_server, tmp_path):
    provider = SlowProvider(delay=0.2, throttle_first=2)
    url = await provider.start()
    actions = [(f"act-{n}", f"person-{n}") for n in range(6)]
    # Two at a time; a Retry-After above the channel's own backoff cap comes back to the dispatcher.
    channel = webhook_channel(CDP_WEBHOOK_BACKOFF_MAX="0.5")
    try:
        async with (
            Bus.connect(nats_server.url, name="dispatch-test") as bus,
            open_store(f"sqlite:///{tmp_path}/d.db") as store,
        ):
            await streams.ensure_streams(bus.js)
            await _publish_actions(bus, url, actions)
            task = asyncio.create_task(dispatcher(bus, store, channel, concurrency=2).run())
            for _ in range(200):
                records = [await store.get(SENDS, action_id) for action_id, _ in actions]
                if all(r is not None and r.doc["status"] != PENDING for r in records):
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await channel.close()
        await provider.runner.cleanup()
    assert sorted(provider.sent()) == sorted(action_id for action_id, _ in actions)  # each once, in the end
    assert all(r.doc["status"] == "accepted" for r in records)
    [(_, _, throttled_at, _)] = [r for r in provider.requests if r[3] == 429]
    # Nothing started while the provider asked for quiet (what was already in flight could still finish).
    later = [started for _, started, _, _ in provider.requests if started > throttled_at]
    assert later and min(later) >= throttled_at + 2 - 0.1


class Throttling(Receiver):
    """A webhook receiver that answers 429 with Retry-After to its first `throttles` requests, then 200."""

    def __init__(self, throttles: int, retry_after: int = 1) -> None:
        self.throttles = throttles
        self.retry_after = retry_after
        self.statuses: list[int] = []
        super().__init__()

    async def _receive(self, request: web.Request) -> web.Response:
        if self.throttles:
            self.throttles -= 1
            self.statuses.append(429)
            return web.Response(status=429, headers={"Retry-After": str(self.retry_after)})
        self.statuses.append(200)
        return web.Response(status=200)


async def _dispatch_until_recorded(nats_server, tmp_path, receiver: Throttling, **options) -> dict:
    url = await receiver.start()
    # One attempt in process: every 429 (Retry-After 1 s, above the 0.5 s cap) goes back to the dispatcher.
    channel = webhook_channel(CDP_WEBHOOK_BACKOFF_MAX="0.5", CDP_WEBHOOK_MAX_ATTEMPTS="1")
    try:
        async with (
            Bus.connect(nats_server.url, name="dispatch-test") as bus,
            open_store(f"sqlite:///{tmp_path}/d.db") as store,
        ):
            await streams.ensure_streams(bus.js)
            await _publish_actions(bus, url, [("act-1", "person-1")])
            task = asyncio.create_task(dispatcher(bus, store, channel, **options).run())
            try:
                for _ in range(400):
                    record = await _outcome(store, "act-1")
                    if record is not None:
                        return record
                    await asyncio.sleep(0.05)
                raise AssertionError(f"no outcome recorded; the receiver answered {receiver.statuses}")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await channel.close()
        await receiver.runner.cleanup()


async def test_a_receiver_saying_later_more_often_than_an_action_has_deliveries_still_gets_it(nats_server, tmp_path):
    # Six 429s, more than the five deliveries an action may use on failures: a 429 is the receiver asking
    # for time, not a failed send, so each hand-back waits without using one of them.
    receiver = Throttling(throttles=MAX_ATTEMPTS + 1)
    record = await _dispatch_until_recorded(nats_server, tmp_path, receiver)
    assert record["status"] == "accepted"
    assert receiver.statuses == [429] * (MAX_ATTEMPTS + 1) + [200]


async def test_a_receiver_saying_later_for_longer_than_the_bound_gets_the_action_failed(nats_server, tmp_path):
    receiver = Throttling(throttles=1_000)
    record = await _dispatch_until_recorded(nats_server, tmp_path, receiver, defer_for=2.5)
    assert (record["status"], record["reason"]) == ("failed", "http_429")
    assert 2 <= len(receiver.statuses) <= 4  # asked again about once a second until the bound, then given up


def test_a_wait_bound_the_actions_stream_would_outlast_is_refused_at_start_naming_the_setting():
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}
    assert load_settings(OrchestrationSettings, environ).defer_seconds == 86_400
    with pytest.raises(SettingsError) as refused:
        load_settings(OrchestrationSettings, {**environ, "CDP_ORCHESTRATION_DEFER_SECONDS": str(8 * 86_400)})
    [problem] = [p for p in refused.value.problems if "DEFER" in p]
    assert problem.startswith("CDP_ORCHESTRATION_DEFER_SECONDS=") and "CDP_ORCHESTRATION_RETENTION_DAYS" in problem
