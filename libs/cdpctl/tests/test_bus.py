"""`cdpctl dlq` and `cdpctl lag` on a real nats-server, with dead letters written by the kit's own
consumer: listed with their reason, replayed to their original subject and then removed."""

from __future__ import annotations

import asyncio
import json

from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    OutMessage,
    dead_letter_stream,
    events_raw_stream,
    profiles_stream,
    rawevents,
)


async def until(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_dead_letters_are_shown_with_their_reason_and_replayed_once(bus_cli):
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        # PROFILES too: its (empty) listing shows the filter keeps other streams' dead letters out.
        await bus.ensure_streams(events_raw_stream(), profiles_stream(), dead_letter_stream())
        rejected_once: set[bytes] = set()
        handled: list[bytes] = []

        async def handle(batch):
            for d in batch:
                if d.data.startswith(b"bad") and d.data not in rejected_once:
                    rejected_once.add(d.data)  # bad on its first arrival only: "fixed" by the time of replay
                    d.reject("invalid_event", "event has no person")
                else:
                    handled.append(d.data)

        spec = ConsumerSpec(
            stream="EVENTS_RAW", durable="identity-p0", filter_subjects=("events.raw.>",), fetch_timeout=0.2
        )
        task = asyncio.create_task(bus.consumer(spec, handle).run())
        messages = [OutMessage("events.raw.0", b"good-1", "web:1"), OutMessage("events.raw.1", b"bad-2", "web:2")]
        await bus.publisher.publish_batch(messages)

        async def dead_lettered():
            return (await bus.js.stream_info("DLQ")).state.messages == 1

        await until(dead_lettered)

        result = await bus_cli.run("dlq", "--json")
        assert result.exit_code == 0, result.output
        (letter,) = json.loads(result.output)["dead_letters"]
        assert letter["reason"] == "invalid_event" and letter["detail"] == "event has no person"
        assert (letter["stream"], letter["consumer"], letter["subject"]) == (
            "EVENTS_RAW",
            "identity-p0",
            "events.raw.1",
        )
        result = await bus_cli.run("dlq", "EVENTS_RAW", "identity-p0")
        assert "invalid_event" in result.output and "identity-p0" in result.output, result.output
        assert json.loads((await bus_cli.run("dlq", "PROFILES", "--json")).output)["dead_letters"] == []

        result = await bus_cli.run("lag", "--json")
        assert result.exit_code == 0, result.output
        (lag,) = [row for row in json.loads(result.output) if row["consumer"] == "identity-p0"]
        assert lag["stream"] == "EVENTS_RAW" and lag["pending"] == 0 and lag["ack_pending"] == 0

        result = await bus_cli.run("dlq", "--replay")
        assert result.exit_code == 0 and "replayed 1 of 1" in result.output, result.output

        # Back on its original subject, handled this time, and gone from the DLQ.
        async def handled_after_replay():
            return b"bad-2" in handled

        await until(handled_after_replay)
        replayed = await bus.js.get_last_msg("EVENTS_RAW", "events.raw.1")
        assert replayed.data == b"bad-2" and replayed.headers["Nats-Msg-Id"] == "replay:EVENTS_RAW:identity-p0:2"
        assert not any(k.startswith("Cdp-Dlq-") for k in replayed.headers)
        assert (await bus.js.stream_info("DLQ")).state.messages == 0
        assert json.loads((await bus_cli.run("dlq", "--json")).output)["dead_letters"] == []

        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_lag_shows_what_a_stopped_consumer_has_not_read(bus_cli):
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream())
        await bus.js.add_consumer("EVENTS_RAW", durable_name="profile-p0", ack_policy="explicit")
        await bus.publisher.publish_batch([OutMessage("events.raw.0", b"x", f"web:{i}") for i in range(3)])
        result = await bus_cli.run("lag", "--json")
        (lag,) = json.loads(result.output)
        assert (lag["stream"], lag["consumer"], lag["pending"]) == ("EVENTS_RAW", "profile-p0", 3)
        assert "profile-p0" in (await bus_cli.run("lag")).output


