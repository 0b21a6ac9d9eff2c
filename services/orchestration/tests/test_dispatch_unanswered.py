"""A provider that accepts connections and never answers (a mail relay stopped with SIGSTOP, wedged), as the
on-call engineer relies on the dispatcher then: every action goes through its CDP_ORCHESTRATION_MAX_ATTEMPTS
attempts on its back-off and ends as a dead letter saying `timeout` - the dispatcher does not
wait out the adapter's timeout on each of them - and once the provider answers again each action goes out
once. A real SMTP listener (a socket server here that accepts and says nothing) and a real nats-server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.parser import BytesParser

import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, OutMessage, dead_letter_stream, partition_for, subjects
from cdp_kit.bus.consumer import DLQ_DETAIL, DLQ_REASON
from cdp_kit.natsserver import free_port, wait_for_port
from cdp_kit.settings import SettingsError, load_settings
from cdp_kit.storage import open_store
from cdp_orchestration import streams
from cdp_orchestration.channels import Channel, Outcome
from cdp_orchestration.channels.email import EmailChannel
from cdp_orchestration.channels.settings import SmtpSettings
from cdp_orchestration.dispatch import MAX_ATTEMPTS, PENDING, SENDS, dispatcher
from cdp_testing.metrics import MetricsCapture
from cdp_testing.pausing import pause
from cdp_testing.waiting import eventually

from .conftest import dispatched


class SilentRelay:
    """Accepts SMTP connections and never says a word (no greeting), as a stopped relay's kernel does."""

    def __init__(self) -> None:
        self.connections = 0
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._held.append(writer)

    async def __aenter__(self) -> SilentRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for writer in self._held:
            writer.transport.abort()
        assert self._server is not None
        self._server.close()


def email(port: int, **more: str) -> EmailChannel:
    environ = {
        "CDP_SMTP_HOST": "127.0.0.1",
        "CDP_SMTP_PORT": str(port),
        "CDP_SMTP_SECURITY": "none",
        "CDP_SMTP_FROM": "Shop <hello@shop.example>",
        **more,
    }
    return EmailChannel(load_settings(SmtpSettings, environ))


@pytest.fixture
async def site(nats_server, tmp_path) -> AsyncIterator[tuple[Bus, object, MetricsCapture]]:
    metrics = MetricsCapture("orchestration")
    async with (
        Bus.connect(nats_server.url, name="dispatch-unanswered", telemetry=metrics.telemetry) as bus,
        open_store(f"sqlite:///{tmp_path}/d.db") as store,
    ):
        await streams.ensure_streams(bus.js)
        await bus.ensure_streams(dead_letter_stream())
        yield bus, store, metrics


async def publish(bus: Bus, channel: str, count: int) -> list[str]:
    ids = [f"act-{i}" for i in range(count)]
    messages = []
    for i, action_id in enumerate(ids):
        person = f"person-{i}"
        message = pb.ActionMessage(
            action_id=action_id, person_id=person, channel=channel, content={"subject": "Your cart", "body": "hi"}
        )
        message.address.update({"email": f"p{i}@example.com", "webhook_url": "https://h", "user_id": f"u{i}"})
        subject = subjects.actions(channel, partition_for(person, 4))
        messages.append(OutMessage(subject, message.SerializeToString(), action_id))
    assert all(result.ok for result in await bus.publisher.publish_batch(messages))
    return ids


async def dead_letters(bus: Bus, durable: str) -> dict[str, list]:
    """The dispatcher's dead letters, by action id."""
    found: dict[str, list] = {}
    seq = 1
    while True:
        try:
            msg = await bus.js.get_msg(
                subjects.DLQ, seq, subject=subjects.dead_letter(subjects.ACTIONS, durable), next=True
            )
        except Exception:
            return found
        seq = msg.seq + 1
        found.setdefault(pb.ActionMessage.FromString(msg.data or b"").action_id, []).append(msg)


