"""Durable consumers on a real JetStream: ack after the effect, retries, dead letters, crashes."""

import asyncio

import pytest
from nats.js import api

from cdp_kit.bus import Bus, ConsumerSpec, OutMessage, dead_letter_stream, events_raw_stream
from cdp_kit.bus import consumer as consumer_module
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_testing.metrics import MetricsCapture
from cdp_testing.streams import next_dead_letters, settled_consumer


@pytest.fixture
async def bus(nats_server):
    async with Bus.connect(nats_server.url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        yield bus


def spec(**overrides):
    base = dict(stream="EVENTS_RAW", durable="t", filter_subjects=("events.raw.>",), backoff=(0.05,), fetch_timeout=0.2)
    base.update(overrides)
    return ConsumerSpec(**base)


async def publish(bus, n, subject="events.raw.0"):
    await bus.publisher.publish_batch([OutMessage(subject, str(i).encode(), f"id-{i}") for i in range(n)])


async def until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def dead_letters(bus, expected):
    return await next_dead_letters(bus.js, expected)


async def run(runner):
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.wait_ready(), 5)
    return task


async def stop(task):
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)


async def test_handles_every_message_in_order_and_acks(bus):
    seen = []

    async def handle(batch):
        seen.extend(int(d.data) for d in batch)

    task = await run(bus.consumer(spec(batch_size=64), handle))
    await publish(bus, 500)
    await until(lambda: len(seen) == 500)
    assert seen == list(range(500))
    await stop(task)
    info = await settled_consumer(bus.js, "EVENTS_RAW", "t")  # the server may count the last acks a moment later
    settled = (info.ack_floor.stream_seq, info.num_ack_pending, info.num_pending)
    assert settled == (500, 0, 0), f"consumer after the stop (ack floor, unacknowledged, undelivered): {settled}"


async def test_a_failing_handler_is_retried_then_dead_lettered_with_the_reason(bus):
    attempts = []

    async def handle(batch):
        attempts.append([d.num_delivered for d in batch])
        raise RuntimeError("store is read-only for ada@example.com")

    runner = bus.consumer(spec(max_deliver=3), handle)
    task = await run(runner)
    await publish(bus, 1)
    letters = await dead_letters(bus, 1)
    await stop(task)
    assert [a[0] for a in attempts] == [1, 2, 3]
    headers = letters[0].headers
    assert letters[0].data == b"0"
    assert headers[consumer_module.DLQ_REASON] == "handler_error"
    # The failure's type and where it was raised, never its text: it quotes what the code had in hand
    # (here an e-mail address), and every operator reads the detail (`cdpctl dlq`).
    detail = headers[consumer_module.DLQ_DETAIL]
    assert detail.startswith("RuntimeError at test_consumer.py:") and detail.endswith(" in handle")
    assert "ada@example.com" not in detail and "read-only" not in detail
    assert headers[consumer_module.DLQ_SUBJECT] == "events.raw.0"
    assert headers[consumer_module.DLQ_SEQ] == "1" and headers[consumer_module.DLQ_DELIVERIES] == "3"
    assert headers[consumer_module.DLQ_CONSUMER] == "t"


async def test_rejected_messages_go_straight_to_dead_letters_others_are_acked(bus):
    good = []

    async def handle(batch):
        for d in batch:
            if int(d.data) % 10 == 0:
                d.reject("invalid_event", f"event {int(d.data)} has no person")
            else:
                good.append(int(d.data))

    runner = bus.consumer(spec(), handle)
    task = await run(runner)
    await publish(bus, 50)
    letters = await dead_letters(bus, 5)
    await until(lambda: len(good) == 45)
    await stop(task)
    assert sorted(int(m.data) for m in letters) == [0, 10, 20, 30, 40]
    assert {m.headers[consumer_module.DLQ_REASON] for m in letters} == {"invalid_event"}
    assert all(m.headers[consumer_module.DLQ_DELIVERIES] == "1" for m in letters)


async def test_retry_outcome_redelivers_only_that_message(bus):
    deliveries: dict[int, int] = {}

    async def handle(batch):
        for d in batch:
            n = int(d.data)
            deliveries[n] = d.num_delivered
            if n == 3 and d.num_delivered < 2:
                d.retry("profile not loaded yet", delay=0.05)

    task = await run(bus.consumer(spec(), handle))
    await publish(bus, 5)
    await until(lambda: deliveries.get(3) == 2)
    await stop(task)
    assert deliveries == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1}


