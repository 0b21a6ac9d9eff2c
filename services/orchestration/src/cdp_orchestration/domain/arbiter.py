"""One arbiter per person: every action from every journey passes here before any channel sees it.

`decide(state, action, view, rules, now) -> Ruling` takes a proposed action and returns the person's new
`PersonState` and the decisions taken, each with a kind and a reason an operator can read:

    sent                 go now (the service renders the template and hands it to the channel)
    deferred until T     quiet hours, in the person's zone: held and decided again at T, never dropped
    superseded by J      lost its slot to a higher-priority action of journey J at the same instant
    capped by C          frequency cap C (per channel or overall, per calendar day or week) is full
    suppressed by R      suppression rule R applies (an event within a window, a condition, or both)
    no consent for P     the profile does not grant purpose P (or refuses the channel)
    awaiting approval    held until someone approves or rejects it, or it expires
    rejected / expired / withdrawn    final answers for held actions

Invariants:
- Nothing is dropped silently: every proposed action gets a decision, and every held one a later one.
- Nothing is sent twice: a proposal whose action id is held, or was sent in the last eight days, is a
  redelivery and gets no new decision (the service's effectively-once processing covers the rest).
- Checks run in this order, and all of them again when a held action comes due (consent withdrawn or a
  ticket opened meanwhile stops the send): consent, suppression, approval, quiet hours, caps.
- Priority: actions due at the same instant (a new proposal, and held ones whose time has come) are
  decided together, highest first (journey priority, then the action's `rank_by` score, then proposal
  time and id, so the order is total and a replay gives the same outcome). An action a cap turns away
  only because a higher one just took the last place is superseded by that journey; one the cap turns
  away because of earlier sends is capped.
- A cap is never exceeded: sends are counted per calendar day / week in the person's zone (exempt
  categories are neither capped nor counted).
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


# A final decision ends the action's life in the arbiter; the instance moves on when it hears one.
FINAL = frozenset(Kind) - {Kind.DEFERRED, Kind.AWAITING_APPROVAL}


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
    until: float | None = None  # deferred: when it is decided again; awaiting approval: when it expires
    by: str | None = None  # the cap, rule, purpose or journey the reason names

    @property
    def final(self) -> bool:
        return self.kind in FINAL


@dataclass(frozen=True, slots=True)
class Held:
    action: ProposedAction
    until: float  # deferred: due at; awaiting approval: expires at
    approved: bool = False


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
        self.decisions: list[Decision] = []
        self.winners: list[ProposedAction] = []  # sent in this round, in order

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
        for held in self.state.deferred:
            (due if held.until <= now else deferred).append(held)
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
        # Consent: the purpose must be granted (unless the category is exempt); the channel not refused.
        if not exempt and self.view.consent("purpose", action.purpose) is not True:
            return self._say(action, Kind.NO_CONSENT, f"no consent for purpose {action.purpose}", by=action.purpose)
        if self.view.consent("channel", action.channel) is False:
            return self._say(action, Kind.NO_CONSENT, f"no consent for channel {action.channel}", by=action.channel)
        for rule in rules.suppressions:
            if rule.applies(action.category, action.channel) and self._suppresses(rule):
                return self._say(action, Kind.SUPPRESSED, f"suppressed by rule {rule.id}", by=rule.id)
        if not held.approved and self._needs_approval(action):
            expires = now + rules.approval.expires_after
            self.state = replace(self.state, awaiting=(*self.state.awaiting, Held(action, expires)))
            reason = f"awaiting approval until {_local(expires, self.zone)}"
            return self._say(action, Kind.AWAITING_APPROVAL, reason, until=expires)
        quiet = rules.quiet_hours
        if quiet is not None and not exempt and quiet.applies(action.channel) and self._quiet(quiet.start, quiet.end):
            until = clock.next_time_of_day(now, *quiet.end, self.zone, inclusive=True)
            if until > action.proposed_at + rules.max_hold:
                return self._say(action, Kind.EXPIRED, "expired: quiet hours outlast the longest hold")
            self.state = replace(self.state, deferred=(*self.state.deferred, replace(held, until=until)))
            return self._say(
                action, Kind.DEFERRED, f"deferred until {_local(until, self.zone)} (quiet hours)", until=until
            )
        if not exempt:
            for cap in rules.caps:
                if (cap.channel is None or cap.channel == action.channel) and self._count(cap) >= cap.limit:
                    winner = self._taker(cap)
                    if winner is not None:
                        return self._say(
                            action,
                            Kind.SUPERSEDED,
                            f"superseded by journey {winner.journey_id} (higher priority, same slot, cap {cap.id})",
                            by=winner.journey_id,
                        )
                    return self._say(action, Kind.CAPPED, f"capped by {cap.id} ({cap.limit} per {cap.per})", by=cap.id)
        self.state = replace(
            self.state, sent=(*self.state.sent, Sent(now, "" if exempt else action.channel, action.action_id))
        )
        self.winners.append(action)
        return self._say(action, Kind.SENT, "sent")

    def _say(
        self, action: ProposedAction, kind: Kind, reason: str, *, until: float | None = None, by: str | None = None
    ) -> None:
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

    def _period_start(self, cap: Cap) -> float:
        return clock.day_start(self.now, self.zone) if cap.per == "day" else clock.week_start(self.now, self.zone)

    def _count(self, cap: Cap) -> int:
        start = self._period_start(cap)
        # Exempt sends are kept (so a redelivery is recognised) with no channel, and count toward no cap.
        return sum(
            1
            for s in self.state.sent
            if s.channel and s.at >= start and (cap.channel is None or s.channel == cap.channel)
        )

    def _taker(self, cap: Cap) -> ProposedAction | None:
        """The higher-priority action sent in this round that took the cap's last place, if one did."""
        for winner in reversed(self.winners):
            if winner.category not in self.rules.exempt_categories and cap.channel in (None, winner.channel):
                return winner
        return None

    def _prune(self) -> None:
        # A week cap looks back at most to last Monday 00:00 local: eight days covers every zone and DST.
        horizon = self.now - WEEK - 86400.0
        if self.state.sent and self.state.sent[0].at < horizon:
            self.state = replace(self.state, sent=tuple(s for s in self.state.sent if s.at >= horizon))
