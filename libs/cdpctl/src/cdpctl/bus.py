"""Operator commands on the bus: dead letters and consumer lag.

`cdpctl dlq` lists what consumers gave up on (`dlq.<stream>.<consumer>` on the DLQ stream, the reason in
`Cdp-Dlq-*` headers). `--replay` republishes each one's original, read from the stream the dead letter's
subject names by the sequence it gives (never the dead letter's own copy or its claimed subject: see
`_replay`), and only then deletes it from the DLQ, so a crash in between replays it twice rather than
losing it. A dead letter whose original is gone from its stream (aged out, or erased: orchestration's
rendered actions) goes back from its own copy only to a subject its writer may publish itself. The replay
carries the `Nats-Msg-Id` `replay:<stream>:<consumer>:<original seq>`: a fresh id (the original one
could still be inside the stream's duplicate window and be dropped as a duplicate), the same for a retried
replay of the same dead letter, and a new one if the replayed message fails again (it has a new position).
Every consumer of that stream sees the message again; consumers are idempotent. A message the stream
sourced from another (ORCHESTRATION's inputs) goes back where it was first published, in that other stream
(nats-server's `Nats-Stream-Source` says where; a publish may not carry it), and is sourced again from there:
every consumer of the other stream sees it again too. A dead letter of one
event of an `events.raw` message of several (`Cdp-Dlq-Part`: the others were applied) replays that event
alone, as a message of its own, with `:<part>` after the sequence in its id. A listing or a replay
reads the DLQ only up to its last message when the command started: a replayed message that fails again
is a new dead letter, left for the operator, never replayed again by the same command. Past `--limit` (at
least 1) it says that more remain (`--json`: `more`), and run again it goes on with them. A STREAM or
CONSUMER that names nothing (a misspelling, the wrong case) is refused naming it, rather than shown as
having no dead letters. The table shows a long detail's start and its end, where the cause is (an
exception's message follows what was being done: "... : database or disk is full"), wrapped in its column;
`--wide` shows every detail whole, as `--json` does.

`cdpctl lag` shows every durable consumer of every stream: messages not yet delivered, delivered but not
acknowledged, and redelivered, and how long the oldest message it has not acknowledged has waited (the first
one its filter takes after its acknowledgement floor: one request more for each consumer with a backlog,
none for the others). A count alone does not tell a stuck consumer from a busy one; an age that keeps
growing does. `--watch N` samples twice, N seconds apart, and shows how fast each backlog drains (or grows),
and which consumers did not acknowledge their oldest in between (stuck).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import nats
from nats.js.errors import APIError, NotFoundError
from rich.table import Table

from cdp_kit.bus import rawevents, subjects
from cdp_kit.bus.consumer import (
    DLQ_CONSUMER,
    DLQ_DELIVERIES,
    DLQ_DETAIL,
    DLQ_PART,
    DLQ_REASON,
    DLQ_SEQ,
    DLQ_STREAM,
    DLQ_SUBJECT,
    DLQ_TIME,
    REPLAY_PREFIX,
    oldest_unacknowledged,
)
from cdp_kit.bus.streams import SOURCE_HEADER, source_of
from cdp_kit.natsroles import ORDINAL, PARTITION, ROLES
from cdpctl.common import console, nats_tls, nats_url, out
from cdpctl.platform import Workspace

DLQ = subjects.DLQ
# Characters of a dead letter's detail the table shows (the kit keeps up to 512); `--wide` shows all.
DETAIL_SHOWN = 200
_DLQ_HEADERS = (
    DLQ_REASON,
    DLQ_DETAIL,
    DLQ_SUBJECT,
    DLQ_STREAM,
    DLQ_SEQ,
    DLQ_PART,
    DLQ_CONSUMER,
    DLQ_DELIVERIES,
    DLQ_TIME,
)


@dataclass
class DeadLetter:
    seq: int  # its position in the DLQ stream
    stream: str
    consumer: str
    subject: str  # where it was first published, and where a replay goes
    original_seq: int
    reason: str
    detail: str
    deliveries: int
    at: str
    size: int
    # The letter is this part of the original message, which carries several (`cdp_kit.bus.rawevents`);
    # None: the whole message. A replay sends that part alone.
    part: int | None = None


def _dead_letter(msg) -> DeadLetter:
    headers = msg.headers or {}
    return DeadLetter(
        seq=msg.seq,
        stream=headers.get(DLQ_STREAM, ""),
        consumer=headers.get(DLQ_CONSUMER, ""),
        subject=headers.get(DLQ_SUBJECT, ""),
        original_seq=int(headers.get(DLQ_SEQ, "0") or 0),
        reason=headers.get(DLQ_REASON, ""),
        detail=headers.get(DLQ_DETAIL, ""),
        deliveries=int(headers.get(DLQ_DELIVERIES, "0") or 0),
        at=headers.get(DLQ_TIME, ""),
        size=len(msg.data or b""),
        part=int(headers[DLQ_PART]) if headers.get(DLQ_PART, "").isdigit() else None,
    )


def shown_detail(detail: str, limit: int = DETAIL_SHOWN) -> str:
    """`detail` whole when it fits `limit`, else its first quarter and its end with the middle elided: the
    end says why (the error), the start what was being done."""
    if len(detail) <= limit:
        return detail
    head = limit // 4
    return f"{detail[:head]} … {detail[-(limit - head - 3) :]}"


def dlq_subject(stream: str | None, consumer: str | None) -> str:
    if consumer and not stream:
        raise click.UsageError("name the STREAM before the CONSUMER")
    return subjects.dead_letter_filter(stream, consumer)


# How long a bus command waits for nats-server to answer it at all: a wedged server (SIGSTOP: the kernel
# still accepts on its port) answers nothing, and nats.py would retry its connect for as long as it lasts.
ANSWER_TIMEOUT = 10.0
T = TypeVar("T")


async def _quiet(_error: Exception) -> None:
    """nats.py's default error callback prints each failed attempt's traceback: the command says it once."""


async def connect(url: str, tls: ssl.SSLContext | None) -> nats.NATS:
    """One connection for one command: no reconnects (a server that goes away fails the command), TLS
    when the server wants it (`cdpctl.common.nats_tls`). A server that accepts and never answers fails it
    within nats.py's connect timeout (5 s: the wait for its INFO line)."""
    return await nats.connect(
        url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False, tls=tls, error_cb=_quiet
    )