async def test_a_consumer_killed_mid_batch_loses_nothing(bus):
    """Nothing is acknowledged before the handler returns: a crash mid-batch means redelivery."""
    stuck = asyncio.Event()

    async def never_finishes(batch):
        stuck.set()
        await asyncio.Event().wait()

    task = await run(bus.consumer(spec(ack_wait=1.0), never_finishes))
    await publish(bus, 20)
    await asyncio.wait_for(stuck.wait(), 5)
    await stop(task)  # the process "dies" holding 20 unacknowledged messages

    seen = set()

    async def handle(batch):
        seen.update(int(d.data) for d in batch)

    task = await run(bus.consumer(spec(ack_wait=1.0), handle))
    await until(lambda: len(seen) == 20)
    await stop(task)
    assert seen == set(range(20))


async def test_handler_sees_the_producers_trace(bus):
    traces = []

    async def handle(batch):
        from opentelemetry import trace

        traces.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))

    task = await run(bus.consumer(spec(), handle))
    with bus.telemetry.tracer.start_as_current_span("produce") as span:
        await publish(bus, 1)
        produced = format(span.get_span_context().trace_id, "032x")
    await until(lambda: traces)
    await stop(task)
    assert traces == [produced]


async def test_consumer_survives_a_nats_restart(nats_server, bus):
    seen = set()

    async def handle(batch):
        seen.update(int(d.data) for d in batch)

    task = await run(bus.consumer(spec(), handle))
    await publish(bus, 10)
    await until(lambda: len(seen) == 10)
    nats_server.restart()
    await until(lambda: bus.connected, timeout=15)
    # As any producer would: retry until JetStream acknowledges (the first try may land while the
    # server is still recovering its streams and be reported as failed, never as stored).
    for _ in range(20):
        (result,) = await bus.publisher.publish_batch([OutMessage("events.raw.0", b"10", "id-10")])
        if result.ok:
            break
    assert result.ok
    await until(lambda: 10 in seen, timeout=15)
    await stop(task)


async def test_an_ordered_consumer_retries_a_failing_batch_before_anything_newer(bus):
    handled: list[int] = []
    failures = [2]

    async def handle(batch):
        values = [int(d.data) for d in batch]
        if 10 in values and failures[0]:
            failures[0] -= 1
            raise ConnectionError("store went away")
        handled.extend(values)

    # Small batches with room for more unacknowledged messages: without in-place retries, later batches
    # would be handled while the failed one waits for its redelivery.
    ordered = spec(batch_size=5, max_ack_pending=50, ordered=True)
    task = await run(bus.consumer(ordered, handle))
    await publish(bus, 40)
    await until(lambda: len(handled) == 40)
    await stop(task)
    assert failures == [0]  # the batch with 10 failed twice, and was retried until it went through
    assert handled == list(range(40))
    # Every batch was acknowledged before the stop; the server may count the last one a moment later.
    info = await settled_consumer(bus.js, "EVENTS_RAW", "t")
    settled = (info.ack_floor.stream_seq, info.num_ack_pending, info.num_pending)
    assert settled == (40, 0, 0), f"consumer after the stop (ack floor, unacknowledged, undelivered): {settled}"


async def test_an_ordered_consumer_resumes_with_what_its_dead_owner_left_unacknowledged(bus):
    ordered = spec(batch_size=10, max_ack_pending=10, ordered=True, ack_wait=30.0)
    first = bus.consumer(ordered, None)
    await first.provision()
    await publish(bus, 3)
    sub = await bus.js.pull_subscribe_bind(durable="t", stream="EVENTS_RAW")
    taken = await sub.fetch(3, timeout=5)  # the owner took them, then died without acknowledging
    assert [int(m.data) for m in taken] == [0, 1, 2]
    await sub.unsubscribe()
    await bus.publisher.publish_batch(
        [OutMessage("events.raw.0", str(i).encode(), f"id-{i}") for i in range(3, 6)]
    )  # newer ones arrive while those wait out their ack_wait (30 s)

    handled: list[int] = []

    async def handle(batch):
        handled.extend(int(d.data) for d in batch)

    task = await run(bus.consumer(ordered, handle))
    await until(lambda: len(handled) >= 6)
    await stop(task)
    assert handled == [0, 1, 2, 3, 4, 5]


