"""One API budget per CRM account: a burst window and a daily quota, shared by every sync and replica.

    budget = Budget.for_kind("hubspot", account="62515")
    r = budget.reserve(1, now)           # Reservation(granted=True) or (granted=False, wait_until=...)
    ... send the request ...
    budget.observe(response_headers, now)   # sync with what the CRM says is left
    budget.throttled(now, retry_after="7")  # a 429 / REQUEST_LIMIT_EXCEEDED: nothing before that time

Units are what the CRM counts: requests for HubSpot, Salesforce and Dynamics, credits for Zoho (an adapter
says what a call costs). The limits per kind (`DEFAULTS`) are the documented ones; a connection's `limits`
override them with the account's own contract.

Invariants:
- `reserve` never grants past either limit: over ANY `window` seconds at most `burst` units, and within a
  UTC day at most `daily` units (property-tested). A request that could never fit raises ValueError.
- The window is counted from the grant and padded by `margin` seconds, since the CRM counts the request
  when it arrives, a little after the grant; the CRM's own headers (`observe`) then correct this view
  downwards, never upwards: units used elsewhere (another app on the account) only shrink what is left.
- `Retry-After` (seconds or an HTTP date) blocks every grant until then; a daily-limit answer blocks
  until the next UTC day.
- The state is plain data (`to_state` / `from_state`): a restart resumes the same day's count and the
  window's grants, so it does not reset the day. Replicas share one budget by storing that state and
  reserving under compare-and-set (the service's job); a clock that goes backwards never frees units.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DAY = 86400.0
STATE_FORMAT = 1


@dataclass(frozen=True)
class Policy:
    burst: int | None  # units per window
    window: float | None  # seconds
    daily: int | None  # units per UTC day


# The documented limits: HubSpot 190 requests / 10 s per private app and a daily cap (250,000 on the
# lowest tiers); Salesforce a daily (rolling 24 h) API request allocation, 100,000 at Enterprise edition's
# base, reported by Sforce-Limit-Info; Dataverse service protection 6,000 requests per 5 minutes per user;
# Zoho CRM API credits per 24 hours (50,000 at Enterprise's base).
DEFAULTS: dict[str, Policy] = {
    "hubspot": Policy(burst=190, window=10.0, daily=250_000),
    "salesforce": Policy(burst=None, window=None, daily=100_000),
    "dynamics": Policy(burst=6000, window=300.0, daily=None),
    "zoho": Policy(burst=None, window=None, daily=50_000),
}


@dataclass(frozen=True)
class Reservation:
    granted: bool
    units: int = 0
    wait_until: float = 0.0  # when not granted: the earliest time a retry can succeed
    reason: str = ""  # "burst" | "daily" | "retry_after"


@dataclass
class Budget:
    account: str
    kind: str
    burst: int | None
    window: float | None
    daily: int | None
    margin: float = 0.5
    grants: list[tuple[float, int]] = field(default_factory=list)  # (granted at, units) within the window
    day: int = -1
    daily_used: int = 0
    blocked_until: float = 0.0
    last_seen: float = 0.0

    @classmethod
    def for_kind(
        cls,
        kind: str,
        *,
        account: str,
        burst: int | None = None,
        window: float | None = None,
        daily: int | None = None,
        margin: float = 0.5,
    ) -> Budget:
        """The documented limits of `kind`, each overridden when given."""
        policy = DEFAULTS[kind]
        return cls(
            account,
            kind,
            burst if burst is not None else policy.burst,
            window if window is not None else policy.window,
            daily if daily is not None else policy.daily,
            margin,
        )

    # --- reserving -------------------------------------------------------------------------------

    def reserve(self, units: int, now: float) -> Reservation:
        """Grant `units` now, or say when to come back. Never grants past a limit."""
        if units <= 0:
            raise ValueError("units must be positive")
        if (self.burst is not None and units > self.burst) or (self.daily is not None and units > self.daily):
            raise ValueError(f"{units} units can never fit this budget (burst {self.burst}, daily {self.daily})")
        now = self._advance(now)
        if now < self.blocked_until:
            return Reservation(False, wait_until=self.blocked_until, reason="retry_after")
        if self.daily is not None and self.daily_used + units > self.daily:
            return Reservation(False, wait_until=(self.day + 1) * DAY, reason="daily")
        if self.burst is not None and self.window is not None:
            used = sum(n for _, n in self.grants)
            if used + units > self.burst:
                # The earliest moment enough of the oldest grants have left the window.
                excess = used + units - self.burst
                for granted_at, n in self.grants:
                    excess -= n
                    if excess <= 0:
                        return Reservation(False, wait_until=granted_at + self.span, reason="burst")
        if self.window is not None:
            self.grants.append((now, units))
        self.daily_used += units
        return Reservation(True, units)

    def refund(self, units: int, now: float) -> None:
        """Give back units reserved for a request that was never sent (not one that failed: the CRM
        counted that)."""
        now = self._advance(now)
        self.daily_used = max(0, self.daily_used - units)
        for i in range(len(self.grants) - 1, -1, -1):
            at, n = self.grants[i]
            if n <= units:
                units -= n
                del self.grants[i]
            else:
                self.grants[i] = (at, n - units)
                units = 0
            if units == 0:
                break

    @property
    def span(self) -> float:
        return (self.window or 0.0) + self.margin

    def _advance(self, now: float) -> float:
        # A clock behind the last time seen (another replica's, or a step back) is treated as that time,
        # so it can neither free window units early nor roll the day back.
        now = max(now, self.last_seen)
        self.last_seen = now
        while self.grants and self.grants[0][0] <= now - self.span:
            self.grants.pop(0)
        day = int(now // DAY)
        if day > self.day:
            self.day, self.daily_used = day, 0
        return now

    # --- what the CRM says -----------------------------------------------------------------------

    def throttled(self, now: float, *, retry_after: str | float | None = None, daily: bool = False) -> None:
        """The CRM refused a request for its limits: honour its Retry-After, or wait for the next day."""
        now = self._advance(now)
        if daily:
            if self.daily is not None:
                self.daily_used = max(self.daily_used, self.daily)
            self.blocked_until = max(self.blocked_until, (self.day + 1) * DAY)
        wait = parse_retry_after(retry_after, now)
        if wait is None and not daily:
            # Throttled without a hint. The answer's limit headers were observed first (`observe`): when
            # they said the CRM's window is full, it is full here too, and reservations wait until its
            # oldest units leave it - no more. When our window still has room after that, the refusal was
            # not about this window (a transient throttle, another limit): a short pause, not a whole
            # window (a 429 every few seconds would otherwise stop the sync altogether).
            full = self.burst is not None and self.window is not None and sum(n for _, n in self.grants) >= self.burst
            wait = None if full else now + 1.0
        if wait is not None:
            self.blocked_until = max(self.blocked_until, wait)

    def observe(self, headers: Mapping[str, str], now: float) -> None:
        """Sync with the limit headers of a CRM answer; they can only lower what is left."""
        now = self._advance(now)
        h = {k.lower(): v for k, v in headers.items()}
        burst_left: int | None = None
        daily_left: int | None = None
        if self.kind == "hubspot":
            burst_left = _int(h.get("x-hubspot-ratelimit-remaining"))
            daily_left = _int(h.get("x-hubspot-ratelimit-daily-remaining"))
            burst_max = _int(h.get("x-hubspot-ratelimit-max"))
            if burst_max is not None and self.burst is not None and 0 < burst_max < self.burst:
                self.burst = burst_max  # the app's real allowance is lower than configured
            daily_max = _int(h.get("x-hubspot-ratelimit-daily"))
            if daily_max is not None and self.daily is not None and daily_max < self.daily:
                self.daily = daily_max
        elif self.kind == "salesforce":
            usage = h.get("sforce-limit-info", "")
            for part in usage.split(","):
                name, _, value = part.strip().partition("=")
                if name == "api-usage":
                    used, _, limit = value.partition("/")
                    used_n, limit_n = _int(used), _int(limit)
                    if limit_n is not None and (self.daily is None or limit_n < self.daily):
                        self.daily = limit_n
                    if used_n is not None and self.daily is not None:
                        daily_left = self.daily - used_n
        elif self.kind == "dynamics":
            burst_left = _int(h.get("x-ms-ratelimit-burst-remaining-xrm-requests"))
        elif self.kind == "zoho":
            daily_left = _int(h.get("x-ratelimit-remaining"))
        if "retry-after" in h:
            self.throttled(now, retry_after=h["retry-after"])
        if daily_left is not None and self.daily is not None:
            self.daily_used = max(self.daily_used, self.daily - max(0, daily_left))
        if burst_left is not None and self.burst is not None and self.window is not None:
            used = sum(n for _, n in self.grants)
            unseen = (self.burst - max(0, burst_left)) - used
            if unseen > 0:
                # Units the CRM counted that we did not grant (another app, a lost state): held as if
                # granted now, so they leave our window no earlier than the CRM's.
                self.grants.append((now, unseen))

    # --- status and persistence ------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        now = self._advance(now)
        used = sum(n for _, n in self.grants)
        return {
            "account": self.account,
            "kind": self.kind,
            "burst_limit": self.burst,
            "burst_window_seconds": self.window,
            "burst_remaining": None if self.burst is None else max(0, self.burst - used),
            "daily_limit": self.daily,
            "daily_used": self.daily_used,
            "daily_remaining": None if self.daily is None else max(0, self.daily - self.daily_used),
            "blocked_until": self.blocked_until if self.blocked_until > now else 0.0,
        }

    def to_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "account": self.account,
            "kind": self.kind,
            "burst": self.burst,
            "window": self.window,
            "daily": self.daily,
            "margin": self.margin,
            "grants": [[at, n] for at, n in self.grants],
            "day": self.day,
            "daily_used": self.daily_used,
            "blocked_until": self.blocked_until,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Budget:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"budget state format {state.get('format')!r} is not {STATE_FORMAT}")
        return cls(
            state["account"],
            state["kind"],
            state["burst"],
            state["window"],
            state["daily"],
            state["margin"],
            [(float(at), int(n)) for at, n in state["grants"]],
            int(state["day"]),
            int(state["daily_used"]),
            float(state["blocked_until"]),
            float(state["last_seen"]),
        )


def parse_retry_after(value: str | float | None, now: float) -> float | None:
    """The time a Retry-After value (seconds, or an HTTP date) points at; None if absent or unreadable."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return now + max(0.0, float(value))
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            return email.utils.parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError):
            return None
    return now + max(0.0, seconds) if math.isfinite(seconds) else None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except ValueError:
        return None
