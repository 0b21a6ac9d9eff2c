"""Each provider destination's breaker, for one channel's dispatcher (`dispatch.py`).

A provider that does not answer (a wedged relay that accepts connections and says nothing: outcome reason
``timeout``) would make every attempt wait the adapter's whole timeout, and a batch of them hold the
dispatcher so long that the attempts behind them could not keep their back-off. So each destination
(`Channel.destination`) has a breaker: after `after` (CDP_ORCHESTRATION_BREAKER_TIMEOUTS, 3) timeouts in a
row with no answer between them, it is open and the dispatcher stops waiting on it. While open, it is
probed at most every `probe_every` (CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS, 5) seconds after the last
unanswered probe: by the channel itself where it can ask without sending (`Channel.probe`: email's relay
greeting), in a task of its own that no batch waits for; else by one action's send, one at a time. Every
other action's attempt is skipped (`gate` says SKIP): the dispatcher counts it as made and failed
(``timeout``) without sending it. Whatever answer the provider gives (a greeting, a send accepted,
refused, a connection refused, a 5xx) closes the breaker (`heard`). Its opening and closing are logged
once each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from cdp_orchestration.channels import Action, Channel, Outcome

log = logging.getLogger("cdp.orchestration.dispatch")

TIMEOUT = "timeout"  # an adapter's reason for a provider that said nothing in time (`channels.base`)
BREAKER_AFTER = 3  # timeouts in a row that open a destination's breaker (CDP_ORCHESTRATION_BREAKER_TIMEOUTS)
PROBE_EVERY = 5.0  # seconds before an open breaker's next probe (CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS)
MAX_DESTINATIONS = 10_000  # destinations with a run of timeouts one dispatcher remembers

# What `Breakers.gate` says of an attempt: send it; send it as the destination's probe; skip it (no send).
SEND, PROBE, SKIP = "send", "probe", "skip"


@dataclass
class Breaker:
    """One destination's run of timeouts: open once `after` came in a row."""

    timeouts: int = 0  # timeouts in a row, no answer between them
    open: bool = False
    probing: bool = False  # a probe is being sent
    next_probe: float = 0.0  # monotonic time from which an open breaker may send a probe
    skipped: int = 0  # attempts counted without a send while open


class Breakers:
    """The breakers of one channel's destinations, while the provider there has timed out since it last
    answered."""

    def __init__(self, channel: Channel, *, after: int = BREAKER_AFTER, probe_every: float = PROBE_EVERY) -> None:
        self.channel = channel
        self.after = after
        self.probe_every = probe_every
        self._breakers: dict[str, Breaker] = {}
        self._probes: set[asyncio.Task] = set()  # probes being asked (`Channel.probe`), held till they end

    def gate(self, destination: str, action: Action) -> tuple[str, Breaker | None]:
        """Whether an attempt of `action` goes to `destination` now: (SEND, None) while its breaker is
        closed; (PROBE, breaker) when this send is the open breaker's probe (`probed` once it ends); (SKIP,
        breaker) otherwise, counted in the breaker's `skipped`. A channel that probes without sending is
        asked here when a probe is due, in a task of its own."""
        breaker = self._breakers.get(destination)
        if breaker is None or not breaker.open:
            return SEND, None
        due = not breaker.probing and time.monotonic() >= breaker.next_probe
        if self.channel.probes:
            if due:  # asked away from the batch: nothing waits on it
                breaker.probing = True
                task = asyncio.create_task(self._probe(destination, breaker, action))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            breaker.skipped += 1
            return SKIP, breaker
        if not due:
            breaker.skipped += 1
            return SKIP, breaker
        breaker.probing = True  # this one's send asks whether the provider answers again
        return PROBE, breaker

    @staticmethod
    def probed(breaker: Breaker) -> None:
        """The send that was `breaker`'s probe has ended, answered or not (`heard` says which)."""
        breaker.probing = False

    def heard(self, destination: str, outcome: Outcome) -> None:
        """Keep the destination's breaker: a timeout counts toward opening it (and an open one waits
        `probe_every` before its next probe); any answer closes it."""
        if outcome.ok or outcome.reason != TIMEOUT:
            breaker = self._breakers.pop(destination, None)
            if breaker is not None and breaker.open:
                log.warning(
                    "a %s destination answers again: breaker closed; %d attempts were counted without a send meanwhile",
                    self.channel.name,
                    breaker.skipped,
                )
            return
        if len(self._breakers) >= MAX_DESTINATIONS and destination not in self._breakers:
            self._breakers.clear()  # many destinations timing out once each: start the counts again
        breaker = self._breakers.setdefault(destination, Breaker())
        breaker.timeouts += 1
        if breaker.open or breaker.timeouts >= self.after:
            breaker.next_probe = time.monotonic() + self.probe_every
        if not breaker.open and breaker.timeouts >= self.after:
            breaker.open = True
            log.warning(
                "a %s destination does not answer (%d timeouts in a row): breaker open; one probe at a time, the other "
                "attempts counted without a send",
                self.channel.name,
                breaker.timeouts,
            )

    async def _probe(self, destination: str, breaker: Breaker, action: Action) -> None:
        """Ask the channel whether the destination answers (`Channel.probe`, no send): it closes the
        breaker if it does; otherwise the next probe is due `probe_every` from now."""
        try:
            answered = await self.channel.probe(action)
        except Exception as exc:
            log.warning("probe of %s raised: %s", self.channel.name, type(exc).__name__)
            answered = False
        finally:
            breaker.probing = False
        if answered:
            self.heard(destination, Outcome.accepted())
        else:
            breaker.next_probe = time.monotonic() + self.probe_every