# --- one bad message among many -------------------------------------------------------------------


class Applied:
    """A handler as the contract wants it: applies a batch completely or not at all (raising), so what
    it applied shows exactly which messages the runner got handled, in which order, and how often."""

    def __init__(self, poison=(), fail_first_calls=0):
        self.poison = set(poison)
        self.fail_first_calls = fail_first_calls
        self.calls = 0
        self.applied: list[int] = []

    async def __call__(self, batch):
        self.calls += 1
        if self.calls <= self.fail_first_calls:
            raise ConnectionError("store at db.internal:27017 is down")
        values = [int(d.data) for d in batch]
        for value in values:
            if value in self.poison:
                raise InvalidArgument("traits.email", f"ada{value}@example.com is not deliverable")
        self.applied.extend(values)


async def dead_letter_count(bus):
    return (await bus.js.stream_info("DLQ")).state.messages


async def everything_settled(bus):
    info = await bus.js.consumer_info("EVENTS_RAW", "t")
    return info.num_ack_pending == 0 and info.num_pending == 0


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_one_poison_message_in_a_batch_of_100_costs_only_itself(bus, ordered, caplog):
    await publish(bus, 100)  # all there before the consumer starts: one batch
    handler = Applied(poison={37})
    task = await run(bus.consumer(spec(batch_size=100, max_deliver=3, ordered=ordered), handler))
    letters = await dead_letters(bus, 1)
    await until(lambda: len(handler.applied) == 99)
    await asyncio.sleep(0.3)  # anything else about to be dead-lettered would be by now
    await stop(task)
    assert handler.applied == [i for i in range(100) if i != 37]
    assert await dead_letter_count(bus) == 1
    assert letters[0].data == b"37"
    assert letters[0].headers[consumer_module.DLQ_REASON] == "handler_error"
    assert "InvalidArgument" in letters[0].headers[consumer_module.DLQ_DETAIL]
    assert await everything_settled(bus)
    # Logs name the consumer, positions, the exception type and the field - never the value.
    assert "traits.email" in caplog.text and "InvalidArgument" in caplog.text
    logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert "example.com" not in logged


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_a_failure_of_every_message_that_heals_dead_letters_nothing(bus, ordered, caplog):
    """The store is down for a while: the batch is split, every part fails, the runner sees two
    neighbours fail on their own and waits rather than blaming a message."""
    await publish(bus, 100)
    handler = Applied(fail_first_calls=14)
    task = await run(bus.consumer(spec(batch_size=100, max_deliver=3, ordered=ordered), handler))
    await until(lambda: len(handler.applied) == 100)
    await asyncio.sleep(0.3)
    await stop(task)
    assert handler.applied == list(range(100))
    assert await dead_letter_count(bus) == 0
    assert await everything_settled(bus)
    assert "db.internal" not in caplog.text and "ConnectionError" in caplog.text


async def test_bad_messages_at_the_head_side_by_side_and_at_the_tail_are_each_isolated(bus):
    await publish(bus, 100)
    handler = Applied(poison={0, 1, 99})
    task = await run(bus.consumer(spec(batch_size=100, max_deliver=3, ordered=True), handler))
    letters = await dead_letters(bus, 3)
    await until(lambda: len(handler.applied) == 97)
    await asyncio.sleep(0.3)
    await stop(task)
    assert handler.applied == list(range(2, 99))
    assert sorted(int(m.data) for m in letters) == [0, 1, 99]
    assert await dead_letter_count(bus) == 3
    assert await everything_settled(bus)