async def test_a_replay_touches_only_the_dead_letters_there_when_it_started(bus_cli, monkeypatch):
    # A message that is still poison fails again the moment it is replayed and lands in the DLQ anew. The
    # replay must leave that new dead letter for the operator: before, it read it as the next one to
    # replay, which failed again, and so on until --limit (a live platform showed 183 rounds of one bad
    # event in a second). The consumer's instant rejection is simulated inside the replay's own publish
    # so the test does not depend on who wins the race.
    from nats.js.client import JetStreamContext

    from cdp_kit.bus import subjects
    from cdp_kit.bus.consumer import DLQ_CONSUMER, DLQ_REASON, DLQ_SEQ, DLQ_STREAM, DLQ_SUBJECT

    def dead_letter_headers(subject: str, seq: int) -> dict[str, str]:
        return {
            DLQ_REASON: "invalid_event",
            DLQ_SUBJECT: subject,
            DLQ_STREAM: "EVENTS_RAW",
            DLQ_CONSUMER: "identity-p0",
            DLQ_SEQ: str(seq),
        }

    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        first = await bus.js.publish("events.raw.0", b"still-bad", headers={"Nats-Msg-Id": "web:1"})
        dlq_subject = subjects.dead_letter("EVENTS_RAW", "identity-p0")
        await bus.js.publish(dlq_subject, b"still-bad", headers=dead_letter_headers("events.raw.0", first.seq))

        publish = JetStreamContext.publish

        async def rejected_again_at_once(self, subject, payload=b"", *args, **kwargs):
            ack = await publish(self, subject, payload, *args, **kwargs)
            if subject.startswith("events.raw."):
                await publish(self, dlq_subject, payload, headers=dead_letter_headers(subject, ack.seq))
            return ack

        monkeypatch.setattr(JetStreamContext, "publish", rejected_again_at_once)
        result = await bus_cli.run("dlq", "--replay", "--limit", "20", "--json")
        monkeypatch.undo()

        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["replayed"] == 1, result.output
        # The one replayed went back once; its new failure waits in the DLQ, not replayed.
        assert (await bus.js.stream_info("EVENTS_RAW")).state.messages == 2
        (letter,) = json.loads((await bus_cli.run("dlq", "--json")).output)["dead_letters"]
        assert letter["original_seq"] == first.seq + 1


