"""How `cdpctl up` keeps a service running: restart with exponential backoff, as a process supervisor does.

A service that exits is started again after 1 s, then 2 s, 4 s … (capped) if it keeps crashing; once it
has stayed up for `stable_after` seconds the next crash starts again at 1 s. After `give_up_after`
crashes in a row, each sooner than `stable_after`, restarting is pointless (a bad configuration, a
corrupt store): the supervisor gives up and the platform stops, with the service's last log lines.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 60.0
    give_up_after: int = 5


@dataclass
class Backoff:
    policy: RestartPolicy = RestartPolicy()
    # Crashes in a row, each after less than `stable_after` seconds up.
    fast_crashes: int = 0

    def after_exit(self, uptime: float) -> float | None:
        """Seconds to wait before starting the service again, or None to give up."""
        if uptime >= self.policy.stable_after:
            self.fast_crashes = 0
        self.fast_crashes += 1
        if self.fast_crashes > self.policy.give_up_after:
            return None
        return min(self.policy.max_delay, self.policy.first_delay * 2 ** (self.fast_crashes - 1))


def describe_exit(returncode: int) -> str:
    """`exit code 3`, or `killed by SIGKILL` for a process a signal ended (a negative Popen returncode)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