async def test_a_message_on_a_quiet_stream_is_handed_over_without_a_second_request(bus, monkeypatch):
    # A message alone in the stream goes to the handler as soon as it arrives: no further round trip to
    # the server to look for more (every hop of the pipeline pays it otherwise). Messages waiting behind
    # one still come as one batch.
    import orjson

    async def handle(batch):
        pass

    runner = bus.consumer(spec(batch_size=64), handle)
    await runner.provision()
    subscription = await bus.js.pull_subscribe_bind(durable="t", stream="EVENTS_RAW")
    requests = []
    publish_ = runner.nc.publish

    async def recording(subject, payload=b"", reply="", headers=None):
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            requests.append(orjson.loads(payload))
        return await publish_(subject, payload, reply=reply, headers=headers)

    monkeypatch.setattr(runner.nc, "publish", recording)
    await publish(bus, 1)
    msgs = await runner._fetch(subscription)
    assert [int(m.data) for m in msgs] == [0]
    assert len(requests) == 1 and not requests[0].get("no_wait")

    await bus.publisher.publish_batch([OutMessage("events.raw.0", str(i).encode(), f"id-{i}") for i in range(1, 6)])
    # Those behind it come in order, each fetch asking at most twice, not once a message. The first of them may
    # come alone although all five are stored (publish_batch waited for their acknowledgements): nats-server
    # raises a consumer's count of waiting messages, which a delivery carries as num_pending, off its stream's
    # signal queue, after the store and the acknowledgement, so under load the first can say none wait
    # behind it (a CI run saw [1]; the test asked for all five in one fetch).
    msgs, fetches = [], 0
    while len(msgs) < 5 and fetches < 5:
        msgs += await runner._fetch(subscription)
        fetches += 1
    assert [int(m.data) for m in msgs] == [1, 2, 3, 4, 5]
    assert len(requests) <= 1 + 2 * fetches, requests  # a fetch asks at most twice: wait for one, take the rest
    for m in msgs:
        await m.ack()


async def test_a_cancellation_that_lands_with_a_binding_reply_still_stops_the_consumer(bus, monkeypatch):
    """nats-py waits for every JetStream reply with `asyncio.wait_for`, which on Python 3.11 returns the
    reply when it lands in the cancellation's loop turn: the stop is swallowed while binding. The runner
    must still end, not go on to fetch loops no one cancels (a service stopped during start hung)."""
    runner = bus.consumer(spec(), lambda deliveries: asyncio.sleep(0))
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    waiting = asyncio.Event()
    provision = runner.provision

    async def provision_with_a_late_reply():
        await provision()
        waiting.set()
        await asyncio.wait_for(reply, 10)  # the shape of nats-py's request

    monkeypatch.setattr(runner, "provision", provision_with_a_late_reply)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(waiting.wait(), 5)
    reply.set_result(None)  # the reply and the stop in one loop turn
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the consumer ran on after its cancellation"
    assert task.cancelled()


# --- a consumer the server lost -------------------------------------------------------------------


async def test_a_consumer_deleted_under_a_running_runner_is_created_again_and_misses_nothing(nats_server, caplog):
    """An operator's mistake (or a stream restored without its consumers) deletes the durable while the
    service runs: the runner must not retry a fetch from a missing consumer for ever. It creates it again
    from the stream's start - its acknowledgements went with it - so what came meanwhile is handled and
    what was handled before comes again (a handler skips it: the contract)."""
    captured = MetricsCapture("test")
    async with Bus.connect(nats_server.url, name="test", connect_timeout=5, telemetry=captured.telemetry) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        seen: list[int] = []

        async def handle(batch):
            seen.extend(int(d.data) for d in batch)

        runner = bus.consumer(spec(), handle)
        task = await run(runner)
        await publish(bus, 3)
        await until(lambda: len(seen) == 3)
        await bus.js.delete_consumer("EVENTS_RAW", "t")
        await bus.publisher.publish_batch([OutMessage("events.raw.0", str(i).encode(), f"id-{i}") for i in range(3, 6)])
        await until(lambda: {3, 4, 5} <= set(seen))
        await until(lambda: len(seen) == 9)  # 0-2 again, from the recreated consumer's start
        await stop(task)
        assert seen == [0, 1, 2, 0, 1, 2, 3, 4, 5]
        info = await settled_consumer(bus.js, "EVENTS_RAW", "t")  # acks counted a moment after the stop
        assert info.config.deliver_policy == api.DeliverPolicy.ALL
        assert info.config.max_deliver == runner.spec.max_deliver and info.config.filter_subject == "events.raw.>"
        assert info.num_ack_pending == 0 and info.num_pending == 0
    assert runner.recreated == 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "created it again" in r.getMessage()]
    assert len(warnings) == 1 and "consumer t " in warnings[0].getMessage()
    _, points = captured.collected()["cdp.bus.consumer.recreated"]
    assert [(dict(p.attributes), p.value) for p in points] == [({"stream": "EVENTS_RAW", "consumer": "t"}, 1)]


