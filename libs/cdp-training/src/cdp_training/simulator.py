"""A simulated customer population with known truth, for training and checking the shipped models.

Every person has latent traits — engagement, price sensitivity, preferred channel and local hour, home
city (country, time zone), a purchase rate and an order-value level (Gamma-Gamma), a dropout hazard that a
bad experience raises, and a small share are fraudsters. Their behaviour over a history window and an
outcome window after the cutoff is drawn as Poisson processes (vectorised over the whole population with
numpy) into one event table, one row per event. Labels are read off the outcome window: churned (no
activity in the 90 days after the cutoff), lapsed (none in the 60 days after the first 30: churn risk), purchased in the 30 days after it, fraudster, and which channel
they answered in the 30 days after it and at which local hour.

Rows become events on demand, in the two forms the platform knows: Segment-spec JSON (what SDKs send the
collector) and `cdp_profile.domain.ProfileEvent` (what the profile service applies after identity
resolution), so training features are computed by the profile domain itself.

Behaviour, roughly:
- sessions (web `page` / app `screen`) at a rate set by engagement, half of them near the preferred hour,
  on the app for a personal share of them; product views and cart adds inside them; logins now and then;
- orders (a Poisson process per person, value ~ Gamma(p, nu) with nu ~ Gamma(q, gamma) per person), each
  preceded by a checkout page, a product view and a cart add; a third of the people sign up at checkout;
- marketing answers (Email Opened/Clicked, SMS Clicked, Push Opened, In-App Clicked) per channel at a rate
  that is higher for the preferred channel (heavy app users lean to push and in-app), near the preferred
  local hour, only while the channel is consented; a third of the people change their preferred channel
  once, and some withdraw or give a consent;
- support tickets, more of them around a bad experience, after which the dropout hazard is five times
  higher; activity fades in the weeks before a dropout and stops after it, except for an email opened now
  and then; a third of those who lapse come back months later;
- three in five bad experiences are never put right: activity falls to about a third over two to six weeks while
  tickets come faster and faster, then the customer leaves, two in five right after a last ticket; a third
  of everyone has a quiet spell of one to four weeks (a third to two thirds of their usual activity) and
  comes back, so a dip alone is no verdict; a quarter are regulars, who come most days;
- legitimate look-alikes of fraud: travellers (orders abroad, fast but possible travel), VPN users
  (locations that jump), expats (card country differs), families (two accounts on one device), spree
  shoppers (several orders within hours on several cards), second browsers, phones whose address changes
  daily;
- fraud rings: fresh accounts, several user ids signed up from one device, many cards from many countries,
  locations hopping between proxies within hours; account takeovers: a new device, often in another
  country hours after the owner was seen at home, often new cards. Each signal shows only some of the time,
  and careful fraudsters (a third) show none of them beyond a new account or device and the orders.

A fraud model scores an order as it happens, so each person also gets a fraud scoring moment: the last
order of a fraudster's burst, otherwise one of the person's orders (an unusual one, for half the
travellers and spree shoppers) or their last event.

Identity's default rules allow one user id per person, so a ring's (or a family's) accounts are persons of
their own in production: the order at the fraud moment lands on its account's profile, which holds only
that account's events, each carrying how many other accounts identity saw on its device in the day before
it (`fraud_events`, `identity_sharing`), and identity's "Identifier Shared" events for each account that
joined its device after it (`identity_told`). The other models read the simulated person as a whole.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import numpy as np

from cdp_profile.domain import ProfileEvent

DAY = 86_400.0
HOUR = 3_600.0
CHANNELS = ("email", "sms", "push", "in_app")
DEFAULT_CUTOFF = datetime(2025, 6, 1, tzinfo=UTC).timestamp()
CHURN_DAYS = 90
# Churn risk predicts a lapse, not an absence already under way: no activity in the CHURN_DAYS after the cutoff
# once LAPSE_GRACE_DAYS have passed. "No activity at all in the next 90 days" is true almost only of someone
# already gone (a customer here yesterday is back within days, however her trend), so a model of it reads
# recency and nothing else, and tells a success manager only what is too late to act on.
LAPSE_GRACE_DAYS = 30
PURCHASE_DAYS = 30
RESPONSE_DAYS = 30


@dataclass(frozen=True, slots=True)
class City:
    name: str
    country: str
    latitude: float
    longitude: float
    timezone: str
    weight: float  # share of home cities
    ip_prefix: str


CITIES = (
    City("New York", "US", 40.7128, -74.0060, "America/New_York", 0.13, "24.41"),
    City("Chicago", "US", 41.8781, -87.6298, "America/Chicago", 0.06, "24.60"),
    City("Los Angeles", "US", 34.0522, -118.2437, "America/Los_Angeles", 0.08, "47.32"),
    City("Toronto", "CA", 43.6532, -79.3832, "America/Toronto", 0.04, "99.225"),
    City("Mexico City", "MX", 19.4326, -99.1332, "America/Mexico_City", 0.03, "187.188"),
    City("Sao Paulo", "BR", -23.5505, -46.6333, "America/Sao_Paulo", 0.05, "177.32"),
    City("London", "GB", 51.5074, -0.1278, "Europe/London", 0.12, "81.2"),
    City("Paris", "FR", 48.8566, 2.3522, "Europe/Paris", 0.08, "90.12"),
    City("Berlin", "DE", 52.5200, 13.4050, "Europe/Berlin", 0.08, "91.64"),
    City("Madrid", "ES", 40.4168, -3.7038, "Europe/Madrid", 0.05, "83.44"),
    City("Amsterdam", "NL", 52.3676, 4.9041, "Europe/Amsterdam", 0.03, "145.53"),
    City("Warsaw", "PL", 52.2297, 21.0122, "Europe/Warsaw", 0.03, "83.21"),
    City("Lagos", "NG", 6.5244, 3.3792, "Africa/Lagos", 0.02, "105.112"),
    City("Mumbai", "IN", 19.0760, 72.8777, "Asia/Kolkata", 0.05, "49.36"),
    City("Singapore", "SG", 1.3521, 103.8198, "Asia/Singapore", 0.03, "118.189"),
    City("Tokyo", "JP", 35.6762, 139.6503, "Asia/Tokyo", 0.05, "126.12"),
    City("Sydney", "AU", -33.8688, 151.2093, "Australia/Sydney", 0.04, "101.160"),
    City("Jakarta", "ID", -6.2088, 106.8456, "Asia/Jakarta", 0.03, "36.72"),
)
COUNTRIES = tuple(sorted({c.country for c in CITIES}))
_CITY_COUNTRY = np.array([COUNTRIES.index(c.country) for c in CITIES], dtype=np.int16)
_CITY_LAT = np.radians([c.latitude for c in CITIES])
_CITY_LON = np.radians([c.longitude for c in CITIES])
PLANS = ("free", "plus", "pro")
PAGES = ("Home", "Catalog", "Product", "Search", "Deals", "Account")
CHECKOUT_PAGE = "Checkout"
SESSION_PAGES = (*PAGES, CHECKOUT_PAGE)  # every session opens with one page (web) or screen (app) of these
TICKET_TOPICS = ("delivery", "billing", "product", "account", "returns")
TICKET_SEVERITIES = ("low", "normal", "high")
PRODUCT_CATEGORIES = ("apparel", "home", "electronics", "beauty", "sports", "books")


class Kind:
    """Event kinds of the table (int8 codes) and their Segment type and name."""

    PAGE, SCREEN, PRODUCT_VIEWED, PRODUCT_ADDED, ORDER, TICKET = 0, 1, 2, 3, 4, 5
    EMAIL_OPENED, EMAIL_CLICKED, SMS_CLICKED, PUSH_OPENED, INAPP_CLICKED = 6, 7, 8, 9, 10
    LOGIN, SIGNED_UP, IDENTIFY = 11, 12, 13

    NAMES = (
        "",
        "",
        "Product Viewed",
        "Product Added",
        "Order Completed",
        "Support Ticket Opened",
        "Email Opened",
        "Email Clicked",
        "SMS Clicked",
        "Push Opened",
        "In-App Clicked",
        "Login",
        "Signed Up",
        "",
    )
    # the response that counts for each channel, in CHANNELS order
    RESPONSES = (EMAIL_OPENED, SMS_CLICKED, PUSH_OPENED, INAPP_CLICKED)
    RESPONSE_NAMES = ("Email Opened", "SMS Clicked", "Push Opened", "In-App Clicked")
    ENGAGEMENT_NAMES = ("Email Opened", "Email Clicked", "SMS Clicked", "Push Opened", "In-App Clicked")


IDENTIFY_SIGNUP, IDENTIFY_PLAN, IDENTIFY_CONSENT = 0, 1, 2
# Device slots: 0 = the person's browser, 1 = their phone app, 2.. = a fraudster's browsers (or a new device
# a takeover comes from), 9 = the person's second browser.
WEB, APP, SECOND_BROWSER = 0, 1, 9
_SOURCES = {
    Kind.ORDER: "server",
    Kind.TICKET: "zendesk",
    Kind.EMAIL_OPENED: "esp",
    Kind.EMAIL_CLICKED: "esp",
    Kind.SMS_CLICKED: "sms",
}


# --- time zones --------------------------------------------------------------------------------------


class Zones:
    """UTC offsets of the cities' time zones over a time range, looked up for arrays of instants.

    Offsets are read from zoneinfo (so daylight-saving time is exact) at every transition in the range; a
    local hour computed here is the hour `datetime.fromtimestamp(t, ZoneInfo(tz))` shows.
    """

    def __init__(self, names: tuple[str, ...], start: float, end: float) -> None:
        self.names = names
        self.times: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        for name in names:
            zone = ZoneInfo(name)

            def offset(t: float, zone: ZoneInfo = zone) -> float:
                return datetime.fromtimestamp(t, zone).utcoffset().total_seconds()  # type: ignore[union-attr]

            step = 12 * HOUR
            t0 = math.floor((start - 2 * DAY) / HOUR) * HOUR
            times, offsets = [t0], [offset(t0)]
            t = t0
            while t < end + 2 * DAY:
                nxt = t + step
                if offset(nxt) != offsets[-1]:
                    # transitions happen on whole hours UTC for these zones: find the hour
                    probe = t + HOUR
                    while offset(probe) == offsets[-1]:
                        probe += HOUR
                    times.append(probe)
                    offsets.append(offset(probe))
                t = nxt
            self.times.append(np.array(times))
            self.offsets.append(np.array(offsets))

    def offset(self, zone: np.ndarray, t: np.ndarray) -> np.ndarray:
        out = np.empty(t.shape, dtype=np.float64)
        for k in np.unique(zone):
            mask = zone == k
            index = np.searchsorted(self.times[k], t[mask], side="right") - 1
            out[mask] = self.offsets[k][np.maximum(index, 0)]
        return out

    def local_hour(self, zone: np.ndarray, t: np.ndarray) -> np.ndarray:
        local = t + self.offset(zone, t)
        return (np.floor(local / HOUR) % 24).astype(np.int8)

    def at_local_hour(self, zone: np.ndarray, t: np.ndarray, hour: np.ndarray) -> np.ndarray:
        """The instant on `t`'s local day at local time `hour` (fractional hours)."""
        offset = self.offset(zone, t)
        day = np.floor((t + offset) / DAY) * DAY
        local = day + hour * HOUR
        return local - self.offset(zone, local - offset)


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Great-circle distance on a 6371 km sphere (radians in, km out)."""
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.minimum(a, 1.0)))


# --- the event table ---------------------------------------------------------------------------------

_COLUMNS: dict[str, tuple[type, int]] = {
    # name: (dtype, value when not given; -1 means "the person's default")
    "person": (np.int32, 0),
    "t": (np.float64, 0),
    "kind": (np.int8, 0),
    "city": (np.int16, -1),  # location; -1 = home city
    "zone": (np.int16, -1),  # context.timezone; -1 = the location's
    "device": (np.int16, WEB),
    "account": (np.int16, 0),  # which of the person's user ids
    "card": (np.int32, -1),  # card number (global); -1 = none
    "card_country": (np.int16, -1),
    "total": (np.float64, 0.0),
    "aux": (np.int32, 0),  # page index, product, campaign week, ticket topic, plan, consent change...
    "ip": (np.int32, -1),  # -1 = the person's address in that city; otherwise a proxy address number
    "flag": (np.int8, 0),  # FRAUD_BURST, UNUSUAL_ORDER (legitimate, during a trip or a spree) or 0
}
FRAUD_BURST, UNUSUAL_ORDER = 1, 2


class _Rows:
    """Collects event rows by column as numpy arrays, then sorts them into one table."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, person: np.ndarray, t: np.ndarray, kind: int | np.ndarray, **columns: Any) -> None:
        person = np.asarray(person)
        if person.size == 0:
            return
        part = {"person": person, "t": np.asarray(t, dtype=np.float64)}
        part["kind"] = np.broadcast_to(np.asarray(kind, dtype=np.int8), person.shape)
        for name, value in columns.items():
            if name not in _COLUMNS:
                raise KeyError(name)
            part[name] = np.broadcast_to(np.asarray(value), person.shape)
        self.parts.append(part)

    def build(self) -> dict[str, np.ndarray]:
        table = {}
        for name, (dtype, default) in _COLUMNS.items():
            table[name] = np.concatenate(
                [
                    part[name].astype(dtype) if name in part else np.full(part["person"].shape, default, dtype)
                    for part in self.parts
                ]
            )
        table["t"] = np.round(table["t"], 3)  # Segment timestamps carry milliseconds
        order = np.lexsort((np.arange(table["t"].size), table["t"], table["person"]))
        return {name: column[order] for name, column in table.items()}


