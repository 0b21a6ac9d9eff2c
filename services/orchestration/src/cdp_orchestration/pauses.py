"""The destinations whose provider asked for time, for one channel's dispatcher (`dispatch.py`).

A provider that answers with Retry-After (a 429, or a 5xx saying when to come back) pauses its destination
(`Channel.destination`: the provider account, or a webhook's host): the actions to it not started yet are
handed back for the rest of the pause instead of sent, using none of their attempts. A pause lasts what the
provider asked, for at most `at_most` seconds (CDP_ORCHESTRATION_PAUSE_SECONDS, an hour), and so does the
wait of the action it answered: a provider answering `Retry-After: 86400` by mistake, or a hostile webhook
receiver, silenced the whole destination for a day (bounded only by the action's own wait,
CDP_ORCHESTRATION_DEFER_SECONDS). The CRM connector caps a Retry-After at the same hour
(`cdp_crm.domain.budget.MAX_RETRY_AFTER`).

A pause the cap cut short ends with one probe: the first action to reach the destination after it is sent
alone, and the others reaching it while that send is out are handed back for `probe_every` seconds
(CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS, the dispatcher's probe cadence; a dispatcher works one batch at a
time, so only the probe's batch sees this), so a provider that still wants quiet is asked once, not by every
held action at once. The probe's answer decides: a Retry-After again pauses the destination again, within
the cap; any other answer (a send accepted, refused, failed, unanswered) ends the pause. A pause the provider
asked for in full ends when it said: the provider named that time itself.

The pauses are the dispatcher's memory (a replica's own; a restart forgets them, and the actions handed back
come back at the end of their own wait, at most the cap). Logs name the channel, never the destination: a
webhook's host can come from a person's trait.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cdp_orchestration.breaker import PROBE_EVERY
from cdp_orchestration.channels import Outcome

log = logging.getLogger("cdp.orchestration.dispatch")

PAUSE_AT_MOST = 3600.0  # seconds: the longest a Retry-After pauses a destination (CDP_ORCHESTRATION_PAUSE_SECONDS)
MAX_DESTINATIONS = 10_000  # paused destinations one dispatcher remembers


@dataclass
class Pause:
    """One destination's pause: until a monotonic time; `cut` when the provider asked for longer (a probe
    goes first once it ends); `probing` while that probe's send is out."""

    until: float
    cut: bool
    probing: bool = False


class Pauses:
    """The paused destinations of one channel."""

    def __init__(self, channel: str, *, at_most: float = PAUSE_AT_MOST, probe_every: float = PROBE_EVERY) -> None:
        if not at_most > 0:
            raise ValueError(f"at_most={at_most} is invalid: must be positive")
        self.channel = channel
        self.at_most = at_most
        self.probe_every = probe_every
        self._pauses: dict[str, Pause] = {}

    def gate(self, destination: str) -> tuple[float, bool]:
        """Whether an action goes to `destination` now: (seconds to hand it back for, False) while the
        destination is paused or its probe is out; (0, True) when this send is the probe after a pause the
        cap cut short (`probed` once it ended, sent or not); (0, False) otherwise."""
        pause = self._pauses.get(destination)
        if pause is None:
            return 0.0, False
        left = pause.until - time.monotonic()
        if left > 0:
            return left, False
        if not pause.cut:  # the provider's own time is up: it said to come back now
            del self._pauses[destination]
            return 0.0, False
        if pause.probing:
            return self.probe_every, False
        pause.probing = True
        return 0.0, True

    def probed(self, destination: str) -> None:
        """The probe's send ended, or was not made (the person deleted, the consent withdrawn): the next
        action to the destination is the probe, unless `heard` ended or renewed the pause."""
        pause = self._pauses.get(destination)
        if pause is not None:
            pause.probing = False

    def heard(self, destination: str, outcome: Outcome, *, probe: bool = False) -> float | None:
        """Keep the destination's pause by the provider's answer to a send. Its Retry-After (a retryable
        failure's `retry_after`) pauses it for that long, at most `at_most` seconds; any other answer to the
        probe ends the pause. The wait granted (the Retry-After, capped), or None when it named none."""
        asked = outcome.retry_after if not outcome.ok and outcome.retryable else None
        if asked is None:
            if probe and self._pauses.pop(destination, None) is not None:
                log.warning("a %s destination takes sends again after its pause: probe answered", self.channel)
            return None
        granted = min(asked, self.at_most)
        if granted <= 0:  # "now": no pause, and a probe's answer ends one
            if probe:
                self._pauses.pop(destination, None)
            return granted
        now = time.monotonic()
        pause = self._pauses.get(destination)
        if pause is not None and pause.until >= now + granted:
            return granted  # paused for longer already (an earlier answer)
        if pause is None or pause.until <= now:
            if asked > self.at_most:
                log.warning(
                    "a %s destination asked for %.0f s (Retry-After): paused for %.0f s "
                    "(CDP_ORCHESTRATION_PAUSE_SECONDS), then one probe",
                    self.channel,
                    asked,
                    granted,
                )
            if pause is None and len(self._pauses) >= MAX_DESTINATIONS:
                self._forget_ended(now)
        self._pauses[destination] = Pause(now + granted, cut=asked > self.at_most)
        return granted

    def _forget_ended(self, now: float) -> None:
        """Many destinations paused once each: those whose pause is over (a probe owed included) are forgotten,
        and all of them if none is - at worst a destination is sent to before its pause ends."""
        for destination in [d for d, pause in self._pauses.items() if pause.until <= now]:
            del self._pauses[destination]
        if len(self._pauses) >= MAX_DESTINATIONS:
            self._pauses.clear()
