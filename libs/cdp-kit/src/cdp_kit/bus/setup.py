"""JetStream API requests a service makes while it sets up its streams and consumers, asked again when a
stalled server does not answer in time.

nats-py gives each JetStream API request 5 s (its default, which the runtime's requests keep). A machine
that stalls longer while a service starts - CI's test workers outnumbering its cores, a node under memory
pressure, nats-server frozen for 7 s in an audit - left a request unanswered and the start failed with a
bare TimeoutError. What setup asks is idempotent (look up, create or update a stream or a durable
consumer to a spec; a create that reached the server before its answer was lost finds the object there
the next time), so a request not answered in time is asked again (`answered`), with a warning naming the
stream or consumer (never a payload), for `SETUP_PATIENCE` seconds in all: as long as `Bus.connect`
waits for a server at start, and as long as a connected server may stay silent before the connection is
left (`cdp_kit.bus.PING_INTERVAL` x (`MAX_OUTSTANDING_PINGS` + 1)).

Asking again cannot cure everything, and those stop at once with `SetupUnanswered` (an `Unavailable`:
the service stops, saying why): a request nats-server refused (a permissions violation: the NATS user
may not make it, and nats-server never answers it), and a connection that is closed for good. An answer
with an error (a stream that does not exist, a configuration the server rejects, no JetStream at all:
NoRespondersError) is passed on at once, as before: only silence is waited out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from cdp_kit.errors import Unavailable

log = logging.getLogger("cdp.bus")

T = TypeVar("T")

SETUP_PATIENCE = 30.0


class SetupUnanswered(Unavailable):
    """A setup request that stays unanswered: refused by nats-server, the connection closed, or silence for
    `SETUP_PATIENCE` seconds. The message names the stream or consumer, the reason and what to check."""


def _refusal(error: BaseException | None) -> str:
    """nats-server's refusal of a request ("" for anything else): its permissions violation, as reported."""
    text = str(error or "")
    return text.removeprefix("nats: ").strip() if "permissions violation" in text.lower() else ""


async def answered(
    js: JetStreamContext,
    what: str,
    request: Callable[[], Awaitable[T]],
    *,
    patience: float = SETUP_PATIENCE,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`request()`'s answer, asking again while it times out, for `patience` seconds in all. `what`
    names the stream or consumer set up ("stream EVENTS_RAW") in the warning and the error.
    `request` must be idempotent: it may have reached the server when its answer did not come back."""
    nc = js._nc
    deadline = clock() + patience
    asked = 0
    while True:
        error_before = nc.last_error
        asked += 1
        try:
            return await request()
        except nats.errors.TimeoutError:
            refusal = _refusal(nc.last_error) if nc.last_error is not error_before else ""
            if refusal:
                raise SetupUnanswered(
                    f"NATS refused a request setting up {what} ({refusal}): this NATS user may not make it; "
                    "check the service's CDP_NATS_CREDENTIALS_FILE against the server's users (`cdpctl up` "
                    "writes them; under Kubernetes the chart's nats-permissions)"
                ) from None
            if nc.is_closed:
                raise SetupUnanswered(
                    f"the NATS connection closed while setting up {what}; the service stops and is restarted"
                ) from None
            if clock() >= deadline:
                raise SetupUnanswered(
                    f"JetStream did not answer while setting up {what}: asked {asked} times over {patience:g} s "
                    f"({_server(nc)}, {'connected' if nc.is_connected else 'not connected'}); check that "
                    "nats-server is running with JetStream enabled and is not overloaded (its log, "
                    "`cdpctl status`)"
                ) from None
            log.warning(
                "JetStream did not answer in time while setting up %s (a stalled or busy server); asking again",
                what,
                extra={"asked": asked, "patience_s": patience},
            )


def _server(nc) -> str:
    url = getattr(nc, "connected_url", None)
    return f"server {url.hostname}:{url.port}" if url is not None else "no server"


async def consumer_exists(js: JetStreamContext, stream: str, durable: str) -> bool:
    """Whether the durable consumer `durable` of `stream` exists (a look-up that creates nothing: a service
    that drains what an older release left behind), asked again while a stalled server does not answer."""
    try:
        await answered(js, f"consumer {durable} of stream {stream}", lambda: js.consumer_info(stream, durable))
    except nats.js.errors.NotFoundError:
        return False
    return True