async def test_dlq_of_a_stream_or_consumer_that_does_not_exist_says_so(bus_cli):
    # `cdpctl dlq events_raw` (the wrong case) printed an empty table: read as "no dead letters".
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())

    result = await bus_cli.run("dlq", "events_raw")
    assert result.exit_code == 2, result.output
    assert "STREAM" in result.output and "events_raw" in result.output and "EVENTS_RAW" in result.output

    result = await bus_cli.run("dlq", "EVENTS_RAW", "identity-p9", "--json")
    assert result.exit_code == 2, result.output
    assert "CONSUMER" in result.output and "identity-p9" in result.output

    # A stream that exists with nothing dead-lettered is an empty answer, not an error.
    result = await bus_cli.run("dlq", "EVENTS_RAW", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["dead_letters"] == [], result.output


def detail_column(table: str) -> str:
    """The text of the dead-letter table's detail column (its 8th), its wrapped lines joined."""
    cells = [line.split("│")[8].strip() for line in table.splitlines() if line.count("│") == 10]
    return " ".join(cell for cell in cells if cell and cell != "detail")


async def test_the_dlq_table_shows_the_cause_at_the_end_of_a_long_detail(bus_cli):
    """The kit keeps up to 512 characters of why a message failed; the error that says why comes last."""
    doing = "applying a batch of 500 events to partition 3 of the identity store at /var/lib/cdp/identity.db"
    short = f"sqlite3.OperationalError while {doing}: database or disk is full"
    long = f"{doing} (checkpoint of the write-ahead log after {'x' * 300} retries): database is locked"
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(dead_letter_stream())
        for seq, detail in enumerate((short, long), start=1):
            headers = {
                "Cdp-Dlq-Reason": "store_error",
                "Cdp-Dlq-Detail": detail,
                "Cdp-Dlq-Subject": f"events.raw.{seq}",
                "Cdp-Dlq-Stream": "EVENTS_RAW",
                "Cdp-Dlq-Stream-Seq": str(seq),
                "Cdp-Dlq-Consumer": "identity-p3",
                "Cdp-Dlq-Deliveries": "5",
                "Cdp-Dlq-Time": "2026-12-05T06:00:00Z",
            }
            await bus.js.publish("dlq.EVENTS_RAW.identity-p3", b"{}", headers=headers)

    result = await bus_cli.run("dlq")
    assert result.exit_code == 0, result.output
    shown = detail_column(result.output)
    assert "database or disk is full" in shown, result.output
    assert "database is locked" in shown, result.output
    assert "sqlite3.OperationalError while applying" in shown  # the start too, when it fits

    result = await bus_cli.run("dlq", "--wide")
    assert "x" * 300 in detail_column(result.output).replace(" ", ""), result.output  # --wide: whole


async def test_a_replay_sends_the_stream_s_original_never_what_a_dead_letter_claims(bus_cli):
    """Every consuming service may publish dead letters on its own consumers' subjects, and the operator's
    replay runs as a user that may publish anything. A replay that trusted a dead letter's headers and body
    let a compromised service have the operator publish a forged `privacy.deleted` or a `$JS.API` purge
    (a security trial purged EVENTS_RAW and PRIVACY that way). It sends the original as its stream holds it."""
    from cdp_kit.bus import privacy_stream, subjects

    def letter(subject: str, seq: int, stream: str = "EVENTS_RAW", consumer: str = "identity-p0") -> dict:
        return {
            "Cdp-Dlq-Reason": "invalid_event",
            "Cdp-Dlq-Subject": subject,
            "Cdp-Dlq-Stream": stream,
            "Cdp-Dlq-Stream-Seq": str(seq),
            "Cdp-Dlq-Consumer": consumer,
        }

    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), privacy_stream(), dead_letter_stream())
        real = await bus.js.publish("events.raw.0", b"the-event", headers={"Nats-Msg-Id": "web:1"})
        dlq = subjects.dead_letter("EVENTS_RAW", "identity-p0")
        # 1. A real sequence, a forged subject and body: the original goes back where it was published.
        await bus.js.publish(dlq, b"forged", headers=letter("$JS.API.STREAM.PURGE.EVENTS_RAW", real.seq))
        # 2. A sequence the stream never held (or no longer holds): the forged copy is not sent.
        await bus.js.publish(dlq, b"forged-deletion", headers=letter(subjects.PRIVACY_DELETED, 999))
        # 3. Headers naming another stream than the subject the letter was written on.
        await bus.js.publish(dlq, b"forged", headers=letter(subjects.PRIVACY_DELETED, 1, stream="PRIVACY"))

        result = await bus_cli.run("dlq", "--replay")
        assert result.exit_code == 0 and "replayed 1 of 3" in result.output, result.output
        assert "no longer in the stream" in result.output and "written for EVENTS_RAW" in result.output

        assert (await bus.js.stream_info("PRIVACY")).state.messages == 0
        raw = await bus.js.stream_info("EVENTS_RAW")
        assert raw.state.messages == 2  # not purged: the original plus its replay
        replayed = await bus.js.get_last_msg("EVENTS_RAW", "events.raw.0")
        assert (
            replayed.data == b"the-event"
            and replayed.headers["Nats-Msg-Id"] == f"replay:EVENTS_RAW:identity-p0:{real.seq}"
        )
        # The two not replayed stay for the operator to read.
        assert len(json.loads((await bus_cli.run("dlq", "--json")).output)["dead_letters"]) == 2