# --- the population ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcomes:
    """What happened after the cutoff, per person (the models' labels)."""

    churned: np.ndarray  # bool: no event in the CHURN_DAYS after the cutoff
    lapsed: np.ndarray  # bool: no event from LAPSE_GRACE_DAYS after the cutoff to CHURN_DAYS after it
    purchased: np.ndarray  # bool: an order in the PURCHASE_DAYS after the cutoff
    orders_after: np.ndarray  # int: orders in the CHURN_DAYS after the cutoff
    is_fraudster: np.ndarray  # bool
    response_channel: np.ndarray  # int: index in CHANNELS of the channel answered most in RESPONSE_DAYS, -1 none
    response_hour: np.ndarray  # int: local hour of the first answer on that channel, -1 none
    responses: np.ndarray  # int [n, 4]: answers per channel in RESPONSE_DAYS


@dataclass(frozen=True, slots=True)
class RegimeShift:
    """Behaviour that changes at `at` (epoch seconds): from then on the dropout hazard of app users is
    multiplied by `app_factor` and of everyone else by `web_factor` (a competitor's app arrives: app users
    leave, web shoppers stay). The dropout of a person still a customer at `at` is drawn again from then on
    (the hazard has no memory); `at` before a person's sign-up puts their whole life in the new regime.
    Drawn with its own generator, so a population without a shift is the one it always was."""

    at: float
    app_factor: float = 4.0
    web_factor: float = 0.4
    # days over which activity fades before a dropout drawn in the new regime (None: as before, 20-70):
    # leaving for a competitor is abrupt, so recency says less about it
    fade_days: float | None = 7.0

    def dropout(self, sim: _Simulation, tau: np.ndarray, hazard: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([sim.seed, 1])
        factor = np.where(sim.app_user, self.app_factor, self.web_factor)
        start = np.maximum(self.at, sim.signup)
        redrawn = start + rng.exponential(1.0, sim.n) / (hazard * factor) * DAY
        sim.shifted = tau > start
        return np.where(sim.shifted, redrawn, tau)

    def fade(self, sim: _Simulation) -> None:
        if self.fade_days is not None:
            sim.fade_days = np.where(sim.shifted, self.fade_days, sim.fade_days)


@dataclass(slots=True)
class Population:
    """The people (latent traits), their event table (sorted by person, then time) and their outcomes."""

    seed: int
    size: int
    cutoff: float
    start: float  # earliest possible event
    end: float  # end of the outcome window
    traits: dict[str, np.ndarray]
    table: dict[str, np.ndarray]
    bounds: np.ndarray  # person i's rows are table[bounds[i]:bounds[i + 1]]
    fraud_at: np.ndarray  # when the fraud models score the person (an order, or their last event)
    outcomes: Outcomes
    local_hour: np.ndarray  # per row
    offset: int = 0  # ids number persons from here (a subset keeps its persons' ids)

    @property
    def tag(self) -> str:
        return f"s{self.seed}"

    def rows(self, person: int, until: float | None = None) -> range:
        """Row numbers of one person's events, oldest first; with `until`, only events before it."""
        lo, hi = int(self.bounds[person]), int(self.bounds[person + 1])
        if until is not None:
            hi = lo + int(np.searchsorted(self.table["t"][lo:hi], until, side="left"))
        return range(lo, hi)

    def history(self, person: int) -> range:
        return self.rows(person, self.cutoff)

    def subset(self, lo: int, hi: int) -> Population:
        """Persons lo..hi-1 (renumbered from 0) with their rows: a picklable slice for a worker process."""
        r0, r1 = int(self.bounds[lo]), int(self.bounds[hi])
        table = {name: column[r0:r1].copy() for name, column in self.table.items()}
        table["person"] -= lo
        out = _slice_outcomes(self.outcomes, lo, hi)
        return Population(
            seed=self.seed,
            size=hi - lo,
            cutoff=self.cutoff,
            start=self.start,
            end=self.end,
            traits={name: values[lo:hi].copy() for name, values in self.traits.items()},
            table=table,
            bounds=self.bounds[lo : hi + 1] - r0,
            fraud_at=self.fraud_at[lo:hi].copy(),
            outcomes=out,
            local_hour=self.local_hour[r0:r1].copy(),
            offset=self.offset + lo,
        )

    # --- events ---------------------------------------------------------------------------------

    def person_id(self, person: int) -> str:
        return f"p-{self.tag}-{self._number(person):06d}"

    def user_id(self, person: int, account: int = 0) -> str:
        base = f"u-{self.tag}-{self._number(person):06d}"
        return base if account == 0 else f"{base}-{account}"

    def _number(self, person: int) -> int:
        return person + self.offset

    def segment_events(self, person: int, until: float | None = None) -> list[dict[str, Any]]:
        """One person's events (before `until`) as Segment-spec JSON objects, as an SDK would send them."""
        return [_segment(event) for event in self._events(person, until)]

    def profile_events(self, person: int, until: float | None = None) -> list[ProfileEvent]:
        """One person's events (before `until`) as the profile service applies them after identity."""
        return [_profile(event) for event in self._events(person, until)]

    def fraud_events(self, person: int, until: float | None = None) -> list[ProfileEvent] | None:
        """The events (before `until`) of the profile the fraud scoring order lands on under identity's
        default rules: only its own account's, each with `shared` as identity fills it (see
        `identity_sharing`). None when the person has a single account: that is `profile_events`."""
        rows = self.rows(person, until)
        accounts = self.table["account"][rows.start : rows.stop]
        if not accounts.any():
            return None
        times = self.table["t"][rows.start : rows.stop]
        scoring = max(int(np.searchsorted(times, self.fraud_at[person], side="right")) - 1, 0)
        account = int(accounts[scoring])
        accounts_list = accounts.tolist()
        devices = self.table["device"][rows.start : rows.stop].tolist()
        shared = identity_sharing(times.tolist(), accounts_list, devices)
        events = self._events(person, until)
        told: dict[int, list[dict[str, int]]] = {}
        for index, to, counts in identity_told(times.tolist(), accounts_list, devices):
            if to == account:
                told.setdefault(index, []).append(counts)
        out = []
        for index, (event, owner, counts) in enumerate(zip(events, accounts_list, shared, strict=True)):
            if owner == account:
                out.append(_profile(event, counts))
            for counts_told in told.get(index, ()):  # after the event that told it, at its time
                out.append(_identifier_shared(event, counts_told))
        return out

    def iter_segment_events(self, until: float | None = None) -> Iterator[dict[str, Any]]:
        """Everyone's events, person after person."""
        for person in range(self.size):
            yield from self.segment_events(person, until)

    def segment_stream(self, until: float | None = None) -> Iterator[dict[str, Any]]:
        """Everyone's events in time order, as a collector would receive them (benchmarks, integration tests)."""
        people = [self._events(person, until) for person in range(self.size)]
        for event in heapq.merge(*people, key=lambda e: e.at):
            yield _segment(event)

    def _events(self, person: int, until: float | None) -> list[_Event]:
        rows = self.rows(person, until)
        tab = self.table
        columns = [tab[name][rows.start : rows.stop].tolist() for name in _EVENT_COLUMNS]
        prefix = f"{self.tag}-{self._number(person):06d}"
        number = self._number(person)
        home_country = CITIES[int(self.traits["home"][person])].country
        signup_consent = {
            f"channel:{channel}": bool(self.traits["consent0"][person, k]) for k, channel in enumerate(CHANNELS)
        }
        contexts: dict[tuple[int, int, int, int], dict[str, Any]] = {}
        out = []
        for k, (at, kind, city, zone, device, account, card, card_country, total, aux, ip) in enumerate(
            zip(*columns, strict=True)
        ):
            context = contexts.get((city, zone, device, ip))
            if context is None:
                context = contexts[(city, zone, device, ip)] = _context(prefix, number, city, zone, device, ip)
            user_id = f"u-{prefix}" if account == 0 else f"u-{prefix}-{account}"
            consent = _NO_CONSENT
            event_type = "track"
            name = Kind.NAMES[kind]
            source = _SOURCES.get(kind) or ("app" if device == APP else "web")
            if kind == Kind.PAGE:
                event_type, name = "page", SESSION_PAGES[aux]
                payload: dict[str, Any] = _PAGE_PROPERTIES[aux]
            elif kind == Kind.SCREEN:
                event_type, name, payload = "screen", SESSION_PAGES[aux], _NO_PROPERTIES
            elif kind == Kind.PRODUCT_VIEWED or kind == Kind.PRODUCT_ADDED:
                payload = {
                    "product_id": f"sku-{aux:05d}",
                    "category": PRODUCT_CATEGORIES[aux % len(PRODUCT_CATEGORIES)],
                    "price": round(5 + (aux * 7919 % 20000) / 100, 2),
                }
                if kind == Kind.PRODUCT_ADDED:
                    payload["quantity"] = 1
            elif kind == Kind.ORDER:
                payload = {
                    "order_id": f"o-{prefix}-{k:05d}",
                    "total": total,
                    "currency": "USD",
                    "card_fingerprint": f"fp-{self.tag}-{card:010d}",
                    "card_country": COUNTRIES[card_country],
                    "items": 1 + aux % 4,
                }
            elif kind == Kind.TICKET:
                payload = {
                    "ticket_id": f"t-{prefix}-{k:05d}",
                    "topic": TICKET_TOPICS[aux % len(TICKET_TOPICS)],
                    "severity": TICKET_SEVERITIES[(aux // len(TICKET_TOPICS)) % len(TICKET_SEVERITIES)],
                }
            elif Kind.EMAIL_OPENED <= kind <= Kind.INAPP_CLICKED:
                channel = _RESPONSE_CHANNEL[kind - Kind.EMAIL_OPENED]
                payload = {"campaign_id": f"{channel}-{aux:03d}", "channel": channel}
            elif kind == Kind.LOGIN:
                payload = _LOGIN_PROPERTIES
            elif kind == Kind.SIGNED_UP:
                payload = {"method": "email", "plan": PLANS[aux % 3]}
            else:  # identify: aux = plan + 3 * code (IDENTIFY_SIGNUP, IDENTIFY_PLAN or a consent change)
                event_type, name = "identify", ""
                plan, code = aux % 3, aux // 3
                if code == IDENTIFY_SIGNUP:  # every trait, every channel's consent
                    payload = {"email": f"{user_id}@example.com", "plan": PLANS[plan], "country": home_country}
                    consent = signup_consent
                elif code == IDENTIFY_PLAN:
                    payload = {"plan": PLANS[plan]}
                else:  # one channel's consent changed: code = IDENTIFY_CONSENT + 2 * channel + granted
                    channel, granted = divmod(code - IDENTIFY_CONSENT, 2)
                    payload = {"email": f"{user_id}@example.com"}
                    consent = {f"channel:{CHANNELS[channel]}": bool(granted)}
            out.append(
                _Event(
                    event_type,
                    name,
                    at,
                    source,
                    payload,
                    context,
                    consent,
                    user_id,
                    f"a-{prefix}-{device}",
                    f"m-{prefix}-{k:05d}",
                )
            )
        return out


_EVENT_COLUMNS = ("t", "kind", "city", "zone", "device", "account", "card", "card_country", "total", "aux", "ip")
_RESPONSE_CHANNEL = ("email", "email", "sms", "push", "in_app")
# Payloads that do not vary are shared: the profile keeps references to event data and never mutates it.
_PAGE_PROPERTIES = tuple({"path": f"/{name.lower()}", "title": name} for name in SESSION_PAGES)
_NO_PROPERTIES: dict[str, Any] = {}
_LOGIN_PROPERTIES = {"method": "password"}
_NO_CONSENT: dict[str, bool] = {}


class _Event(NamedTuple):
    type: str
    name: str
    at: float
    source: str
    payload: dict[str, Any]
    context: dict[str, Any]
    consent: dict[str, bool]
    user_id: str
    anonymous_id: str
    message_id: str


def _context(prefix: str, number: int, city_index: int, zone: int, device: int, ip: int) -> dict[str, Any]:
    city = CITIES[city_index]
    if ip < 0:  # the person's own address in that city
        address = f"{city.ip_prefix}.{number % 251 + 2}.{(number // 251 + device * 17) % 251 + 2}"
    else:  # a proxy's
        address = f"{city.ip_prefix}.{ip % 251 + 2}.{(ip // 251) % 251 + 2}"
    return {
        "ip": address,
        "timezone": CITIES[zone].timezone,
        "device": {"id": f"d-{prefix}-{device}", "type": "mobile" if device == APP else "browser"},
        "location": {
            "country": city.country,
            "city": city.name,
            "latitude": city.latitude,
            "longitude": city.longitude,
        },
    }


def _segment(event: _Event) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": event.type,
        "messageId": event.message_id,
        "userId": event.user_id,
        "anonymousId": event.anonymous_id,
    }
    if event.type == "track":
        out["event"] = event.name
        out["properties"] = event.payload
    elif event.type == "identify":
        out["traits"] = event.payload
    else:
        out["name"] = event.name
        out["properties"] = event.payload
    context = event.context
    if event.consent:
        preferences = {key.split(":", 1)[1]: granted for key, granted in event.consent.items()}
        context = {**context, "consent": {"channelPreferences": preferences}}
    out["context"] = context
    out["timestamp"] = _iso(event.at)
    return out


# What identity counts in `ResolvedEvent.shared_with` (cdp_identity.domain.graph): persons seen with an
# identifier in the day before the event, evidence of one person noted at most once a minute.
SHARED_WINDOW = DAY
CONFLICT_REFRESH = 60.0
_NOT_SHARED: dict[str, int] = {}
_SHARED_COUNTS: dict[int, dict[str, int]] = {}


def identity_sharing(times: list[float], accounts: list[int], devices: list[int]) -> list[dict[str, int]]:
    """Per event of one simulated person (in time order), the `shared_with` identity's default rules give
    it: every account is a person of its own (one user id per person), a device - and its anonymous id,
    which the simulator derives from the device - belongs to the first account seen on it, and each other
    account seen on it is noted with the time (`IdentifierState.conflicts`). An event counts the accounts
    noted on its device in the day before it, plus the device's owner, less its own account; none when
    nobody was noted in that day."""
    owners: dict[int, int] = {}
    notes: dict[int, dict[int, float]] = {}
    out: list[dict[str, int]] = []
    for at, account, device in zip(times, accounts, devices, strict=True):
        owner = owners.setdefault(device, account)
        noted = notes.setdefault(device, {})
        if account != owner:
            last = noted.get(account)
            if last is None or not 0 <= at - last < CONFLICT_REFRESH:
                noted[account] = at
        horizon = at - SHARED_WINDOW
        others = {other for other, seen in noted.items() if seen >= horizon}
        if others:
            others.add(owner)
            others.discard(account)
        count = len(others)
        if not count:
            out.append(_NOT_SHARED)
            continue
        counts = _SHARED_COUNTS.get(count)
        if counts is None:
            counts = _SHARED_COUNTS[count] = {"device_id": count, "anonymous_id": count}
        out.append(counts)
    return out


# identity's bound on telling the persons already on a device of a new one (graph.SHARED_NOTIFY_MAX)
SHARED_NOTIFY_MAX = 10
IDENTIFIER_SHARED = "Identifier Shared"


def identity_told(times: list[float], accounts: list[int], devices: list[int]) -> list[tuple[int, int, dict[str, int]]]:
    """The "Identifier Shared" events identity's default rules publish for one simulated person's events (in
    time order): (index of the event that tells, the account told, its counts). An account new to a device
    in the day before an event (neither its owner nor noted on it in that day) tells each account seen
    with the device in that day - its owner and those noted - how many others it now shares it with,
    while that is at most SHARED_NOTIFY_MAX (cdp_identity.domain.graph: `Resolution.told`)."""
    owners: dict[int, int] = {}
    notes: dict[int, dict[int, float]] = {}
    out: list[tuple[int, int, dict[str, int]]] = []
    for index, (at, account, device) in enumerate(zip(times, accounts, devices, strict=True)):
        owner = owners.setdefault(device, account)
        if account == owner:
            continue
        noted = notes.setdefault(device, {})
        horizon = at - SHARED_WINDOW
        last = noted.get(account)
        if last is None or last < horizon:
            before = {other for other, seen in noted.items() if seen >= horizon} | {owner}
            count = len(before)  # each of them now shares the device with `before` less itself, plus `account`
            if count <= SHARED_NOTIFY_MAX:
                counts = {"device_id": count, "anonymous_id": count}
                out.extend((index, other, counts) for other in sorted(before))
        if last is None or not 0 <= at - last < CONFLICT_REFRESH:
            noted[account] = at
    return out


def _identifier_shared(cause: _Event, shared: dict[str, int]) -> ProfileEvent:
    """Identity's event for an account another joined on a device (codec.identifier_shared): at the time of
    the event that joined it, no identifiers, context or ids of anyone."""
    return ProfileEvent(
        event_id=f"identity:sh-{cause.message_id}-{shared['device_id']}",
        type="track",
        name=IDENTIFIER_SHARED,
        at=cause.at,
        source="identity",
        properties={"identifier_types": sorted(shared), "persons": max(shared.values())},
        traits=_NO_PROPERTIES,
        consent={},
        identifiers=(),
        shared=shared,
    )


def _profile(event: _Event, shared: dict[str, int] = _NOT_SHARED) -> ProfileEvent:
    # identifiers as identity's default rules extract them, strongest first
    identifiers = [f"user_id:{event.user_id}"]
    if event.type == "identify" and "email" in event.payload:
        identifiers.append(f"email:{event.payload['email']}")
    identifiers.append(f"device_id:{event.context['device']['id']}")
    identifiers.append(f"anonymous_id:{event.anonymous_id}")
    identify = event.type == "identify"
    return ProfileEvent(
        event_id=f"{event.source}:{event.message_id}",
        type=event.type,
        name=event.name,
        at=event.at,
        source=event.source,
        properties=_NO_PROPERTIES if identify else event.payload,
        traits=event.payload if identify else _NO_PROPERTIES,
        consent=event.consent,
        identifiers=tuple(identifiers),
        context=event.context,
        user_id=event.user_id,
        anonymous_id=event.anonymous_id,
        shared=shared,
    )


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _slice_outcomes(outcomes: Outcomes, lo: int, hi: int) -> Outcomes:
    return Outcomes(**{f.name: getattr(outcomes, f.name)[lo:hi].copy() for f in dataclasses.fields(Outcomes)})


# --- simulation --------------------------------------------------------------------------------------

# Gamma-Gamma spend: order value ~ Gamma(shape SPEND_P, rate nu), nu ~ Gamma(shape SPEND_Q, rate SPEND_GAMMA)
SPEND_P, SPEND_Q, SPEND_GAMMA = 5.0, 4.0, 40.0
_RESPONSE_BASE = np.array([0.026, 0.014, 0.022, 0.02])  # answers per day, per channel, before preferences
_PREFERENCE_WEIGHTS = np.array([0.40, 0.15, 0.25, 0.20])
_CONSENT_SHARE = np.array([0.85, 0.45, 0.70, 0.90])
_CONSENT_FLIP_SHARE = np.array([0.15, 0.10, 0.10, 0.04])  # unsubscribes mostly


class _Simulation:
    """One population's draws, in a fixed order (so one seed gives one population)."""

    def __init__(self, size: int, seed: int, cutoff: float, history_days: int, fraud_rate: float) -> None:
        self.n = size
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.cutoff = cutoff
        self.start = cutoff - history_days * DAY
        self.end = cutoff + CHURN_DAYS * DAY
        self.history_days = history_days
        self.fraud_rate = fraud_rate
        self.regime: RegimeShift | None = None
        self.shifted = np.zeros(size, dtype=bool)  # whose dropout the regime shift drew again
        self.zones = Zones(tuple(c.timezone for c in CITIES), self.start - 10 * DAY, self.end + 10 * DAY)
        self.rows = _Rows()
        self.next_card = 0

    # helpers ----------------------------------------------------------------------------------------

    def moments(self, rate: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A Poisson process per person (rate per day) on [lo, hi): (person, time) of each point."""
        span = np.maximum(hi - lo, 0.0)
        counts = self.rng.poisson(rate * span / DAY)
        who = np.repeat(np.arange(self.n), counts)
        return who, lo[who] + self.rng.random(who.size) * span[who]

    def at_hours(self, who: np.ndarray, t: np.ndarray, hour: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple:
        """Move each moment to its local day's `hour` (home time zone); drop those pushed out of [lo, hi)."""
        t = self.zones.at_local_hour(self.home[who], t, hour % 24)
        keep = (t >= lo[who]) & (t < hi[who])
        return who[keep], t[keep]

    def activity(self, who: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The thinning probability: 1 while engaged, fading to 0.15 over the weeks before a dropout (to 0.35
        over two to six weeks for a frustrated customer, who then stops at once), 0 while lapsed; a returning
        customer is engaged again from their return to their second dropout. A dip lowers it for its weeks."""
        fade, floor = self.fade_days[who] * DAY, self.fade_floor[who]
        first = np.where(t < self.tau[who], np.clip((self.tau[who] - t) / fade, floor, 1.0), 0.0)
        again = self.returns[who] & (t >= self.back_at[who]) & (t < self.tau2[who])
        level = np.where(again, np.clip((self.tau2[who] - t) / fade, floor, 1.0), first)
        dip = self.dips[who] & (t >= self.dip_at[who]) & (t < self.dip_at[who] + self.dip_days[who] * DAY)
        return np.where(dip, level * self.dip_depth[who], level)

    def thin(self, who: np.ndarray, t: np.ndarray, keep_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = self.rng.random(who.size) < keep_p
        return who[keep], t[keep]

    def session_hours(self, who: np.ndarray) -> np.ndarray:
        near = self.rng.random(who.size) < 0.5
        return np.where(near, self.rng.normal(self.pref_hour[who], 2.0), self.rng.uniform(7.0, 23.5, who.size))

    # the people ---------------------------------------------------------------------------------------

    def people(self) -> None:
        rng, n = self.rng, self.n
        weights = np.array([c.weight for c in CITIES])
        self.home = rng.choice(len(CITIES), size=n, p=weights / weights.sum()).astype(np.int16)
        self.signup = self.cutoff - rng.uniform(1.0, self.history_days, n) * DAY
        self.fraud = rng.random(n) < self.fraud_rate
        self.ring = self.fraud & (rng.random(n) < 0.6)
        self.takeover = self.fraud & ~self.ring
        self.engagement = rng.lognormal(0.0, 0.6, n)
        self.price = rng.beta(2.0, 2.0, n)
        self.app_user = (rng.random(n) < 0.55) & ~self.ring
        self.app_share = np.where(self.app_user, rng.beta(2.0, 2.0, n), 0.0)  # of sessions, on the app
        u = rng.random(n)
        p_pro = np.clip(0.06 * self.engagement, 0.0, 0.3)
        self.plan = np.where(u < p_pro, 2, np.where(u < p_pro + 0.2, 1, 0)).astype(np.int8)
        self.pref_hour = np.select(
            [u < 0.3, u < 0.5], [rng.normal(8.0, 1.0, n), rng.normal(12.5, 1.0, n)], rng.normal(20.0, 1.3, n)
        )
        self.pref_hour = rng.permutation(self.pref_hour) % 24  # not tied to the plan draw above
        self.hour_sd = rng.uniform(0.7, 2.2, n)

        allowed = np.ones((n, 4), dtype=bool)
        allowed[~self.app_user, 2:] = False
        self.allowed = allowed
        # heavy app users lean to push and in-app, web people to email: visible in sessions, not in answers
        lean = np.stack([1.6 - self.app_share, np.ones(n), 0.4 + 1.6 * self.app_share, 0.4 + 1.6 * self.app_share], 1)
        self.pref = self._choose_channel(allowed * lean)
        other = allowed * lean
        other[np.arange(n), self.pref] = 0.0
        self.pref_after = self._choose_channel(other)
        self.drifts = (rng.random(n) < 0.35) & (other > 0).any(axis=1)
        self.drift_at = self.signup + rng.random(n) * (self.cutoff - self.signup)
        noise = rng.lognormal(0.0, 0.5, (n, 4))
        scale = np.sqrt(self.engagement)[:, None] * noise * _RESPONSE_BASE
        boost_before = np.where(np.arange(4) == self.pref[:, None], 4.0, 1.0)
        boost_after = np.where(np.arange(4) == self.pref_after[:, None], 4.0, 1.0)
        self.rate_before = scale * boost_before * allowed
        self.rate_after = np.where(self.drifts[:, None], scale * boost_after, self.rate_before) * allowed
        self.consent0 = (rng.random((n, 4)) < _CONSENT_SHARE) & allowed
        self.flips = (rng.random((n, 4)) < _CONSENT_FLIP_SHARE) & allowed
        self.flip_at = self.signup[:, None] + rng.random((n, 4)) * (self.end - self.signup)[:, None]

        # dropout: a hazard per day, five times higher after a bad experience; activity fades before it
        hazard = np.exp(rng.normal(np.log(1 / 500), 0.9, n))
        hazard *= np.array([1.25, 0.9, 0.6])[self.plan] * (0.7 + 0.6 * self.price) / self.engagement**0.3
        tau = self.signup + rng.exponential(1.0, n) / hazard * DAY
        if self.regime is not None:
            tau = self.regime.dropout(self, tau, hazard)
        self.bad = rng.random(n) < 0.25
        self.bad_at = self.signup + rng.random(n) * (self.end - self.signup)
        after_bad = self.bad_at + rng.exponential(1.0, n) / (5 * hazard) * DAY
        self.bad &= self.bad_at < tau
        self.tau = np.where(self.bad, np.minimum(tau, after_bad), tau)
        self.fade_days = rng.uniform(20.0, 70.0, n)
        self.fade_floor = np.full(n, 0.15)
        self._frustration_and_dips()
        # a third of those who lapse come back some months later (a win-back, a new need)
        self.returns = rng.random(n) < 0.3
        self.back_at = self.tau + rng.exponential(150.0, n) * DAY
        self.tau2 = self.back_at + rng.exponential(1.0, n) / hazard * DAY

        self.order_rate = (
            rng.gamma(0.9, 1 / 45, n)
            * self.engagement**0.6
            * (1.3 - 0.6 * self.price)
            * np.array([1.0, 1.2, 1.5])[self.plan]
        )
        self.nu = rng.gamma(SPEND_Q, 1 / SPEND_GAMMA, n)
        self.n_cards = rng.choice([1, 2, 3], size=n, p=[0.75, 0.2, 0.05])
        self.card_country = _CITY_COUNTRY[self.home].copy()

        legit = ~self.fraud
        self.traveller = legit & (rng.random(n) < 0.06)
        self.vpn = legit & (rng.random(n) < 0.03)
        self.expat = legit & (rng.random(n) < 0.05)
        self.family = legit & (rng.random(n) < 0.02)
        self.spree = legit & (rng.random(n) < 0.04)  # several orders within hours, on several cards
        self.n_cards = np.where(self.spree, np.maximum(self.n_cards, 2), self.n_cards)
        self.browsers = legit & (rng.random(n) < 0.1)  # a second browser (work and home)
        shift = rng.integers(1, len(COUNTRIES), n)
        self.card_country = np.where(
            self.expat, (self.card_country + shift) % len(COUNTRIES), self.card_country
        ).astype(np.int16)
        self.vpn_city = ((self.home + rng.integers(1, len(CITIES), n)) % len(CITIES)).astype(np.int16)

        # fraud rings are fresh accounts that burst and vanish; takeovers hit an account with a history
        self.burst_at = np.full(n, np.inf)
        ring_burst = self.cutoff - rng.uniform(1 / 24, self.history_days - 5, n) * DAY
        self.burst_at = np.where(self.ring, ring_burst, self.burst_at)
        self.signup = np.where(self.ring, ring_burst - rng.uniform(0.2, 48.0, n) * HOUR, self.signup)
        self.burst_hours = np.where(self.ring, rng.uniform(1.0, 20.0, n), rng.uniform(0.2, 10.0, n))
        self.tau = np.where(self.ring, ring_burst + self.burst_hours * HOUR, self.tau)
        self.returns &= ~self.ring
        self.signup = np.where(
            self.takeover,
            np.minimum(self.signup, self.cutoff - rng.uniform(60, self.history_days, n) * DAY),
            self.signup,
        )
        self.tau = np.where(self.takeover, np.maximum(self.tau, self.signup + 30 * DAY), self.tau)
        last = np.minimum(self.tau, self.cutoff) - HOUR
        first = self.signup + 14 * DAY
        self.burst_at = np.where(self.takeover, first + rng.random(n) * (last - first), self.burst_at)
        self.alive_end = np.minimum(np.where(self.returns, self.tau2, self.tau), self.end)

    def _frustration_and_dips(self) -> None:
        """Three in five bad experiences are never put right: the customer uses the shop less and less over two to
        six weeks while the support tickets pile up, then leaves, often right after a last ticket (a refund,
        a cancellation). And a third of the customers go quiet for a while (holidays, a busy month) and come
        back: a dip in activity alone is no verdict. Drawn with their own generator, so the rest of `people`
        draws what it drew before them."""
        rng, n = np.random.default_rng([self.seed, 2]), self.n
        fade = rng.uniform(14.0, 42.0, n)
        self.frustrated = self.bad & ~self.fraud & (rng.random(n) < 0.6)
        self.tau = np.where(self.frustrated, np.minimum(self.tau, self.bad_at + fade * DAY), self.tau)
        self.frustrated &= self.tau > self.bad_at + 7 * DAY
        self.fade_days = np.where(self.frustrated, fade, self.fade_days)
        self.fade_floor = np.where(self.frustrated, 0.35, self.fade_floor)
        self.last_ticket = self.frustrated & (rng.random(n) < 0.4)
        self.dips = rng.random(n) < 0.35
        self.dip_at = self.signup + rng.random(n) * (self.cutoff + CHURN_DAYS * DAY - self.signup)
        self.dip_days = rng.uniform(7.0, 28.0, n)
        self.dip_depth = rng.uniform(0.35, 0.75, n)
        # regulars come ten times as often, most days (a shop they run their week on, an app they live in):
        # the customers whose week-on-month trend is more than noise
        self.regular = rng.random(n) < 0.25

    def _choose_channel(self, allowed: np.ndarray) -> np.ndarray:
        weights = _PREFERENCE_WEIGHTS * allowed
        total = weights.sum(axis=1, keepdims=True)
        cum = np.cumsum(weights / np.where(total > 0, total, 1.0), axis=1)
        return np.minimum((self.rng.random(self.n)[:, None] > cum).sum(axis=1), 3)

    # behaviour ----------------------------------------------------------------------------------------

    def signups(self) -> None:
        rng, n = self.rng, self.n
        everyone = np.arange(n)
        device = np.where(self.app_user & (rng.random(n) < 0.4), APP, WEB)
        device = np.where(self.ring, 2, device)
        self.rows.add(everyone, self.signup, Kind.IDENTIFY, device=device, aux=self.plan + 3 * IDENTIFY_SIGNUP)
        self.rows.add(everyone, self.signup + 2.0, Kind.SIGNED_UP, device=device, aux=self.plan)
        fam = np.flatnonzero(self.family)
        self.rows.add(
            fam,
            self.signup[fam] + rng.uniform(0.1, 20.0, fam.size) * HOUR,
            Kind.SIGNED_UP,
            device=device[fam],
            account=1,
            aux=self.plan[fam],
        )
        upgrade = (rng.random(n) < 0.08) & (self.plan < 2) & ~self.fraud
        at = self.signup + rng.random(n) * (self.alive_end - self.signup)
        up = np.flatnonzero(upgrade)
        self.rows.add(up, at[up], Kind.IDENTIFY, aux=self.plan[up] + 1 + 3 * IDENTIFY_PLAN)
        self.final_plan = np.where(upgrade & (at < self.cutoff), self.plan + 1, self.plan)
        for channel in range(4):
            flip = np.flatnonzero(self.flips[:, channel] & (self.flip_at[:, channel] < self.alive_end))
            granted = ~self.consent0[flip, channel]
            code = IDENTIFY_CONSENT + 2 * channel + granted.astype(int)
            self.rows.add(flip, self.flip_at[flip, channel], Kind.IDENTIFY, aux=self.plan[flip] + 3 * code)

    def sessions(self) -> None:
        rng = self.rng
        rate = np.minimum(0.06 * self.engagement * np.where(self.regular, 10.0, 1.0), 0.7)
        who, t = self.moments(rate, self.signup, self.alive_end)
        who, t = self.at_hours(who, t, self.session_hours(who), self.signup, self.alive_end)
        who, t = self.thin(who, t, self.activity(who, t))
        m = who.size
        app = rng.random(m) < self.app_share[who]
        device = np.where(app, APP, WEB)
        page = np.minimum(rng.geometric(0.45, m) - 1, len(PAGES) - 1)
        self.rows.add(who, t, np.where(app, Kind.SCREEN, Kind.PAGE), device=device, aux=page)
        login = rng.random(m) < 0.2
        self.rows.add(who[login], t[login] - 2.0, Kind.LOGIN, device=device[login])
        views = rng.poisson(0.3, m)
        rep = np.repeat(np.arange(m), views)
        step = np.arange(rep.size) - np.repeat(np.cumsum(views) - views, views)
        self.rows.add(
            who[rep],
            t[rep] + 45.0 * (step + 1),
            Kind.PRODUCT_VIEWED,
            device=device[rep],
            aux=rng.integers(0, 5000, rep.size),
        )
        add = (views > 0) & (rng.random(m) < 0.2)
        self.rows.add(
            who[add],
            t[add] + 45.0 * (views[add] + 1),
            Kind.PRODUCT_ADDED,
            device=device[add],
            aux=rng.integers(0, 5000, int(add.sum())),
        )

    def orders(self) -> None:
        who, t = self.moments(self.order_rate, self.signup, self.alive_end)
        who, t = self.at_hours(who, t, self.session_hours(who), self.signup, self.alive_end)
        who, t = self.thin(who, t, self.activity(who, t))
        self.add_orders(who, t)
        # a third of the customers sign up at checkout: their first order follows within minutes
        at_checkout = np.flatnonzero(~self.fraud & (self.rng.random(self.n) < 0.3))
        self.add_orders(at_checkout, self.signup[at_checkout] + self.rng.uniform(360.0, 1800.0, at_checkout.size))

    def add_orders(
        self,
        who: np.ndarray,
        t: np.ndarray,
        *,
        device: np.ndarray | None = None,
        city: Any = -1,
        ip: Any = -1,
        card: np.ndarray | None = None,
        card_country: np.ndarray | None = None,
        total: np.ndarray | None = None,
        account: Any = 0,
        flag: int = 0,
    ) -> None:
        """An order with its checkout page, product view and cart add a few minutes before it."""
        rng, m = self.rng, who.size
        if device is None:
            device = np.where(self.app_user[who] & (rng.random(m) < 0.5), APP, WEB)
        if card is None:
            card = who * 4 + rng.integers(0, self.n_cards[who])
        if card_country is None:
            card_country = self.card_country[who]
        if total is None:
            total = np.maximum(np.round(rng.gamma(SPEND_P, 1 / self.nu[who]), 2), 1.0)
        kind = np.where(device == APP, Kind.SCREEN, Kind.PAGE)
        common = {"device": device, "city": city, "ip": ip, "account": account, "flag": flag}
        self.rows.add(who, t - 300.0, kind, aux=len(PAGES), **common)
        product = rng.integers(0, 5000, m)
        self.rows.add(who, t - 240.0, Kind.PRODUCT_VIEWED, aux=product, **common)
        self.rows.add(who, t - 120.0, Kind.PRODUCT_ADDED, aux=product, **common)
        self.rows.add(
            who, t, Kind.ORDER, card=card, card_country=card_country, total=total, aux=rng.integers(0, 4, m), **common
        )

    def tickets(self) -> None:
        rng, n = self.rng, self.n
        who, t = self.moments(np.full(n, 1 / 700), self.signup, self.alive_end)
        who, t = self.thin(who, t, self.activity(who, t) > 0)
        self.rows.add(who, t, Kind.TICKET, aux=rng.integers(0, 15, who.size))
        # a bad experience brings a few tickets over a week or so, whether or not it is put right
        count = np.where(self.bad & (self.bad_at < self.alive_end), 1 + rng.poisson(1.5, n), 0)
        who = np.repeat(np.arange(n), count)
        t = self.bad_at[who] + rng.uniform(0, 8, who.size) * DAY
        severe = rng.integers(1, 3, who.size)  # normal or high
        self.rows.add(who, t, Kind.TICKET, aux=rng.integers(0, 5, who.size) + 5 * severe)
        self._frustrated_tickets()

    def _frustrated_tickets(self) -> None:
        """A frustrated customer's tickets come faster as the fade goes on (up to one every two days), and
        two in five leave right after a last one. Their own generator, like `_frustration_and_dips`."""
        rng = np.random.default_rng([self.seed, 3])
        lo = np.where(self.frustrated, self.bad_at + 3 * DAY, 0.0)
        hi = np.where(self.frustrated, np.minimum(self.tau, self.end), 0.0)
        span = np.maximum(hi - lo, 0.0)
        counts = rng.poisson(0.5 * span / DAY)
        who = np.repeat(np.arange(self.n), counts)
        t = lo[who] + rng.random(who.size) * span[who]
        keep = rng.random(who.size) < (t - lo[who]) / np.maximum(span[who], 1.0)  # the rate ramps up to 0.5/day
        who, t = who[keep], t[keep]
        self.rows.add(who, t, Kind.TICKET, aux=rng.integers(0, 5, who.size) + 5 * rng.integers(1, 3, who.size))
        last = np.flatnonzero(self.last_ticket & (self.tau < self.end))
        self.rows.add(
            last, self.tau[last] - rng.uniform(60.0, 6 * HOUR, last.size), Kind.TICKET, aux=1 + 5 * 2
        )  # billing, high

    def responses(self) -> None:
        rng = self.rng
        for channel in range(4):
            before, after = self.rate_before[:, channel], self.rate_after[:, channel]
            top = np.maximum(before, after)
            # lapsed customers still open an email now and then (never fraud rings: they are gone)
            until = np.where(self.ring, self.alive_end, self.end) if channel == 0 else self.alive_end
            who, t = self.moments(top, self.signup, until)
            hour = rng.normal(self.pref_hour[who], self.hour_sd[who])
            who, t = self.at_hours(who, t, hour, self.signup, until)
            drifted = self.drifts[who] & (t >= self.drift_at[who])
            rate = np.where(drifted, after[who], before[who])
            flipped = self.flips[who, channel] & (t >= self.flip_at[who, channel])
            consent = self.consent0[who, channel] ^ flipped
            activity = self.activity(who, t)
            if channel == 0:
                activity = np.maximum(activity, np.where(self.ring[who], 0.0, 0.05))
            keep_p = rate / np.maximum(top[who], 1e-12) * consent * activity
            who, t = self.thin(who, t, keep_p)
            device = APP if channel >= 2 else WEB
            week = ((t - self.start) // (7 * DAY)).astype(np.int32)
            self.rows.add(who, t, Kind.RESPONSES[channel], device=device, aux=week)
            if channel == 0:
                clicked = rng.random(who.size) < 0.2
                self.rows.add(who[clicked], t[clicked] + 60.0, Kind.EMAIL_CLICKED, aux=week[clicked])

    def fraud_bursts(self) -> None:
        rng = self.rng
        # rings: several accounts from one device or a few, cards from many countries, hopping locations
        rings = np.flatnonzero(self.ring)
        start, hours = self.burst_at[rings], self.burst_hours[rings]
        # not every ring shows every signal, and careful ones show none: one account, device, card and place
        careful = rng.random(rings.size) < 0.3
        accounts = np.where(
            (rng.random(rings.size) < 0.55) & ~careful, np.minimum(2 + rng.poisson(1.2, rings.size), 8), 1
        )
        devices = np.where((rng.random(rings.size) < 0.5) | careful, 1, 2 + rng.poisson(1.5, rings.size))
        hopping = (rng.random(rings.size) < 0.5) & ~careful
        proxies = self._proxies(rings.size, careful)
        extra = np.repeat(np.arange(rings.size), accounts - 1)
        first_extra = np.cumsum(accounts - 1) - (accounts - 1)  # each ring's first row in `extra`
        # the ring's further accounts, numbered 1, 2, ... in the order they sign up
        signed = start[extra] + rng.random(extra.size) * hours[extra] * HOUR
        signed = signed[np.lexsort((signed, extra))]
        self.rows.add(
            rings[extra],
            signed,
            Kind.SIGNED_UP,
            device=2 + rng.integers(0, devices[extra]),
            account=1 + (np.arange(extra.size) - np.repeat(first_extra, accounts - 1)),
            ip=proxies[0][extra] + rng.integers(0, proxies[1][extra]),
            flag=FRAUD_BURST,
        )
        count = 1 + rng.poisson(np.where(careful, 0.5, 1.5))
        k = np.repeat(np.arange(rings.size), count)
        who = rings[k]
        t = start[k] + rng.random(k.size) * hours[k] * HOUR
        single_card = (rng.random(rings.size) < 0.35) | careful
        base = self._fraud_cards(k.size)
        card = np.where(single_card[k], base[np.searchsorted(k, k)], base)  # one card: the ring's first
        city = np.where(hopping[k], rng.integers(0, len(CITIES), k.size), self.home[who])
        foreign_card = (rng.random(k.size) < 0.55) & ~careful[k]
        card_country = np.where(foreign_card, rng.integers(0, len(COUNTRIES), k.size), _CITY_COUNTRY[city])
        device = 2 + rng.integers(0, devices[k])
        ip = proxies[0][k] + rng.integers(0, proxies[1][k])
        total = np.round(rng.gamma(2.0, 50.0, k.size) + 5, 2)
        drawn = rng.integers(0, accounts[k])
        # an order comes from an account that has signed up by then (the first one always has)
        ready = np.array(
            [
                1 + int(np.searchsorted(signed[first_extra[r] : first_extra[r] + accounts[r] - 1], at, side="right"))
                for r, at in zip(k.tolist(), t.tolist(), strict=True)
            ],
            dtype=np.int64,
        )
        self.add_orders(
            who,
            t,
            device=device,
            city=city,
            ip=ip,
            card=card,
            card_country=card_country,
            total=total,
            account=drawn % ready,
            flag=FRAUD_BURST,
        )
        # takeovers: the owner seen at home, then hours later a new device elsewhere with new cards
        victims = np.flatnonzero(self.takeover)
        start, hours = self.burst_at[victims], self.burst_hours[victims]
        careful = rng.random(victims.size) < 0.3  # a proxy near the victim, the victim's saved card
        proxies = self._proxies(victims.size, careful)
        seen = (rng.random(victims.size) < 0.6) & ~careful
        self.rows.add(victims[seen], start[seen] - rng.uniform(0.5, 5.0, int(seen.sum())) * HOUR, Kind.PAGE, aux=0)
        abroad = (rng.random(victims.size) < 0.6) & ~careful
        city = np.where(
            abroad, (self.home[victims] + rng.integers(1, len(CITIES), victims.size)) % len(CITIES), self.home[victims]
        )
        new_devices = 1 + (rng.random(victims.size) < 0.3)
        self.rows.add(victims, start, Kind.LOGIN, device=2, city=city, ip=proxies[0], flag=FRAUD_BURST)
        count = 1 + rng.poisson(1.0, victims.size)
        k = np.repeat(np.arange(victims.size), count)
        who = victims[k]
        t = start[k] + rng.uniform(0.1, 1.0, k.size) * hours[k] * HOUR
        new_card = (rng.random(k.size) < 0.6) & ~careful[k]
        card = np.where(new_card, self._fraud_cards(k.size), who * 4)
        foreign_card = (rng.random(k.size) < 0.5) & new_card
        card_country = np.where(foreign_card, rng.integers(0, len(COUNTRIES), k.size), self.card_country[who])
        self.add_orders(
            who,
            t,
            device=2 + rng.integers(0, new_devices[k]),
            city=city[k],
            ip=proxies[0][k] + rng.integers(0, proxies[1][k]),
            card=card,
            card_country=card_country,
            total=np.round(rng.gamma(2.0, 60.0, k.size) + 5, 2),
            flag=FRAUD_BURST,
        )

    def _proxies(self, count: int, careful: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first address number, how many) of each fraudster's proxy pool; careful ones use one."""
        first = self.rng.integers(0, 60_000, count)
        return first, np.where(careful, 1, 1 + self.rng.poisson(1.5, count))

    def _fraud_cards(self, count: int) -> np.ndarray:
        cards = 1_500_000_000 + self.next_card + np.arange(count)
        self.next_card += count
        return cards

    def trips(self) -> None:
        """Travellers: one trip with an order abroad for most of them (added before locations are set)."""
        rng, n = self.rng, self.n
        span = self.alive_end - self.signup
        self.traveller &= span > 20 * DAY
        self.trip_start = self.signup + DAY + rng.random(n) * np.maximum(span - 15 * DAY, 0)
        self.trip_days = rng.uniform(2.0, 12.0, n)
        self.trip_city = ((self.home + rng.integers(1, len(CITIES), n)) % len(CITIES)).astype(np.int16)
        km = haversine_km(
            _CITY_LAT[self.home], _CITY_LON[self.home], _CITY_LAT[self.trip_city], _CITY_LON[self.trip_city]
        )
        self.flight = (km / 800.0 + 2.0) * HOUR
        ordering = np.flatnonzero(self.traveller & (rng.random(n) < 0.6))
        arrive = self.trip_start[ordering] + self.flight[ordering]
        leave = self.trip_start[ordering] + self.trip_days[ordering] * DAY
        t = arrive + rng.uniform(0.1, 0.9, ordering.size) * np.maximum(leave - arrive, HOUR) + 400.0
        self.add_orders(ordering, np.minimum(t, leave - 1.0), flag=UNUSUAL_ORDER)

    def sprees(self) -> None:
        """Legitimate bursts: a few orders within hours on the person's different cards (gifts, a move)."""
        rng, n = self.rng, self.n
        at = self.signup + rng.random(n) * (self.alive_end - self.signup)
        shoppers = np.flatnonzero(self.spree & (self.activity(np.arange(n), at) > 0))
        count = np.minimum(2 + rng.poisson(1.0, shoppers.size), 5)
        k = np.repeat(np.arange(shoppers.size), count)
        who = shoppers[k]
        step = np.arange(k.size) - np.repeat(np.cumsum(count) - count, count)
        t = at[who] + rng.uniform(0.0, 6.0, k.size) * HOUR
        self.add_orders(who, t, card=who * 4 + step % self.n_cards[who], flag=UNUSUAL_ORDER)

    def place(self, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Resolve default locations and time zones; move travellers' and VPN users' events."""
        person, t = table["person"], table["t"]
        city = np.where(table["city"] < 0, self.home[person], table["city"]).astype(np.int16)
        zone = table["zone"].copy()
        trav = self.traveller[person]
        start = self.trip_start[person]
        arrive = start + self.flight[person]
        leave = start + self.trip_days[person] * DAY
        abroad = trav & (t >= arrive) & (t < leave)
        city = np.where(abroad, self.trip_city[person], city)
        in_air = trav & (((t >= start) & (t < arrive)) | ((t >= leave) & (t < leave + self.flight[person])))
        web = table["device"] == WEB
        vpn = self.vpn[person] & web & (self.rng.random(t.size) < 0.3)
        city = np.where(vpn, self.vpn_city[person], city)
        zone = np.where(vpn, self.home[person], zone)  # a VPN moves the address, not the clock
        # phones get a new carrier address every day
        mobile = (table["device"] == APP) & (table["ip"] < 0)
        daily = 100_000 + (person.astype(np.int64) * 7919 + (t // DAY).astype(np.int64)) % 900_000
        table["ip"] = np.where(mobile, daily, table["ip"]).astype(np.int32)
        second = self.browsers[person] & web & (self.rng.random(t.size) < 0.4)
        table["device"] = np.where(second, SECOND_BROWSER, table["device"]).astype(np.int16)
        table["city"] = city
        table["zone"] = np.where(zone < 0, city, zone).astype(np.int16)
        keep = ~in_air & (t < self.end)
        return {name: column[keep] for name, column in table.items()}


def simulate(
    size: int,
    seed: int,
    *,
    cutoff: float = DEFAULT_CUTOFF,
    history_days: int = 540,
    fraud_rate: float = 0.025,
    regime: RegimeShift | None = None,
) -> Population:
    """A population of `size` people; the same arguments always give the same population. `regime`: a
    change of behaviour during the simulated span (`RegimeShift`)."""
    if size < 1:
        raise ValueError(f"size must be at least 1, not {size}")
    sim = _Simulation(size, seed, cutoff, history_days, fraud_rate)
    sim.regime = regime
    sim.people()
    if regime is not None:
        regime.fade(sim)
    sim.signups()
    sim.sessions()
    sim.orders()
    sim.tickets()
    sim.responses()
    sim.fraud_bursts()
    sim.trips()
    sim.sprees()
    table = sim.place(sim.rows.build())
    n = size
    person, t = table["person"], table["t"]
    bounds = np.searchsorted(person, np.arange(n + 1), side="left")
    local_hour = sim.zones.local_hour(table["zone"], t)
    outcomes = _outcomes(n, table, local_hour, cutoff)
    fraud_at = _fraud_moments(sim, table)
    traits = {
        "home": sim.home,
        "signup": sim.signup,
        "engagement": sim.engagement,
        "price_sensitivity": sim.price,
        "app_user": sim.app_user,
        "plan": sim.final_plan,
        "preferred_channel": sim.pref,
        "preferred_channel_after": np.where(sim.drifts, sim.pref_after, sim.pref),
        "drift_at": np.where(sim.drifts, sim.drift_at, np.inf),
        "preferred_hour": sim.pref_hour,
        "consent0": sim.consent0,
        "dropout_at": sim.tau,
        "bad_experience": sim.bad,
        "frustrated": sim.frustrated,
        "dip_at": np.where(sim.dips, sim.dip_at, np.inf),
        "dip_days": np.where(sim.dips, sim.dip_days, 0.0),
        "regular": sim.regular,
        "order_rate": sim.order_rate,
        "spend_nu": sim.nu,
        "fraudster": sim.fraud,
        "fraud_ring": sim.ring,
        "account_takeover": sim.takeover,
        "traveller": sim.traveller,
        "vpn": sim.vpn,
        "expat": sim.expat,
        "family": sim.family,
        "spree": sim.spree,
        "second_browser": sim.browsers,
    }
    return Population(
        seed=seed,
        size=n,
        cutoff=cutoff,
        start=sim.start,
        end=sim.end,
        traits=traits,
        table=table,
        bounds=bounds,
        fraud_at=fraud_at,
        outcomes=outcomes,
        local_hour=local_hour,
    )


def _outcomes(n: int, table: dict[str, np.ndarray], local_hour: np.ndarray, cutoff: float) -> Outcomes:
    person, t, kind = table["person"], table["t"], table["kind"]
    after = t >= cutoff
    active = np.bincount(person[after & (t < cutoff + CHURN_DAYS * DAY)], minlength=n)
    order = kind == Kind.ORDER
    purchased = np.bincount(person[order & after & (t < cutoff + PURCHASE_DAYS * DAY)], minlength=n)
    orders_after = np.bincount(person[order & after & (t < cutoff + CHURN_DAYS * DAY)], minlength=n)
    window = after & (t < cutoff + RESPONSE_DAYS * DAY)
    responses = np.zeros((n, 4), dtype=np.int64)
    first_at = np.full((n, 4), np.inf)
    first_hour = np.full((n, 4), -1, dtype=np.int64)
    for channel, response in enumerate(Kind.RESPONSES):
        rows = np.flatnonzero(window & (kind == response))
        responses[:, channel] = np.bincount(person[rows], minlength=n)
        who, first = np.unique(person[rows], return_index=True)  # rows are in time order per person
        first_at[who, channel] = t[rows[first]]
        first_hour[who, channel] = local_hour[rows[first]]
    best = responses.max(axis=1)
    # the channel answered most; among ties, the one answered first
    tied_at = np.where(responses == best[:, None], first_at, np.inf)
    channel = np.where(best > 0, np.argmin(tied_at, axis=1), -1)
    hour = np.where(channel >= 0, first_hour[np.arange(n), np.maximum(channel, 0)], -1)
    fraudster = np.zeros(n, dtype=bool)
    fraudster[np.unique(person[table["flag"] == FRAUD_BURST])] = True
    return Outcomes(
        churned=active == 0,
        lapsed=np.bincount(
            person[(t >= cutoff + LAPSE_GRACE_DAYS * DAY) & (t < cutoff + CHURN_DAYS * DAY)], minlength=n
        )
        == 0,
        purchased=purchased > 0,
        orders_after=orders_after,
        is_fraudster=fraudster,
        response_channel=channel,
        response_hour=hour,
        responses=responses,
    )


def _fraud_moments(sim: _Simulation, table: dict[str, np.ndarray]) -> np.ndarray:
    """When each person's fraud score is read: the last order of a fraud burst; else one of the person's
    orders before the cutoff (for half the travellers who ordered abroad and the spree shoppers, one of those
    unusual orders); else their last event before the cutoff."""
    n = sim.n
    person, t, kind, flag = table["person"], table["t"], table["kind"], table["flag"]
    history = t < sim.cutoff
    out = np.full(n, np.nan)
    last = np.flatnonzero(history)
    out[person[last]] = t[last]  # rows are sorted: the last assignment per person wins
    candidates = np.flatnonzero(history & (kind == Kind.ORDER))
    key = sim.rng.random(candidates.size)
    unusual = (flag[candidates] == UNUSUAL_ORDER) & (sim.rng.random(n) < 0.5)[person[candidates]]
    key = np.where(unusual, key + 1.0, key)
    burst = flag[candidates] == FRAUD_BURST
    key = np.where(burst, 2.0 + (t[candidates] - sim.start) / (sim.end - sim.start), key)
    order = np.lexsort((key, person[candidates]))
    chosen = candidates[order]
    out[person[chosen]] = t[chosen]  # the highest key per person is assigned last
    return out