# What a bus command meets when nats-server does not answer it (wedged, refusing, gone): `not_answering`.
NOT_ANSWERING = (TimeoutError, nats.errors.TimeoutError, nats.errors.NoServersError, OSError)


def not_answering(
    url: str, exc: BaseException, timeout: float = ANSWER_TIMEOUT, ws: Workspace | None = None
) -> click.ClickException:
    """The error that ends a bus command whose server did not answer (`exc`, one of `NOT_ANSWERING`):
    it names the server and where to look, no traceback."""
    from cdp_kit.urls import without_credentials

    why = "no answer" if isinstance(exc, TimeoutError | nats.errors.TimeoutError) else type(exc).__name__
    # The log of the platform the command acts on (CDP_HOME or the one found), not the default folder's.
    log_file = (ws.root if ws is not None else Path(".cdp")) / "nats" / "nats-server.log"
    return click.ClickException(
        f"nats-server at {without_credentials(url)} is not answering ({why} within {timeout:.0f} s); "
        f"`cdpctl status` shows its state (under `cdpctl up` its log is {log_file})"
    )


def answered(url: str, work: Coroutine[Any, Any, T], timeout: float = ANSWER_TIMEOUT, ws: Workspace | None = None) -> T:
    """Run one bus command's `work`; a server that does not answer within `timeout` (or refuses, or is
    gone) ends the command with an error naming it instead of a hang or a traceback."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await work

    try:
        return asyncio.run(bounded())
    except NOT_ANSWERING as exc:
        raise not_answering(url, exc, timeout, ws) from None


async def dead_letters(
    url: str, subject: str, *, limit: int, replay: bool, tls: ssl.SSLContext | None = None
) -> tuple[list[DeadLetter], int, bool]:
    """The first `limit` dead letters on `subject`, oldest first; replayed (and removed) when asked; and
    whether more were there when the command started (past `limit`: the operator is told)."""
    nc = await connect(url, tls)
    try:
        js = nc.jetstream()
        found: list[DeadLetter] = []
        replayed = 0
        try:
            info = await js.stream_info(DLQ)
        except NotFoundError:
            return found, replayed, False  # nothing was ever dead-lettered here
        seq = max(1, info.state.first_seq)
        # Only what the DLQ held when we looked: a replayed message that fails again is dead-lettered
        # behind this point, and reading on would replay it again, round after round, up to `limit`.
        last = info.state.last_seq
        while len(found) < limit and seq <= last:
            try:
                msg = await js.get_msg(DLQ, seq, subject=subject, next=True)
            except NotFoundError:
                break
            if msg.seq > last:
                break
            letter = _dead_letter(msg)
            found.append(letter)
            seq = msg.seq + 1
            if replay and await _replay(js, msg, letter):
                replayed += 1
        more = False
        if len(found) >= limit and seq <= last:
            try:
                more = (await js.get_msg(DLQ, seq, subject=subject, next=True)).seq <= last
            except NotFoundError:
                pass
        return found, replayed, more
    finally:
        await nc.close()


def _origin(dlq_subject: str) -> tuple[str, str] | None:
    """The stream and consumer a dead letter's own subject names (`dlq.<stream>.<durable>`). Unlike its
    headers, which whoever published it wrote, the subject is one nats-server let that publisher use: a
    service may dead-letter only on its own consumers' subjects."""
    prefix, _, rest = dlq_subject.partition(".")
    stream, _, durable = rest.partition(".")
    if prefix != subjects.DLQ_PREFIX or not stream or not durable or "." in durable:
        return None
    return stream, durable