async def test_a_lost_consumer_starts_again_after_the_acknowledgement_floor_its_runner_saw(bus):
    """What was acknowledged was handled: the consumer created again starts after it, and delivers what
    came while it was gone (from the stream's start it would replay everything - a drained consumer of
    merges would re-merge persons unmerged since)."""
    seen: list[int] = []

    async def handle(batch):
        seen.extend(int(d.data) for d in batch)

    task = await run(bus.consumer(spec(), handle))
    await publish(bus, 3)
    await until(lambda: len(seen) == 3)
    await stop(task)
    runner = bus.consumer(spec(), handle)  # a restart: it finds the floor at 3
    task = await run(runner)
    await bus.js.delete_consumer("EVENTS_RAW", "t")
    await bus.publisher.publish_batch([OutMessage("events.raw.0", str(i).encode(), f"id-{i}") for i in range(3, 6)])
    await until(lambda: len(seen) == 6)
    await asyncio.sleep(0.3)  # anything acknowledged before would have come again by now
    await stop(task)
    assert seen == [0, 1, 2, 3, 4, 5] and runner.recreated == 1
    info = await bus.js.consumer_info("EVENTS_RAW", "t")
    assert info.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE and info.config.opt_start_seq == 4


async def test_a_consumer_lost_with_a_stream_restored_from_an_older_backup_reads_it_from_its_start(bus):
    """A restored stream numbers its messages again, below the floor the runner saw: starting after that
    floor would skip them."""
    seen: list[int] = []

    async def handle(batch):
        seen.extend(int(d.data) for d in batch)

    await publish(bus, 3)
    task = await run(bus.consumer(spec(), handle))
    await until(lambda: len(seen) == 3)
    await stop(task)
    runner = bus.consumer(spec(), handle)  # a restart: it finds the floor at 3
    task = await run(runner)
    await bus.js.delete_stream("EVENTS_RAW")  # the restore: an empty stream, no consumers
    await bus.ensure_streams(events_raw_stream())
    await bus.publisher.publish_batch([OutMessage("events.raw.0", b"7", "id-7")])
    await until(lambda: seen[3:] == [7])
    await stop(task)
    assert runner.recreated == 1
    assert (await bus.js.consumer_info("EVENTS_RAW", "t")).config.deliver_policy == api.DeliverPolicy.ALL


async def test_a_consumer_that_delivered_only_new_messages_is_not_made_to_read_the_history(bus):
    """A consumer created on purpose at the stream's end (scoring's label watch) is not made to read the
    stream's history when it comes back: from the floor it was seen at (its start, or what it handled)."""
    await publish(bus, 3)  # history it never wanted
    config = spec().config()
    config.deliver_policy = api.DeliverPolicy.NEW
    await bus.js.add_consumer("EVENTS_RAW", config)
    seen: list[int] = []

    async def handle(batch):
        seen.extend(int(d.data) for d in batch)

    runner = bus.consumer(spec(), handle)
    task = await run(runner)
    await bus.publisher.publish_batch([OutMessage("events.raw.0", b"3", "id-3")])
    await until(lambda: seen == [3])
    await bus.js.delete_consumer("EVENTS_RAW", "t")
    await until(lambda: runner.recreated == 1)
    await bus.publisher.publish_batch([OutMessage("events.raw.0", b"4", "id-4")])
    await until(lambda: seen[-1:] == [4])
    await asyncio.sleep(0.3)  # anything of the history would have come by now
    await stop(task)
    assert set(seen) == {3, 4}  # 3 may come again (after the floor the runner saw), 0-2 never


async def test_a_missing_stream_is_not_answered_with_a_consumer(bus):
    runner = bus.consumer(spec(stream="NO_SUCH_STREAM"), None)
    assert not await runner.recover_missing()
    assert runner.recreated == 0


async def test_the_lag_poll_creates_a_lost_consumer_again_when_no_fetch_says_so(bus):
    """A pull to a consumer that no longer exists may get no answer at all (servers differ): the lag poll,
    which asks for the consumer's state every few seconds anyway, finds it gone too."""
    runner = bus.consumer(spec(), None)
    await runner.provision()
    await bus.js.delete_consumer("EVENTS_RAW", "t")
    poll = asyncio.create_task(runner._poll_lag())
    try:
        await until(lambda: runner.recreated == 1)
    finally:
        await stop(poll)
    assert (await bus.js.consumer_info("EVENTS_RAW", "t")).config.deliver_policy == api.DeliverPolicy.ALL