@asynccontextmanager
async def dispatching(bus: Bus, store, channel: Channel, **options) -> AsyncIterator[None]:
    task = asyncio.create_task(dispatcher(bus, store, channel, **options).run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()


async def test_a_relay_that_accepts_and_never_answers_costs_each_email_its_attempts_on_schedule_then_a_dead_letter(
    site, caplog
):
    bus, store, metrics = site
    caplog.set_level(logging.INFO, logger="cdp.orchestration.channels.email")
    # More than a fetched batch (32) and than the actions in flight (16), as the cart journey made them;
    # the channel's timeouts are its defaults (30 s a command) but for the greeting's, shortened, and so is
    # the back-off between attempts: the documented one (0.5, 2, 10, 30 s) would make the test wait 42.5 s
    # for the same attempts, the same breaker and the same dead letters.
    count = 40
    async with SilentRelay() as relay:
        ids = await publish(bus, "email", count)
        async with dispatching(bus, store, email(relay.port, CDP_SMTP_CONNECT_TIMEOUT="1"), backoff=(0.5, 1, 2, 4)):
            letters = await eventually(
                lambda: _all(dead_letters(bus, "orchestration-dispatch-email"), ids), timeout=90, every=0.5
            )
            await eventually(lambda: dispatched(bus, "email"))  # nothing more is coming
            letters = await dead_letters(bus, "orchestration-dispatch-email")
        connections = relay.connections
    assert sorted(letters) == sorted(ids) and all(len(found) == 1 for found in letters.values())
    assert {letter.headers[DLQ_REASON] for [letter] in letters.values()} == {"timeout"}
    assert all(f"{MAX_ATTEMPTS} attempts" in letter.headers[DLQ_DETAIL] for [letter] in letters.values())
    records = [(await store.get(SENDS, action_id)).doc for action_id in ids]
    assert {(r["status"], r["reason"], r["attempts"], r["dead_lettered"]) for r in records} == {
        ("failed", "timeout", MAX_ATTEMPTS, True)
    }
    # The attempts not waited on were counted, not sent: the relay saw fewer connections (sends, and the
    # probes asking for its greeting) than there were attempts.
    skipped = sum(r["skipped"] for r in records)
    assert skipped > 0 and count * MAX_ATTEMPTS - skipped <= connections < count * MAX_ATTEMPTS
    _, points = metrics.collected()["cdp.orchestration.dispatch.dead_lettered"]
    assert {(p.attributes["channel"], p.attributes["reason"]): p.value for p in points} == {("email", "timeout"): count}
    # Each send the relay did not greet is logged as a timeout, never as a refused connection.
    reasons = {r.reason for r in caplog.records if r.name == "cdp.orchestration.channels.email"}
    assert reasons == {"timeout"}
    print(
        f"{count} actions, {count * MAX_ATTEMPTS} attempts: {skipped} counted without a send; {connections} connections"
    )


async def test_the_email_channel_says_timeout_for_a_relay_that_accepts_and_says_nothing_and_connect_when_refused():
    async with SilentRelay() as relay:
        channel = email(relay.port, CDP_SMTP_CONNECT_TIMEOUT="0.5")
        action = _action()
        silent = await channel.send(action)
        await channel.close()
    assert (silent.status, silent.reason, silent.retryable) == ("failed", "timeout", True)
    # The port is closed now: nothing listens, the connection is refused at once.
    refused_channel = email(relay.port)
    refused = await refused_channel.send(action)
    await refused_channel.close()
    assert (refused.status, refused.reason, refused.retryable) == ("failed", "connect", True)


def test_the_greeting_timeout_is_a_setting_of_its_own():
    environ = {"CDP_SMTP_HOST": "smtp", "CDP_SMTP_FROM": "a@b.c"}
    settings = load_settings(SmtpSettings, environ)
    assert (settings.connect_timeout, settings.timeout) == (10.0, 30.0)
    with pytest.raises(SettingsError) as refused:
        load_settings(SmtpSettings, {**environ, "CDP_SMTP_CONNECT_TIMEOUT": "0"})
    assert "CDP_SMTP_CONNECT_TIMEOUT=0.0 is invalid: must be positive" in refused.value.problems


class Wedged(Channel):
    """A provider that times out while `wedged` (each call after a short wait), then accepts."""

    name = "webhook"

    def __init__(self) -> None:
        self.wedged = True
        self.calls = 0
        self.sent: list[str] = []

    async def send(self, action) -> Outcome:
        self.calls += 1
        if self.wedged:
            await asyncio.sleep(0.2)
            return Outcome.failed("timeout", retryable=True)
        self.sent.append(action.action_id)
        return Outcome.accepted()


async def test_a_provider_answering_again_closes_the_breaker_and_each_action_goes_out_once(site):
    bus, store, _ = site
    channel = Wedged()
    ids = await publish(bus, "webhook", 20)
    async with dispatching(bus, store, channel, max_attempts=50, backoff=(0.2,), probe_every=0.3):
        # The breaker opens: attempts are counted without a send.
        await eventually(lambda: _skipped(store, ids), timeout=20)
        channel.wedged = False  # the provider is back: the next probe is answered
        records = await eventually(lambda: _all_accepted(store, ids), timeout=20)
        await eventually(lambda: dispatched(bus, "webhook"))  # nothing is delivered again
    assert sorted(channel.sent) == sorted(ids)  # each once
    # Every attempt is a call to the provider or one counted without it while the breaker was open.
    assert sum(r["skipped"] for r in records) > 0
    assert channel.calls == sum(r["attempts"] - r["skipped"] for r in records)
    assert await dead_letters(bus, "orchestration-dispatch-webhook") == {}


def _action():
    from cdp_orchestration.channels.base import Action, Content

    return Action("act-1", "person-1", "email", Content(subject="Your cart", body="hi"), "ada@example.com")


async def _all(found, ids: list[str]):
    letters = await found
    return letters if all(action_id in letters for action_id in ids) else None


async def _skipped(store, ids: list[str]) -> bool:
    for action_id in ids:
        stored = await store.get(SENDS, action_id)
        if stored is not None and stored.doc.get("skipped"):
            return True
    return False


async def _all_accepted(store, ids: list[str]) -> list[dict] | None:
    records = []
    for action_id in ids:
        stored = await store.get(SENDS, action_id)
        if stored is None or stored.doc["status"] != "accepted":
            return None
        records.append(stored.doc)
    return records


async def test_a_relay_stopped_then_continued_takes_each_email_once_once_its_greeting_closes_the_breaker(
    site, tmp_path
):
    """The trial itself: the `channels` companion (a real SMTP server, its own process) stopped with SIGSTOP,
    emails published meanwhile, then SIGCONT. The breaker opens on the timeouts, the greeting probe closes
    it once the relay answers, and every email lands in its maildir once (none was sent while stopped)."""
    bus, store, _ = site
    smtp_port, maildir = free_port(), tmp_path / "mail"
    others = [f"--{name}-port={free_port()}" for name in ("twilio", "fcm", "webpush", "webhook")]
    companion = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "cdp_testing.channels", f"--smtp-port={smtp_port}", f"--maildir={maildir}", *others],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert await asyncio.to_thread(wait_for_port, "127.0.0.1", smtp_port, 30)
        pause(companion.pid)  # stopped for certain, not only signalled
        channel = email(smtp_port, CDP_SMTP_CONNECT_TIMEOUT="1")
        async with dispatching(bus, store, channel, probe_every=1.0):
            ids = await publish(bus, "email", 8)
            await eventually(lambda: _skipped(store, ids), timeout=30)  # the breaker is open
            os.kill(companion.pid, signal.SIGCONT)
            records = await eventually(lambda: _all_final(store, ids), timeout=60)
            await eventually(lambda: dispatched(bus, "email"))  # nothing is delivered again
    finally:
        os.kill(companion.pid, signal.SIGCONT)
        companion.terminate()
        await companion.wait()
    # Each action that was accepted is in the maildir once; none was lost (accepted or dead-lettered).
    message_ids = [
        BytesParser().parsebytes(path.read_bytes())["Message-ID"] for path in sorted((maildir / "new").iterdir())
    ]
    accepted = [r for r in records if r["status"] == "accepted"]
    assert sorted(message_ids) == sorted(r["provider_id"] for r in accepted)
    assert len(set(message_ids)) == len(message_ids) and accepted  # sent again once the relay answered
    assert all(r["status"] == "accepted" or (r["reason"], r["dead_lettered"]) == ("timeout", True) for r in records)


async def _all_final(store, ids: list[str]) -> list[dict] | None:
    records = []
    for action_id in ids:
        stored = await store.get(SENDS, action_id)
        if stored is None or stored.doc["status"] == PENDING:
            return None
        records.append(stored.doc)
    return records