def _left(letter: DeadLetter, why: str) -> bool:
    console.print(f"[yellow]dead letter {letter.seq} not replayed: {why}; left in place[/]")
    return False


async def _replay(js, msg, letter: DeadLetter) -> bool:
    """Send one dead letter's original message back to its stream, then remove the dead letter.

    What is sent is the original as the stream still holds it (its subject, body and headers), read by the
    sequence the dead letter names in the stream its subject names, never the dead letter's own copy or
    its `Cdp-Dlq-Subject`: every consuming service may publish dead letters, so a compromised one could
    write a "dead letter" whose subject is `privacy.deleted` or a `$JS.API` call and have the operator's
    replay (a user that may publish anything) send it. When the original is gone, the copy goes back only
    where its writer may publish itself (`_writer_may_publish`); else it is left for the operator."""
    origin = _origin(msg.subject)
    if origin is None:
        return _left(letter, f"its subject {msg.subject!r} names no stream and consumer")
    stream, durable = origin
    if (letter.stream, letter.consumer) != (stream, durable):
        return _left(
            letter, f"its headers name {letter.stream}/{letter.consumer} but it was written for {stream}/{durable}"
        )
    if letter.original_seq < 1:
        return _left(letter, f"it has no {DLQ_SEQ} header")
    try:
        original = await js.get_msg(stream, letter.original_seq)
        subject, data, kept = original.subject, original.data, original.headers
        source, first_subject = source_of(kept)
        if source:
            # A message its stream sourced from another (ORCHESTRATION's inputs: resolved events, segment and
            # profile changes, fired timers). nats-server refuses a publish carrying `Nats-Stream-Source` (only
            # sourcing writes it: the stored one is the server's word), and the consumer reads what the message
            # is from it: it goes back where it was first published, in the stream it came from, and is sourced
            # again from there with a header of its own.
            if not any(_matches(pattern, first_subject) for pattern in subjects.STREAM_SUBJECTS.get(source, ())):
                return _left(letter, f"it was sourced from {source}, which does not hold its first subject")
            subject = first_subject
            kept = {k: v for k, v in (kept or {}).items() if k != SOURCE_HEADER}
        if letter.part is not None:
            # One event of a message of several: that event alone goes back (the others were applied).
            try:
                parts = rawevents.events_of(data or b"", kept)
            except rawevents.NotABatch:
                parts = []
            if not rawevents.is_batch(kept) or letter.part >= len(parts):
                return _left(
                    letter,
                    f"it names part {letter.part} of {stream} message {letter.original_seq}, which has no such part",
                )
            data = parts[letter.part]
            kept = {k: v for k, v in (kept or {}).items() if k != rawevents.EVENTS_HEADER}
    except NotFoundError:
        # Gone from its stream: aged out, or erased on purpose (orchestration erases a rendered message
        # once its outcome is recorded, a failure included). The dead letter's own copy may go back only
        # where the service that wrote it may publish itself: then the replay lends it nothing.
        if not _writer_may_publish(stream, durable, letter.subject):
            return _left(
                letter,
                f"its original ({stream} message {letter.original_seq}) is no longer in the stream, and "
                f"the service that wrote it may not publish {letter.subject!r} itself",
            )
        subject, data, kept = letter.subject, msg.data, msg.headers
    headers = {k: v for k, v in (kept or {}).items() if k not in _DLQ_HEADERS}
    position = letter.original_seq if letter.part is None else f"{letter.original_seq}:{letter.part}"
    headers["Nats-Msg-Id"] = f"{REPLAY_PREFIX}{stream}:{durable}:{position}"
    try:
        await js.publish(subject, data or b"", headers=headers)
    except APIError as refused:  # the others are still replayed; this one stays for the operator
        return _left(letter, f"nats-server refused to store it again on {subject!r} ({refused.description})")
    await js.delete_msg(DLQ, letter.seq)
    return True


