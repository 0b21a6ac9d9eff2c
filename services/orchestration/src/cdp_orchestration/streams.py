"""Orchestration's streams, its durable timers, and how an input message says what it is.

Three streams (names in `cdp_kit.bus.subjects`):

- `ORCHESTRATION`: the engine's one input, `orchestration.in.<p>`. Everything about a person reaches
  partition p here, in one order, so one engine applies it all: the API's commands are published to it
  directly; resolved events, segment changes, profile changes and fired timers are *sourced* into it by
  the server (stream sources with subject transforms `<prefix>.<p>` -> `orchestration.in.<p>`). A sourced
  message keeps its payload and its `Nats-Msg-Id`, and carries `Nats-Stream-Source: <stream> <seq>
  <filter> <transform> <original subject> ...`, which `kind_of` reads. Sources are not deduplicated
  against each other (two streams may use the same message id). Sourcing starts at the beginning of
  each source stream: a new deployment first catches up on what they still hold (profile changes fill
  the persons' views; events enter only the journeys that exist when they are applied). A start time
  (`opt_start_time`) was tried and dropped: with nats-server 2.15 a source created with one sometimes
  skipped a message published just after the stream was created, with no error and no lag reported.
- `ORCHESTRATION_TIMERS`: JetStream message schedules. A timer is one message on
  `orchestration.timers.<p>.<timer id>` with `Nats-Schedule: @at <RFC 3339 UTC>` and
  `Nats-Schedule-Target: orchestration.fired.<p>`; at that time the server publishes its payload to the
  target (which `ORCHESTRATION` sources) and removes the schedule. It survives a server restart. A timer
  is cancelled by a message with `Nats-Rollup: sub` on its subject (the schedule is rolled away; the
  marker itself expires after a minute). A stream with schedules may not itself source other streams
  (nats-server refuses: "stream source can not also schedule messages"), which is why timers have a
  stream of their own rather than living in `ORCHESTRATION`. It keeps no `max_age` (a timer may be
  weeks away); fired copies expire by `Nats-Schedule-TTL` once sourced.
- `ACTIONS`: `actions.<channel>.<p>`, one `ActionMessage` per sent action, `Nats-Msg-Id` = action id.
  Retention: limits (`max_age` = `CDP_ORCHESTRATION_RETENTION_DAYS`), but a message holds a person's
  rendered content and address, so it is kept no longer than its dispatch needs it: the channel's
  dispatcher erases it by sequence once the outcome is recorded (`dispatch.py`), and a privacy deletion
  erases the person's messages still waiting (`privacy.py`). What the age limit still removes is what
  no dispatcher here takes: `actions.crm` (sourced by the CRM connector) and channels not configured.
  Not a work queue: the CRM connector sources `actions.crm` from it, and a work-queue stream removes a
  message on acknowledgement without erasing its bytes from the files.

Scheduling and cancelling are ordinary messages: the engine publishes them from its outbox after the
change that asked for them is durable, with the timer id (or `cancel-<timer id>`) as message id, so a
crash never loses a timer and a re-publication is a JetStream duplicate. A cancellation that is lost
anyway (beyond the duplicate window) costs only a fire the instance ignores: the domain drops a timer
it no longer expects.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from nats.js import api
from nats.js.client import JetStreamContext

from cdp_kit.bus import OutMessage, subjects
from cdp_kit.bus import streams as kit_streams
from cdp_kit.bus.streams import SOURCE_HEADER as SOURCE_HEADER  # read by the input tests
from cdp_kit.bus.streams import ensure_created, source_of
from cdp_kit.streamtable import orchestration_input_stream as input_stream  # the provisioner's table
from cdp_kit.streamtable import orchestration_timers_stream as timers_stream

DAY = 86_400.0

SCHEDULER_HEADER = "Nats-Scheduler"
COMMAND_HEADER = "Cdp-Command"  # what an API command published to orchestration.in.<p> asks for

# How long a cancellation marker and a fired timer's copy stay in ORCHESTRATION_TIMERS.
MARKER_TTL = "60s"
FIRED_TTL = "1h"


def actions_stream(*, max_age: float = 7 * DAY) -> api.StreamConfig:
    return kit_streams.actions_stream(max_age=max_age).config()


async def ensure_streams(js: JetStreamContext, *, retention: float = 7 * DAY) -> None:
    """Create orchestration's streams when missing (the timers stream first: the input sources it). An
    existing stream is left as it is: its sources' start positions must not move."""
    await ensure_created(js, timers_stream(), actions_stream(max_age=retention), input_stream(max_age=retention))


# --- input kinds -----------------------------------------------------------------------------------------


def kind_of(headers: dict[str, str]) -> tuple[str, str]:
    """(stream, original subject) of a sourced message, or ("command", <command>) for an API command;
    ("", "") when it is neither."""
    stream, original = source_of(headers)
    if stream:
        return stream, original
    command = headers.get(COMMAND_HEADER)
    if command:
        return "command", command
    return "", ""


# --- timers ----------------------------------------------------------------------------------------------


#: The latest a timer is scheduled for: 2262-01-01T00:00:00Z. nats-server counts a schedule's time in int64
#: nanoseconds, which end on 2262-04-11: a schedule after that (a delay of 100000d) fired at once, and one
#: after 9999-12-31, which RFC 3339 cannot write, failed the batch of the person entering (held every person
#: of the partition through redeliveries, then dead-lettered the event). A journey's durations have no upper
#: bound (a delay or a wait's timeout of 99999999d validates): a timer due later is due then, as good as never.
LATEST_TIMER = 9_214_646_400.0


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def schedule(partition: int, timer_id: str, at: float, payload: dict, *, msg_id: str | None = None) -> OutMessage:
    """A durable timer firing `payload` into `orchestration.in.<partition>` at `at` (whole seconds, rounded
    up: a timer never fires early). `msg_id` (default: the timer id) differs for a timer scheduled again
    elsewhere (a merge moved its instance to another partition); one due after `LATEST_TIMER` is due then."""
    at = min(at, LATEST_TIMER)
    due = float(int(at)) if at == int(at) else float(int(at) + 1)
    return OutMessage(
        subject=subjects.orchestration_timer(partition, timer_id),
        payload=orjson.dumps(payload),
        msg_id=msg_id or timer_id,
        headers={
            "Nats-Schedule": f"@at {_rfc3339(due)}",
            "Nats-Schedule-Target": subjects.orchestration_fired(partition),
            "Nats-Schedule-TTL": FIRED_TTL,
        },
    )


def cancel(partition: int, timer_id: str) -> OutMessage:
    """Roll the timer's schedule away (a no-op when it fired already)."""
    return OutMessage(
        subject=subjects.orchestration_timer(partition, timer_id),
        payload=b"",
        msg_id=f"cancel-{timer_id}",
        headers={"Nats-Rollup": "sub", "Nats-TTL": MARKER_TTL},
    )


def command(partition: int, name: str, body: dict, msg_id: str) -> OutMessage:
    """An API command for the engine of the person's partition."""
    return OutMessage(
        subject=subjects.orchestration_in(partition),
        payload=orjson.dumps(body),
        msg_id=msg_id,
        headers={COMMAND_HEADER: name},
    )