async def test_a_dead_letter_whose_original_was_erased_goes_back_only_where_its_writer_may_publish(bus_cli):
    """Orchestration erases a rendered message from ACTIONS once its outcome is recorded, a failure
    included, so a dispatcher's dead letter has only its copy; orchestration may publish actions itself,
    so replaying that copy lends it nothing. The same copy claiming a subject its writer may not publish
    is left."""
    from cdp_kit.bus import privacy_stream, subjects
    from cdp_kit.bus.streams import actions_stream

    def letter(subject: str) -> dict:
        return {
            "Cdp-Dlq-Reason": "http_500",
            "Cdp-Dlq-Subject": subject,
            "Cdp-Dlq-Stream": "ACTIONS",
            "Cdp-Dlq-Stream-Seq": "7",
            "Cdp-Dlq-Consumer": "orchestration-dispatch-email",
        }

    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(actions_stream(), privacy_stream(), dead_letter_stream())
        dlq = subjects.dead_letter("ACTIONS", "orchestration-dispatch-email")
        await bus.js.publish(dlq, b"the-action", headers={**letter("actions.email.1"), "Cdp-Action": "a1"})
        await bus.js.publish(dlq, b"forged", headers=letter(subjects.PRIVACY_DELETED))

        result = await bus_cli.run("dlq", "--replay")
        assert result.exit_code == 0 and "replayed 1 of 2" in result.output, result.output
        assert "may not publish 'privacy.deleted'" in result.output.replace("\n", "")
        replayed = await bus.js.get_last_msg("ACTIONS", "actions.email.1")
        assert replayed.data == b"the-action" and replayed.headers["Cdp-Action"] == "a1"
        assert (await bus.js.stream_info("PRIVACY")).state.messages == 0


async def test_a_dead_lettered_event_of_a_message_of_several_is_replayed_alone(bus_cli):
    """The collector stores a request's events on one partition as one message (cdp_kit.bus.rawevents);
    identity dead-letters one unusable event of it alone. The replay sends that event back alone, in the
    single-event form: the others were applied and are not sent again."""
    async with Bus.connect(bus_cli.nats_url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        parts = [b"good-0", b"bad-1", b"good-2"]
        handled: list[bytes] = []
        rejected_once: set[bytes] = set()

        async def handle(batch):
            for d in batch:
                for index, part in enumerate(rawevents.events_of(d.data, d.headers)):
                    if part.startswith(b"bad") and part not in rejected_once:
                        rejected_once.add(part)  # "fixed" by the time of the replay
                        d.reject_part(index, part, "invalid_identifier", "email: cannot be stored")
                    else:
                        handled.append(part)

        spec = ConsumerSpec(
            stream="EVENTS_RAW", durable="identity-p0", filter_subjects=("events.raw.>",), fetch_timeout=0.2
        )
        task = asyncio.create_task(bus.consumer(spec, handle).run())
        await bus.publisher.publish_batch(
            [OutMessage("events.raw.0", rawevents.join(parts), "eb_1", {rawevents.EVENTS_HEADER: "3"})]
        )

        async def dead_lettered():
            return (await bus.js.stream_info("DLQ")).state.messages == 1

        await until(dead_lettered)
        (letter,) = json.loads((await bus_cli.run("dlq", "--json")).output)["dead_letters"]
        assert (letter["original_seq"], letter["part"], letter["reason"]) == (1, 1, "invalid_identifier")

        result = await bus_cli.run("dlq", "--replay")
        assert result.exit_code == 0 and "replayed 1 of 1" in result.output, result.output

        async def handled_after_replay():
            return b"bad-1" in handled

        await until(handled_after_replay)
        assert handled == [b"good-0", b"good-2", b"bad-1"], "the good events were not sent again"
        replayed = await bus.js.get_last_msg("EVENTS_RAW", "events.raw.0")
        assert replayed.data == b"bad-1" and replayed.headers["Nats-Msg-Id"] == "replay:EVENTS_RAW:identity-p0:1:1"
        assert rawevents.EVENTS_HEADER not in replayed.headers
        assert (await bus.js.stream_info("DLQ")).state.messages == 0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