def _matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject `pattern` (`*`, `>`, and the roles' `{partition}` / `{ordinal}` placeholders
    standing for a number) covers `subject`."""
    wanted, given = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(given) > index
        if index >= len(given):
            return False
        if token == "*":
            continue
        if PARTITION in token or ORDINAL in token:
            shape = re.escape(token).replace(re.escape(PARTITION), r"\d+").replace(re.escape(ORDINAL), r"\d+")
            if not re.fullmatch(shape, given[index]):
                return False
        elif token != given[index]:
            return False
    return len(wanted) == len(given)


def _writer_may_publish(stream: str, durable: str, subject: str) -> bool:
    """Whether a service that may write dead letters for consumer `durable` of `stream` may itself publish
    `subject` into that stream (`cdp_kit.natsroles.ROLES`, the table nats-server's permissions come from)."""
    if not any(_matches(pattern, subject) for pattern in subjects.STREAM_SUBJECTS.get(stream, ())):
        return False
    for role in ROLES.values():
        keeps = any(c.stream == stream and _matches(c.name, durable) for c in role.consumers)
        if keeps and any(_matches(pattern, subject) for pattern in role.publishes):
            return True
    return False


async def missing_name(
    url: str, stream: str, consumer: str | None, tls: ssl.SSLContext | None = None
) -> click.BadParameter | None:
    """Why a STREAM (or its CONSUMER) with no dead letters names nothing, or None when both exist."""
    nc = await connect(url, tls)
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(stream)
        except NotFoundError:
            names = ", ".join(sorted(s.config.name for s in await js.streams_info()))
            return click.BadParameter(f"no stream named {stream!r} (streams: {names})", param_hint="STREAM")
        if consumer:
            try:
                await js.consumer_info(stream, consumer)
            except NotFoundError:
                return click.BadParameter(f"{stream} has no consumer named {consumer!r}", param_hint="CONSUMER")
        return None
    finally:
        await nc.close()


@click.command()
@click.argument("stream", required=False)
@click.argument("consumer", required=False)
@click.option("--replay", is_flag=True, help="republish each to its original subject, then remove it from the DLQ")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1), help="at most this many")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--wide", is_flag=True, help=f"every detail whole (the table shows {DETAIL_SHOWN} characters of one)")
@click.option("--nats", "url", help="NATS URL (default: the one `cdpctl up` runs)")
@click.pass_obj
def dlq(
    ws: Workspace,
    stream: str | None,
    consumer: str | None,
    replay: bool,
    limit: int,
    as_json: bool,
    wide: bool,
    url,
) -> None:
    """Dead letters (of one STREAM, or one of its CONSUMERs) with their reason; --replay sends them back."""
    subject = dlq_subject(stream, consumer)
    url = nats_url(ws, url)
    secured = nats_tls(ws, url)
    letters, replayed, more = answered(url, dead_letters(url, subject, limit=limit, replay=replay, tls=secured), ws=ws)
    if not letters and stream:
        # A misspelt name (the wrong case) finds no dead letters either: say so rather than show none. The
        # dead letters of a stream or consumer since removed are still listed (the check runs on none).
        problem = answered(url, missing_name(url, stream, consumer, secured), ws=ws)
        if problem is not None:
            raise problem
    if as_json:
        document = {"dead_letters": [asdict(d) for d in letters], "replayed": replayed, "more": more}
        out.print_json(json.dumps(document))
        return
    table = Table(title=f"dead letters ({subject})")
    for column in ("seq", "stream", "consumer", "subject", "original seq", "deliveries", "reason"):
        # A subject or id is folded, never cut: the operator reads where a replay would go.
        table.add_column(column, overflow="fold")
    # The detail wraps in its column (the widest share of the table) rather than being cut; "fold" breaks a
    # word longer than the column (a path, an id) instead of dropping its end.
    table.add_column("detail", overflow="fold", min_width=40, ratio=1)
    table.add_column("at")
    for d in letters:
        detail = d.detail if wide else shown_detail(d.detail)
        original = d.original_seq if d.part is None else f"{d.original_seq} (part {d.part})"
        row = (d.seq, d.stream, d.consumer, d.subject, original, d.deliveries, d.reason, detail, d.at)
        table.add_row(*(str(v) for v in row))
    out.print(table)
    if replay:
        out.print(f"replayed {replayed} of {len(letters)}")
    if more:
        # "replayed 1000 of 1000" alone read as the DLQ emptied, the rest unseen.
        out.print(
            f"more dead letters remain past the first {limit}: run it again, or with a larger --limit",
            soft_wrap=True,
            highlight=False,
        )


