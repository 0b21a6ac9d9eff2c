"""One API budget per CRM account: a burst window and a daily quota, shared by every sync and replica.

    budget = Budget.for_kind("hubspot", account="62515")
    r = budget.reserve(1, now)           # Reservation(granted=True, ticket=...) or (granted=False, wait_until=...)
    ... send the request ...
    budget.release(r.ticket, now)           # its answer (or its failure) came back: the slot starts to age
    budget.observe(response_headers, now)   # sync with what the CRM says is left
    budget.throttled(now, retry_after="7")  # a 429 / REQUEST_LIMIT_EXCEEDED: nothing before that time

Units are what the CRM counts: requests for HubSpot, Salesforce and Dynamics, credits for Zoho (an adapter
says what a call costs). The limits per kind (`DEFAULTS`) are the documented ones; a connection's `limits`
override them with the account's own contract.

Invariants:
- `reserve` never grants past either limit: over ANY `window` seconds at most `burst` units, and within a
  UTC day at most `daily` units (property-tested). A request that could never fit raises ValueError.
- The CRM's view, not only ours: the CRM counts a request when it arrives, which is after our grant by
  however long the machine, the store and the network took - no fixed margin bounds that. So a grant is
  held (open) from `reserve` until `release`, when its answer or its failure came back: the request can
  only have arrived before that moment, so its slot leaves the window at `release + window (+ margin)`,
  never earlier than it leaves the CRM's (property-tested with arrivals anywhere between grant and
  release). A grant never released (its sender died) is held `hold` seconds, longer than any request
  may take, then ages as if released then. A request that left the socket counts whatever came back -
  a 5xx, a timeout, a dropped connection: the CRM counted it; only one never sent is `refund`ed.
- The day is the CRM's too: grants still open when a day ends count in the new day as well (they may
  arrive after midnight). A day is a UTC day unless the budget names the zone whose midnight the CRM
  resets its daily limit at (`day_zone`: HubSpot resets at midnight in the portal's time zone setting, so
  a portal in Los Angeles counted by UTC days was refused from its limit at 10:00 until the next UTC
  midnight, 16:00 there, then refused again by HubSpot and held until 16:00 the day after - 30 hours for
  14). Salesforce's allocation is a rolling 24 hours (`ROLLING`), which no day boundary models: what was
  used a day ago frees as it goes, so its count follows the CRM's (`Sforce-Limit-Info`, lower as well as
  higher), and a full allocation - that count, or 403 REQUEST_LIMIT_EXCEEDED - waits `ROLLING_RECHECK`,
  then lets one request ask again, not until the next UTC midnight (up to a day while Salesforce freed
  calls all along); the others wait for its answer. An org with no allocation at all waits for the next day.
- The CRM's own headers (`observe`) correct this view downwards, never upwards: units used elsewhere
  (another app on the account) only shrink what is left.
- `Retry-After` (seconds or an HTTP date) blocks every grant until then, an hour at most
  (`MAX_RETRY_AFTER`: a CRM or a proxy answering `Retry-After: 999999999` would otherwise stop the
  account for years, kept in the store across restarts; if it still throttles after the hour, its next
  answer blocks again); a daily-limit answer blocks until the next UTC day.
- The state is plain data (`to_state` / `from_state`): a restart resumes the same day's count and the
  window's grants, so it does not reset the day. Replicas share one budget by storing that state and
  reserving under compare-and-set (the service's job); a clock that goes backwards never frees units.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

DAY = 86400.0
UTC = "UTC"
_EPOCH_DAY = date(1970, 1, 1).toordinal()
MAX_RETRY_AFTER = 3600.0  # seconds: the longest a Retry-After blocks the account
# CRMs whose daily allocation is a rolling 24 hours (Salesforce's API request limit), not a calendar day.
ROLLING = frozenset({"salesforce"})
# Seconds a full rolling allocation waits before one request asks again (its answer says what is used now).
ROLLING_RECHECK = 900.0
STATE_FORMAT = 2  # 1: grants as [at, units], every one answered (read and upgraded)


def day_of(now: float, zone: str = UTC) -> int:
    """The CRM's day holding `now`: days since 1970-01-01 of its date in `zone`."""
    if zone == UTC:
        return int(now // DAY)
    return datetime.fromtimestamp(now, ZoneInfo(zone)).date().toordinal() - _EPOCH_DAY


def day_start(day: int, zone: str = UTC) -> float:
    """When the CRM's day `day` starts: its midnight in `zone` (one a change skips: the instant after it)."""
    if zone == UTC:
        return day * DAY
    return datetime.combine(date.fromordinal(day + _EPOCH_DAY), time(0), tzinfo=ZoneInfo(zone)).timestamp()


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
    ticket: str = ""  # when granted: names the grant to `release` (or `refund`)


@dataclass
class Grant:
    at: float  # granted at; once released, when its answer came back
    units: int
    ticket: str = ""  # set while open: the request may still be on its way to the CRM

    @property
    def open(self) -> bool:
        return bool(self.ticket)


@dataclass
class Budget:
    account: str
    kind: str
    burst: int | None
    window: float | None
    daily: int | None
    # Timer slack between our clock and the CRM's: the window itself is kept from the answer (`release`).
    margin: float = 0.1
    grants: list[Grant] = field(default_factory=list)  # open ones, and released ones still in the window
    day: int = -1
    daily_used: int = 0
    blocked_until: float = 0.0
    last_seen: float = 0.0
    hold: float = 120.0  # the longest a request may be on its way: a grant never released is held this long
    issued: int = 0  # grants made so far: each one's ticket
    day_zone: str = UTC  # the IANA zone whose midnight starts the CRM's day (its daily limit's reset)
    recheck_at: float = 0.0  # a full rolling allocation: when one request may ask again (0: not full)

    @classmethod
    def for_kind(
        cls,
        kind: str,
        *,
        account: str,
        burst: int | None = None,
        window: float | None = None,
        daily: int | None = None,
        margin: float = 0.1,
        hold: float = 120.0,
        day_zone: str = UTC,
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
            hold=hold,
            day_zone=day_zone,
        )

    # --- days ------------------------------------------------------------------------------------

    def day_of(self, now: float) -> int:
        return day_of(now, self.day_zone)

    def day_start(self, day: int) -> float:
        return day_start(day, self.day_zone)

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
            if self.kind not in ROLLING:
                return Reservation(False, wait_until=self.day_start(self.day + 1), reason="daily")
            if not self.recheck_at:
                self.recheck_at = now + ROLLING_RECHECK
            if now < self.recheck_at:
                return Reservation(False, wait_until=self.recheck_at, reason="daily")
            # Calls made a day ago have freed room since: this one asks (its answer's count follows), the
            # others wait for it.
            self.recheck_at = now + ROLLING_RECHECK
        elif self.recheck_at:
            self.recheck_at = 0.0
        if self.burst is not None and self.window is not None:
            used = self._used()
            if used + units > self.burst:
                # The earliest moment enough grants can have left the window: an open one leaves a window
                # after its answer, which comes back no earlier than now.
                excess = used + units - self.burst
                for leaves, n in sorted((self._leaves(g, now), g.units) for g in self.grants):
                    excess -= n
                    if excess <= 0:
                        return Reservation(False, wait_until=leaves, reason="burst")
        self.issued += 1
        ticket = str(self.issued)
        self.grants.append(Grant(now, units, ticket))
        self.daily_used += units
        return Reservation(True, units, ticket=ticket)

    def release(self, ticket: str, now: float) -> None:
        """The answer to the grant's request - or its failure: a 5xx, a dropped connection - came back at
        `now`: the CRM counted it, if at all, before now, so from now on its slot ages. Not for a request
        whose fate is unknown (a timeout: the CRM may still be about to take it): that one is held
        `hold` seconds."""
        now = self._advance(now)
        for grant in self.grants:
            if grant.ticket == ticket:
                grant.at, grant.ticket = max(grant.at, now), ""
                self.grants.sort(key=lambda g: g.at)
                self._advance(now)  # without a window, a released grant has nothing left to count
                return

    def refund(self, ticket: str, now: float) -> None:
        """Give back the units of a grant whose request was never sent. Not one that failed, timed out or
        lost its connection: it left the socket, and the CRM counted it."""
        now = self._advance(now)
        for i, grant in enumerate(self.grants):
            if grant.ticket == ticket:
                del self.grants[i]
                self.daily_used = max(0, self.daily_used - grant.units)
                return

    @property
    def span(self) -> float:
        return (self.window or 0.0) + self.margin

    def _used(self) -> int:
        return sum(g.units for g in self.grants)

    def _leaves(self, grant: Grant, now: float) -> float:
        """When `grant` can have left the window at the earliest."""
        if grant.open:
            return min(max(now, grant.at), grant.at + self.hold) + self.span
        return grant.at + self.span

    def _advance(self, now: float) -> float:
        # A clock behind the last time seen (another replica's, or a step back) is treated as that time,
        # so it can neither free window units early nor roll the day back.
        now = max(now, self.last_seen)
        self.last_seen = now
        # An open grant stays until released, or until `hold` says its sender is gone. (Every change passes
        # here, over a window of up to `burst` grants: the bounds are read once, a grant's `open` inline.)
        hold, since = self.hold, now - self.span
        self.grants = [g for g in self.grants if (g.at + hold if g.ticket else g.at) > since]
        day = self.day_of(now)
        if day > self.day:
            # What is still on its way may reach the CRM after midnight: it counts in the new day too.
            self.day, self.daily_used = day, sum(g.units for g in self.grants if g.open)
        return now

    # --- what the CRM says -----------------------------------------------------------------------

    def throttled(self, now: float, *, retry_after: str | float | None = None, daily: bool = False) -> None:
        """The CRM refused a request for its limits: honour its Retry-After, or wait for the next day."""
        now = self._advance(now)
        if daily:
            if self.daily is not None:
                self.daily_used = max(self.daily_used, self.daily)
            until = self.day_start(self.day + 1)
            if self.kind in ROLLING:  # what a day ago used frees as it goes: asked again soon
                until = self.recheck_at = min(until, now + ROLLING_RECHECK)
            self.blocked_until = max(self.blocked_until, until)
        wait = parse_retry_after(retry_after, now)
        if wait is None and not daily:
            # Throttled without a hint. The answer's limit headers were observed first (`observe`): when
            # they said the CRM's window is full, it is full here too, and reservations wait until its
            # oldest units leave it - no more. When our window still has room after that, the refusal was
            # not about this window (a transient throttle, another limit): a short pause, not a whole
            # window (a 429 every few seconds would otherwise stop the sync altogether).
            full = self.burst is not None and self.window is not None and self._used() >= self.burst
            wait = None if full else now + 1.0
        if wait is not None:
            self.blocked_until = max(self.blocked_until, wait)

    def observe(self, headers: Mapping[str, str], now: float) -> None:
        """Sync with the limit headers of a CRM answer; they can only lower what is left."""
        now = self._advance(now)
        h = {k.lower(): v for k, v in headers.items()}
        burst_left: int | None = None
        daily_left: int | None = None
        none_at_all = False  # the CRM allows no request at all today
        if self.kind == "hubspot":
            burst_left = _int(h.get("x-hubspot-ratelimit-remaining"))
            daily_left = _int(h.get("x-hubspot-ratelimit-daily-remaining"))
            burst_max = _int(h.get("x-hubspot-ratelimit-max"))
            if burst_max is not None and self.burst is not None and 0 < burst_max < self.burst:
                self.burst = burst_max  # the app's real allowance is lower than configured
            daily_max = _int(h.get("x-hubspot-ratelimit-daily"))
            if daily_max is not None and self.daily is not None and 0 < daily_max < self.daily:
                self.daily = daily_max
            elif daily_max == 0:
                daily_left = 0  # none at all today: wait for the next day (a limit of 0 no request could fit)
        elif self.kind == "salesforce":
            usage = h.get("sforce-limit-info", "")
            for part in usage.split(","):
                name, _, value = part.strip().partition("=")
                if name == "api-usage":
                    used, _, limit = value.partition("/")
                    used_n, limit_n = _int(used), _int(limit)
                    if limit_n is not None and limit_n > 0 and (self.daily is None or limit_n < self.daily):
                        self.daily = limit_n
                    if limit_n == 0:
                        daily_left, none_at_all = 0, True  # none at all today (a limit of 0 no request fits)
                    elif used_n is not None and self.daily is not None:
                        daily_left = self.daily - used_n
        elif self.kind == "dynamics":
            burst_left = _int(h.get("x-ms-ratelimit-burst-remaining-xrm-requests"))
        elif self.kind == "zoho":
            daily_left = _int(h.get("x-ratelimit-remaining"))
        if "retry-after" in h:
            self.throttled(now, retry_after=h["retry-after"])
        if daily_left is not None and self.daily is not None:
            counted = self.daily - max(0, daily_left)
            if self.kind in ROLLING and not none_at_all:
                # The CRM's count over the last 24 hours, lower too when a day-old use has freed, with what
                # is still on its way (not counted in it yet).
                self.daily_used = counted + sum(g.units for g in self.grants if g.open)
            else:
                self.daily_used = max(self.daily_used, counted)
            if none_at_all and self.kind in ROLLING:
                self.recheck_at = self.day_start(self.day + 1)
        if burst_left is not None and self.burst is not None and self.window is not None:
            unseen = (self.burst - max(0, burst_left)) - self._used()
            if unseen > 0:
                # Units the CRM counted that we did not grant (another app, a lost state): held as if
                # answered now, so they leave our window no earlier than the CRM's.
                self.grants.append(Grant(now, unseen))

    # --- status and persistence ------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        now = self._advance(now)
        used = self._used() if self.window is not None else 0
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
            "grants": [[g.at, g.units, g.ticket] for g in self.grants],
            "day": self.day,
            "daily_used": self.daily_used,
            "blocked_until": self.blocked_until,
            "last_seen": self.last_seen,
            "hold": self.hold,
            "issued": self.issued,
            "day_zone": self.day_zone,
            "recheck_at": self.recheck_at,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Budget:
        if state.get("format") not in (1, STATE_FORMAT):
            raise ValueError(f"budget state format {state.get('format')!r} is not {STATE_FORMAT}")
        # Format 1 (before grants were held until answered) kept [at, units]: read as answered then.
        grants = [Grant(float(g[0]), int(g[1]), str(g[2]) if len(g) > 2 else "") for g in state["grants"]]
        # A block stored before Retry-After was capped (years) lasts a capped Retry-After from the last
        # change; a daily-limit block (the next UTC day's start) is kept.
        last_seen, day = float(state["last_seen"]), int(state["day"])
        blocked = float(state["blocked_until"])
        day_zone = str(state.get("day_zone") or UTC)
        if blocked > last_seen + MAX_RETRY_AFTER and blocked != day_start(day + 1, day_zone):
            blocked = last_seen + MAX_RETRY_AFTER
        return cls(
            state["account"],
            state["kind"],
            state["burst"],
            state["window"],
            state["daily"],
            state["margin"],
            grants,
            day,
            int(state["daily_used"]),
            blocked,
            last_seen,
            float(state.get("hold", 120.0)),
            int(state.get("issued", 0)),
            day_zone,
            float(state.get("recheck_at", 0.0)),
        )

    def move_day_zone(self, day_zone: str) -> None:
        """Count days in `day_zone` from now on (the connection's `limits.day_zone` changed): today is the
        zone's day of the last change seen; the day's count stays."""
        self.day_zone = day_zone
        if self.day >= 0:
            self.day = self.day_of(self.last_seen)


def parse_retry_after(value: str | float | None, now: float) -> float | None:
    """The time a Retry-After value (seconds, or an HTTP date) points at, `MAX_RETRY_AFTER` from now at the
    latest; None if absent or unreadable."""
    if value is None:
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(text).timestamp() - now
            except (TypeError, ValueError, OverflowError):
                return None
    if math.isnan(seconds):
        return None
    return now + min(max(0.0, seconds), MAX_RETRY_AFTER)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except (ValueError, OverflowError):  # not a number, or inf / 1e400
        return None