class StoreOutage:
    """A handler whose store says `Unavailable` (disk full, the server down) for its first calls that
    carry message `at`: the outage starts just as that message comes."""

    def __init__(self, failing_calls, at):
        self.failing_calls = failing_calls
        self.at = at
        self.failed = 0
        self.applied: list[int] = []

    async def __call__(self, batch):
        values = [int(d.data) for d in batch]
        if self.at in values and self.failed < self.failing_calls:
            self.failed += 1
            raise Unavailable("sqlite store /data/cdp.db: database or disk is full")
        self.applied.extend(values)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("messages", [1, 5], ids=["alone", "last-of-a-batch"])
async def test_a_store_that_says_unavailable_longer_than_the_retries_dead_letters_nothing(bus, ordered, messages):
    """An outage is not a poison message: a batch of one, or a batch's last message (no neighbour after
    it to prove the store healthy), waits out a store that answers Unavailable for more attempts than
    max_deliver, and is handled once it heals - not dead-lettered (a full disk for a minute put accepted
    events in the DLQ)."""
    await publish(bus, messages)
    handler = StoreOutage(failing_calls=10, at=messages - 1)  # outlasts any part's 3 attempts
    task = await run(bus.consumer(spec(batch_size=messages, max_deliver=3, ordered=ordered), handler))
    await until(lambda: sorted(handler.applied) == list(range(messages)))
    await asyncio.sleep(0.3)
    await stop(task)
    assert handler.failed == 10
    assert await dead_letter_count(bus) == 0
    assert await everything_settled(bus)


@pytest.mark.parametrize("messages", [1, 4], ids=["alone", "a-batch"])
async def test_a_cancellation_a_failing_handler_lost_ends_the_retries(bus, messages):
    """A store that says Unavailable is retried in place for as long as it lasts. A cancellation that lands
    as the handler's request gets its reply (nats-py's `asyncio.wait_for` on Python 3.11 returns the reply)
    is lost to the handler, which then fails as before: the retries must still end, not go on for as long
    as the outage (for ever, and so whatever waits for the task: a stop, an event loop's teardown). Nothing
    was handled, so nothing is acknowledged: it all comes again."""
    await publish(bus, messages)
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    waiting = asyncio.Event()
    calls = 0

    async def handle(deliveries):
        nonlocal calls
        calls += 1
        if calls == 2:  # the first retry asks the store, and its reply comes with the stop
            waiting.set()
            await asyncio.wait_for(reply, 10)  # the shape of nats-py's request
        raise Unavailable("the store is down")

    task = await run(bus.consumer(spec(batch_size=messages, ordered=True), handle))
    await asyncio.wait_for(waiting.wait(), 5)
    reply.set_result(None)  # the reply and the stop in one loop turn
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the runner went on retrying after its cancellation"
    assert task.cancelled()
    info = await bus.js.consumer_info("EVENTS_RAW", "t")
    assert info.ack_floor.stream_seq == 0  # none acknowledged: all come again
    assert await dead_letter_count(bus) == 0


async def test_a_lingering_consumer_fetches_again_only_after_its_linger(bus):
    """ConsumerSpec.linger: after a batch smaller than batch_size the next fetch waits that long, so what
    arrives meanwhile comes as one batch (a consumer to which a message's latency does not matter then pays
    its pulls, span and metric records once a batch rather than once a message)."""
    handled, returned = [], []

    async def handle(batch):
        handled.append((asyncio.get_running_loop().time(), [int(d.data) for d in batch]))
        if len(handled) == 1:  # stored before this batch is over: without the linger, fetched at once
            await bus.publisher.publish_batch(
                [OutMessage("events.raw.0", str(i).encode(), f"id-{i}") for i in range(1, 21)]
            )
        returned.append(asyncio.get_running_loop().time())

    task = await run(bus.consumer(spec(batch_size=64, linger=0.5), handle))
    await publish(bus, 1)
    await until(lambda: sum(len(values) for _, values in handled) == 21)
    await stop(task)
    assert [values for _, values in handled] == [[0], list(range(1, 21))]
    assert handled[1][0] - returned[0] >= 0.5