# The wait between `lag --watch`'s two samples (a name of its own: the tests act in between).
_pause = time.sleep


async def consumer_lag(url: str, tls: ssl.SSLContext | None = None) -> list[dict]:
    """Every durable consumer's row (the module docstring)."""
    return (await streams_and_lag(url, tls))[1]


async def streams_and_lag(url: str, tls: ssl.SSLContext | None = None) -> tuple[list[str], list[dict]]:
    """The names of the streams nats-server holds, and every durable consumer's row (`consumer_lag`)."""
    nc = await connect(url, tls)
    try:
        js = nc.jetstream()
        rows = []
        streams = sorted(await js.streams_info(), key=lambda s: s.config.name)
        for stream in streams:
            for info in sorted(await js.consumers_info(stream.config.name), key=lambda c: c.name):
                if not info.config.durable_name:
                    continue  # ephemeral: a reader, not a service's position
                oldest = await oldest_unacknowledged(js, info)  # None (and no request) without a backlog
                age = None if oldest is None else round(max(0.0, (datetime.now(UTC) - oldest).total_seconds()), 3)
                rows.append(
                    {
                        "stream": stream.config.name,
                        "consumer": info.name,
                        "pending": info.num_pending or 0,
                        "ack_pending": info.num_ack_pending or 0,
                        "redelivered": info.num_redelivered or 0,
                        "waiting": info.num_waiting or 0,
                        "oldest_age_seconds": age,
                        "ack_floor": (info.ack_floor.stream_seq if info.ack_floor is not None else 0) or 0,
                    }
                )
        return [stream.config.name for stream in streams], rows
    finally:
        await nc.close()


