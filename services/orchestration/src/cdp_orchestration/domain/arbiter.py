"""One arbiter per person: every action from every journey passes here before any channel sees it.

`decide(state, action, view, rules, now) -> Ruling` takes a proposed action and returns the person's new
`PersonState` and the decisions taken, each with a kind and a reason an operator can read:

    sent                 go now (the service renders the template and hands it to the channel)
    deferred until T     quiet hours, or a full frequency cap (until the start of its next period), in the
                         person's zone: held and decided again at T, never dropped
    superseded by J      a higher-priority action of journey J took the cap's place this one had (or wanted
                         at the same instant): held until the cap's next period, never dropped
    capped by C          frequency cap C is full and the action opted out of waiting (`on_cap: drop`)
    suppressed by R      suppression rule R applies (an event within a window, a condition, or both)
    no consent for P     the profile does not grant purpose P (or refuses the channel)
    awaiting approval    held until someone approves or rejects it, or it expires
    rejected / expired / withdrawn    final answers for held actions

Invariants:
- Nothing is dropped silently: every proposed action gets a decision, and every held one a later one, until
  a final one. A held action whose wait would outlast its validity (its own `expires_at`, or the rules'
  `max_hold` after it was proposed) expires at once, with the reason it would have waited for.
- Nothing is sent twice: a proposal whose action id is held, or was sent in the last eight days, is a
  redelivery and gets no new decision (the service's effectively-once processing covers the rest).
- Checks run in this order, and all of them again when a held action comes due (consent withdrawn or a
  ticket opened meanwhile stops the send): validity, the profile's lag (below), consent, suppression, approval,
  quiet hours, caps.
- Priority decides over a slot: actions are ranked by journey priority, then the action's `rank_by` score,
  then proposal time and id (a total order, so a replay gives the same outcome). A cap's room in a period
  is taken by the sends in that period and held for the deferred actions due in it. An action that finds
  the room taken only by lower-ranked deferred actions takes it, and those are superseded (deferred to the
  cap's next period); one that finds it taken by sends or by higher-ranked held actions waits for the next
  period. Actions due at the same instant (a new proposal, and held ones whose time has come) are decided
  together, highest first; one turned away because a higher one just took the last place is superseded by
  that journey. Sent actions are never taken back. Actions awaiting approval hold no room (an approval may
  never come).
- A cap is never exceeded: sends are counted per calendar day / week in the person's zone (exempt
  categories are neither capped nor counted).
- A decision is made on fields at least as new as the person's events (`PersonView.behind` is None), since
  every check reads them (consent, suppressions, the zone, rank scores). An action proposed (or coming due)
  while they lag is held (`Held.profile`) until the profile's change catches up (the service then calls
  `release`), for at most `rules.profile_wait` after the earliest event the fields lag behind (or its own
  validity, if that ends first). The wait is not a decision: it is usually milliseconds (the profile's
  change travels beside the event), and the action's one decision comes when it ends. Past the wait it is
  decided on the fields known, and its reason says so: `profile_unavailable` (a missing consent is then
  named `profile_unavailable`, not the purpose). A stalled profile delays a decision; it never denies one.
- Decisions name rules, caps, purposes and journeys, never profile values.
- A merge (`merge_states`) keeps every send of both persons (caps count them all) and every held action.
- Pure: time is passed in; the state is a frozen value. `next_wake(state)` is when the service must call
  `release` (a held action comes due or an approval expires): one durable timer per person.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo

from cdp_lang.values import number
from cdp_orchestration.domain import clock
from cdp_orchestration.domain.journey import DROP
from cdp_orchestration.domain.rules import Cap, Rules
from cdp_orchestration.domain.view import Event, PersonView

WEEK = 7 * 86400.0


class Kind(StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    SUPERSEDED = "superseded"
    CAPPED = "capped"
    SUPPRESSED = "suppressed"
    NO_CONSENT = "no_consent"
    AWAITING_APPROVAL = "awaiting_approval"
    REJECTED = "rejected"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


# A final decision ends the action's life in the arbiter; the instance moves on when it hears one. A
# superseded action is held for a later period, so it is not final.
FINAL = frozenset(Kind) - {Kind.DEFERRED, Kind.AWAITING_APPROVAL, Kind.SUPERSEDED}


@dataclass(frozen=True, slots=True)
class ProposedAction:
    """What an instance asks the arbiter to send. `action_id` is stable (see `instance.action_id`)."""

    action_id: str
    person_id: str
    journey_id: str
    journey_version: int
    instance_id: str
    node_id: str
    channel: str
    category: str
    purpose: str
    priority: int
    proposed_at: float
    value: float | None = None
    approval: bool = False
    rank_by: str | None = None
    on_cap: str = "defer"  # or DROP: a full cap ends it ("capped") instead of deferring it
    expires_at: float | None = None  # the action's own validity: never sent, nor held, after it


@dataclass(frozen=True, slots=True)
class Decision:
    action_id: str
    journey_id: str
    instance_id: str
    person_id: str
    node_id: str
    channel: str
    category: str
    kind: Kind
    reason: str
    at: float
    until: float | None = None  # deferred, superseded: when it is decided again; awaiting approval: its expiry
    by: str | None = None  # the cap, rule, purpose or journey the reason names

    @property
    def final(self) -> bool:
        return self.kind in FINAL


# What a decision made on fields that lag behind the person's events names, after `Rules.profile_wait`.
PROFILE_UNAVAILABLE = "profile_unavailable"


@dataclass(frozen=True, slots=True)
class Held:
    action: ProposedAction
    until: float  # deferred: due at; awaiting approval: expires at
    approved: bool = False
    # Deferred until the profile catches up with the person's events (due at once when it has; `until` is
    # the longest it waits).
    profile: bool = False


@dataclass(frozen=True, slots=True)
class Sent:
    at: float
    channel: str
    action_id: str


@dataclass(frozen=True, slots=True)
class PersonState:
    person_id: str
    sent: tuple[Sent, ...] = ()  # sends of the last week and a day (older ones cannot count toward a cap)
    deferred: tuple[Held, ...] = ()
    awaiting: tuple[Held, ...] = ()
    last_seen: Mapping[str, float] = field(default_factory=dict)  # watched event name -> latest time


@dataclass(frozen=True, slots=True)
class Ruling:
    state: PersonState
    decisions: tuple[Decision, ...]

    def about(self, action_id: str) -> Decision | None:
        return next((d for d in reversed(self.decisions) if d.action_id == action_id), None)


def next_wake(state: PersonState) -> float | None:
    """When `release` has work: the earliest deferral due or approval expiry."""
    return min((held.until for held in (*state.deferred, *state.awaiting)), default=None)


def merge_states(survivor: PersonState, absorbed: PersonState) -> PersonState:
    """The survivor's state after another person was merged into them: both send histories (caps count
    them all), both sets of held actions (now the survivor's), the latest time of each watched event."""
    person_id = survivor.person_id

    def held(items: tuple[Held, ...], known: tuple[Held, ...]) -> tuple[Held, ...]:
        ids = {h.action.action_id for h in known}
        return tuple(
            replace(h, action=replace(h.action, person_id=person_id)) for h in items if h.action.action_id not in ids
        )

    sent_ids = {s.action_id for s in survivor.sent}
    last_seen = dict(survivor.last_seen)
    for name, at in absorbed.last_seen.items():
        last_seen[name] = max(at, last_seen.get(name, at))
    return PersonState(
        person_id=person_id,
        sent=tuple(
            sorted((*survivor.sent, *(s for s in absorbed.sent if s.action_id not in sent_ids)), key=lambda s: s.at)
        ),
        deferred=(*survivor.deferred, *held(absorbed.deferred, survivor.deferred)),
        awaiting=(*survivor.awaiting, *held(absorbed.awaiting, survivor.awaiting)),
        last_seen=last_seen,
    )


def observe(state: PersonState, event: Event, rules: Rules) -> PersonState:
    """Remember an event a suppression rule watches (only its latest time is kept)."""
    if event.name not in rules.watched_events or state.last_seen.get(event.name, -float("inf")) >= event.at:
        return state
    return replace(state, last_seen={**state.last_seen, event.name: event.at})


def decide(state: PersonState, action: ProposedAction, view: PersonView, rules: Rules, now: float) -> Ruling:
    """Decide a proposed action, together with any held actions due now (priority orders them all)."""
    if _holds(state, action.action_id) or any(s.action_id == action.action_id for s in state.sent):
        return Ruling(state, ())  # a redelivered proposal: it is held, or went out, already
    return _Session(state, view, rules, now).run([Held(action, now)])


def release(state: PersonState, view: PersonView, rules: Rules, now: float) -> Ruling:
    """Decide held actions whose time has come and expire approvals nobody answered."""
    return _Session(state, view, rules, now).run([])


def approve(state: PersonState, action_id: str, view: PersonView, rules: Rules, now: float) -> Ruling:
    """Approve an action awaiting approval: it goes through the remaining checks now."""
    held = _find(state.awaiting, action_id)
    if held is None:
        return Ruling(state, ())
    state = replace(state, awaiting=_without(state.awaiting, action_id))
    if held.until <= now:
        return _final(state, held.action, Kind.EXPIRED, "expired: approval came after it expired", now)
    return _Session(state, view, rules, now).run([replace(held, approved=True)])


def reject(state: PersonState, action_id: str, now: float) -> Ruling:
    held = _find(state.awaiting, action_id)
    if held is None:
        return Ruling(state, ())
    state = replace(state, awaiting=_without(state.awaiting, action_id))
    return _final(state, held.action, Kind.REJECTED, "rejected by an approver", now)


def withdraw(state: PersonState, action_id: str, now: float) -> Ruling:
    """The instance no longer wants a held action (it exited): it is dropped with a recorded reason."""
    held = _find(state.deferred, action_id) or _find(state.awaiting, action_id)
    if held is None:
        return Ruling(state, ())  # already decided for good (sent, capped...) or never seen
    state = replace(state, deferred=_without(state.deferred, action_id), awaiting=_without(state.awaiting, action_id))
    return _final(state, held.action, Kind.WITHDRAWN, "withdrawn: the journey instance ended", now)


def consent_refused(view: PersonView, purpose: str | None, channel: str, *, exempt: bool) -> tuple[str, str] | None:
    """What the person's consent refuses an action: ("purpose", P) when purpose P is not granted (an exempt
    category needs none), ("channel", C) when channel C is refused; None when it may go. The arbiter asks
    it when it decides, and each channel's dispatcher again right before each attempt (`dispatch.py`),
    so a consent withdrawn while an action waits to be sent stops it. `purpose` None: not known (only the
    channel is asked)."""
    if purpose is not None and not exempt and view.consent("purpose", purpose) is not True:
        return ("purpose", purpose)
    if view.consent("channel", channel) is False:
        return ("channel", channel)
    return None


def _final(state: PersonState, action: ProposedAction, kind: Kind, reason: str, now: float) -> Ruling:
    return Ruling(state, (_decision(action, kind, reason, now),))


def _find(items: Iterable[Held], action_id: str) -> Held | None:
    return next((held for held in items if held.action.action_id == action_id), None)


def _without(items: tuple[Held, ...], action_id: str) -> tuple[Held, ...]:
    return tuple(held for held in items if held.action.action_id != action_id)


def _holds(state: PersonState, action_id: str) -> bool:
    return _find(state.deferred, action_id) is not None or _find(state.awaiting, action_id) is not None


def _decision(
    action: ProposedAction, kind: Kind, reason: str, now: float, until: float | None = None, by: str | None = None
) -> Decision:
    return Decision(
        action.action_id,
        action.journey_id,
        action.instance_id,
        action.person_id,
        action.node_id,
        action.channel,
        action.category,
        kind,
        reason,
        now,
        until,
        by,
    )


def _counts(cap: Cap, channel: str) -> bool:
    """Whether a send on `channel` counts toward `cap`."""
    return cap.channel is None or cap.channel == channel


def _local(at: float, zone: ZoneInfo) -> str:
    """A time as the person lives it, for reasons an operator reads: "2026-12-04 08:00 Europe/Berlin"."""
    return f"{datetime.fromtimestamp(at, zone):%Y-%m-%d %H:%M} {zone.key}"


class _Session:
    """One round of decisions at one instant, over a working copy of the person's state."""

    def __init__(self, state: PersonState, view: PersonView, rules: Rules, now: float) -> None:
        self.state = state
        self.view = view
        self.rules = rules
        self.now = now
        self.zone = clock.zone(view.timezone, rules.timezone)
        # The fields lag behind the person's events: an action waits for them (`_decide`), and one decided
        # anyway (its wait is over) says so in its reason.
        self.stale = view.behind is not None
        self.decisions: list[Decision] = []
        self.winners: list[ProposedAction] = []  # sent in this round, in order
        self.periods: dict[str, tuple[float, float]] = {}  # "day" / "week" -> the current one (cached)

    def run(self, fresh: list[Held]) -> Ruling:
        now = self.now
        deferred, awaiting = [], []
        for held in self.state.awaiting:
            if held.until <= now:
                self.decisions.append(
                    _decision(held.action, Kind.EXPIRED, "expired: nobody approved or rejected it in time", now)
                )
            else:
                awaiting.append(held)
        due = list(fresh)
        caught_up = self.view.behind is None
        for held in self.state.deferred:
            (due if held.until <= now or (held.profile and caught_up) else deferred).append(held)
        self.state = replace(self.state, deferred=tuple(deferred), awaiting=tuple(awaiting))
        self._prune()
        for held in sorted(due, key=self._rank):
            self._decide(held)
        return Ruling(self.state, tuple(self.decisions))

    def _rank(self, held: Held) -> tuple[float, float, float, str]:
        action = held.action
        score = number(self.view.fields.get(action.rank_by)) if action.rank_by else None
        return (-action.priority, -(score or 0.0), action.proposed_at, action.action_id)

    def _decide(self, held: Held) -> None:
        action, now, rules = held.action, self.now, self.rules
        exempt = action.category in rules.exempt_categories
        if action.expires_at is not None and now > action.expires_at:
            return self._say(
                action, Kind.EXPIRED, f"expired: past the action's validity ({self._at(action.expires_at)})"
            )
        if self.stale:
            # Every check below reads the person's fields, which do not reflect all their events yet (a new
            # person's consent may be on its way): wait for the profile, not longer than `profile_wait`.
            until = self.view.behind + rules.profile_wait  # type: ignore[operator]
            if action.expires_at is not None and action.expires_at < until:
                until = action.expires_at
            if until > now:
                held = replace(held, until=until, profile=True)
                self.state = replace(self.state, deferred=(*self.state.deferred, held))
                return None
        refused = consent_refused(self.view, action.purpose, action.channel, exempt=exempt)
        if refused is not None:
            kind, name = refused
            return self._say(action, Kind.NO_CONSENT, f"no consent for {kind} {name}", by=name)
        for rule in rules.suppressions:
            if rule.applies(action.category, action.channel) and self._suppresses(rule):
                return self._say(action, Kind.SUPPRESSED, f"suppressed by rule {rule.id}", by=rule.id)
        if not held.approved and self._needs_approval(action):
            expires = now + rules.approval.expires_after
            self.state = replace(self.state, awaiting=(*self.state.awaiting, Held(action, expires)))
            reason = f"awaiting approval until {self._at(expires)}"
            return self._say(action, Kind.AWAITING_APPROVAL, reason, until=expires)
        quiet = rules.quiet_hours
        if quiet is not None and not exempt and quiet.applies(action.channel) and self._quiet(quiet.start, quiet.end):
            until = clock.next_time_of_day(now, *quiet.end, self.zone, inclusive=True)
            reason = f"deferred until {self._at(until)} (quiet hours)"
            return self._hold(held, until, Kind.DEFERRED, reason, cause="quiet hours last")
        taken: list[tuple[Held, Cap]] = []
        if not exempt:
            full, taken = self._room(held)
            if full is not None:
                return self._turn_away(held, *full)
        self.state = replace(
            self.state, sent=(*self.state.sent, Sent(now, "" if exempt else action.channel, action.action_id))
        )
        self.winners.append(action)
        self._say(action, Kind.SENT, "sent")
        for loser, cap in taken:
            self.state = replace(self.state, deferred=_without(self.state.deferred, loser.action.action_id))
            self._turn_away(loser, cap, action)

    def _room(self, held: Held) -> tuple[tuple[Cap, ProposedAction | None] | None, list[tuple[Held, Cap]]]:
        """Whether a cap turns `held` away now: (the cap, the action of this round that took its last place
        or None), else None and the lower-ranked deferred actions whose places it takes (with the cap)."""
        action = held.action
        rank = self._rank(held)
        turned: list[tuple[float, int, Cap, ProposedAction | None]] = []
        taken: list[tuple[Held, Cap]] = []
        for order, cap in enumerate(self.rules.caps):
            if not _counts(cap, action.channel):
                continue
            used = self._count(cap)
            moved = {loser.action.action_id for loser, _ in taken}
            holders = sorted(
                (h for h in self._holders(cap) if h.action.action_id not in moved),
                key=self._rank,
            )
            above = [h for h in holders if self._rank(h) < rank]
            if used + len(above) >= cap.limit:
                # Superseded when the room was there before this round's sends took it.
                winners = [w for w in self.winners if self._counted(w) and _counts(cap, w.channel)]
                winner = winners[-1] if winners and used - len(winners) + len(above) < cap.limit else None
                turned.append((self._next_period(cap), -order, cap, winner))
                continue
            excess = used + len(holders) + 1 - cap.limit
            if excess > 0:
                taken += [(loser, cap) for loser in holders[len(holders) - excess :]]
        if turned:
            # Several caps full: wait for the one that frees up last (the first listed among equals).
            _, _, cap, winner = max(turned, key=lambda t: (t[0], t[1]))
            return (cap, winner), []
        return None, taken

    def _turn_away(self, held: Held, cap: Cap, winner: ProposedAction | None) -> None:
        """A cap has no room for `held`: it waits for the cap's next period, or ends if it opted out."""
        action = held.action
        if action.on_cap == DROP:
            return self._say(action, Kind.CAPPED, f"capped by {cap.id} ({cap.limit} per {cap.per})", by=cap.id)
        until = self._next_period(cap)
        cause = f"cap {cap.id} stays full"
        if winner is None:
            reason = f"deferred until {self._at(until)} (cap {cap.id} full)"
            return self._hold(held, until, Kind.DEFERRED, reason, by=cap.id, cause=cause, cause_by=cap.id)
        reason = f"superseded by journey {winner.journey_id}, deferred until {self._at(until)} (cap {cap.id})"
        return self._hold(held, until, Kind.SUPERSEDED, reason, by=winner.journey_id, cause=cause, cause_by=cap.id)

    def _hold(
        self,
        held: Held,
        until: float,
        kind: Kind,
        reason: str,
        *,
        cause: str,
        by: str | None = None,
        cause_by: str | None = None,
    ) -> None:
        """Defer `held` to `until`, or expire it when that is past its validity."""
        action = held.action
        limit, what = action.proposed_at + self.rules.max_hold, "the longest hold"
        if action.expires_at is not None and action.expires_at < limit:
            limit, what = action.expires_at, f"the action's validity ({self._at(action.expires_at)})"
        if until > limit:
            return self._say(action, Kind.EXPIRED, f"expired: {cause} past {what}", by=cause_by)
        self.state = replace(self.state, deferred=(*self.state.deferred, replace(held, until=until, profile=False)))
        self._say(action, kind, reason, until=until, by=by)

    def _at(self, at: float) -> str:
        return _local(at, self.zone)

    def _say(
        self, action: ProposedAction, kind: Kind, reason: str, *, until: float | None = None, by: str | None = None
    ) -> None:
        if self.stale and kind is not Kind.EXPIRED:
            wait = f"{self.rules.profile_wait:g} s"
            reason = f"{reason} ({PROFILE_UNAVAILABLE}: the profile had not applied the person's events after {wait})"
            if kind is Kind.NO_CONSENT:
                by = PROFILE_UNAVAILABLE
        self.decisions.append(_decision(action, kind, reason, self.now, until, by))

    def _suppresses(self, rule) -> bool:
        if rule.after_event is not None:
            seen = self.state.last_seen.get(rule.after_event)
            if seen is None or not (seen <= self.now < seen + rule.within):
                return False
        return rule.condition is None or rule.condition.holds(self.view, self.now)

    def _needs_approval(self, action: ProposedAction) -> bool:
        above = self.rules.approval.above
        return action.approval or (above is not None and action.value is not None and action.value > above)

    def _quiet(self, start: tuple[int, int], end: tuple[int, int]) -> bool:
        minute = clock.minute_of_day(self.now, self.zone)
        first, last = start[0] * 60 + start[1], end[0] * 60 + end[1]
        return first <= minute < last if first < last else minute >= first or minute < last

    def _period(self, cap: Cap) -> tuple[float, float]:
        """The cap's current period in the person's zone: [start, start of the next)."""
        period = self.periods.get(cap.per)
        if period is None:
            if cap.per == "day":
                period = (clock.day_start(self.now, self.zone), clock.next_day_start(self.now, self.zone))
            else:
                period = (clock.week_start(self.now, self.zone), clock.next_week_start(self.now, self.zone))
            self.periods[cap.per] = period
        return period

    def _next_period(self, cap: Cap) -> float:
        return self._period(cap)[1]

    def _counted(self, action: ProposedAction) -> bool:
        return action.category not in self.rules.exempt_categories

    def _count(self, cap: Cap) -> int:
        start = self._period(cap)[0]
        # Exempt sends are kept (so a redelivery is recognised) with no channel, and count toward no cap.
        return sum(1 for s in self.state.sent if s.channel and s.at >= start and _counts(cap, s.channel))

    def _holders(self, cap: Cap) -> list[Held]:
        """Deferred actions due within the cap's current period: the room they will want is theirs for now."""
        start, end = self._period(cap)
        return [
            h
            for h in self.state.deferred
            # An action waiting for the profile has had no decision yet: it holds no room.
            if start <= h.until < end and not h.profile and self._counted(h.action) and _counts(cap, h.action.channel)
        ]

    def _prune(self) -> None:
        # A week cap looks back at most to last Monday 00:00 local: eight days covers every zone and DST.
        horizon = self.now - WEEK - 86400.0
        if self.state.sent and self.state.sent[0].at < horizon:
            self.state = replace(self.state, sent=tuple(s for s in self.state.sent if s.at >= horizon))