def age_text(seconds: float | None) -> str:
    """A waiting message's age as an operator reads it: "-" for none, "42s", "4m12s", "3h05m", "2d04h"."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _backlog(row: dict) -> int:
    return row["pending"] + row["ack_pending"]


def drained(before: list[dict], after: list[dict], seconds: float) -> list[dict]:
    """`after`'s rows, each with how its backlog (pending + acknowledgement pending) changed since `before`,
    `seconds` earlier: `backlog_change` (messages: negative shrinking), `drain_per_second` (positive
    draining, negative growing) and `floor_moved` (whether its acknowledgement floor moved: a backlog whose
    floor did not is stuck on its oldest message, however busy the stream). A consumer new since `before`
    has none of them."""
    earlier = {(row["stream"], row["consumer"]): row for row in before}
    rows = []
    for row in after:
        was = earlier.get((row["stream"], row["consumer"]))
        if was is None:
            rows.append({**row, "backlog_change": None, "drain_per_second": None, "floor_moved": None})
            continue
        change = _backlog(row) - _backlog(was)
        rows.append(
            {
                **row,
                "backlog_change": change,
                "drain_per_second": round(-change / seconds, 2) if seconds > 0 else None,
                "floor_moved": row["ack_floor"] != was["ack_floor"],
            }
        )
    return rows


def _trend(row: dict, seconds: float) -> str:
    if row["drain_per_second"] is None:
        return "new"
    rate, backlog = row["drain_per_second"], _backlog(row)
    if backlog and not row["floor_moved"]:
        return f"stuck: its oldest not acknowledged in {seconds:.0f}s"
    if rate > 0:
        return f"draining {rate:g}/s, empty in ~{age_text(backlog / rate)}" if backlog else f"drained {rate:g}/s"
    if rate < 0:
        return f"growing {-rate:g}/s"
    return "steady"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.5),
    metavar="SECONDS",
    help="sample again after SECONDS and show how fast each backlog drains or grows",
)
@click.option("--nats", "url", help="NATS URL (default: the one `cdpctl up` runs)")
@click.pass_obj
def lag(ws: Workspace, as_json: bool, watch: float | None, url) -> None:
    """Every durable consumer of every stream: pending, acknowledgement pending, redelivered, and the age of
    the oldest message not yet acknowledged; --watch N: the drain rate over N seconds."""
    url = nats_url(ws, url)
    tls = nats_tls(ws, url)
    rows = answered(url, consumer_lag(url, tls), ws=ws)
    seconds = 0.0
    if watch is not None:
        started = time.monotonic()
        _pause(watch)
        later = answered(url, consumer_lag(url, tls), ws=ws)
        seconds = time.monotonic() - started
        rows = drained(rows, later, seconds)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    title = "consumer lag" if watch is None else f"consumer lag, drain over {seconds:.1f}s"
    table = Table(title=title)
    columns = ["stream", "consumer", "pending", "ack pending", "redelivered", "waiting pulls", "oldest"]
    if watch is not None:
        columns.append("trend")
    for column in columns:
        table.add_column(column, justify="left" if column in ("stream", "consumer", "trend") else "right")
    for row in rows:
        cells = [row["stream"], row["consumer"], row["pending"], row["ack_pending"], row["redelivered"]]
        cells += [row["waiting"], age_text(row["oldest_age_seconds"])]
        if watch is not None:
            cells.append(_trend(row, seconds))
        table.add_row(*(str(v) for v in cells))
    out.print(table)
