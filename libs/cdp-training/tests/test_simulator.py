"""The customer simulator: one seed, one population; people behave as their latent traits say; events come
out in the two forms the platform takes (Segment JSON for the collector, ProfileEvent for the profile)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import orjson

from cdp.events.v1 import events_pb2
from cdp_collector.domain.segment import parse_request
from cdp_profile.domain.computed import local_hour
from cdp_profile.events import to_profile_event
from cdp_training.simulator import CHANNELS, CITIES, Kind, RegimeShift, identity_sharing, identity_told, simulate

REQUIRED = {"type", "messageId", "userId", "anonymousId", "context", "timestamp"}


def test_same_seed_same_population_other_seed_other_people():
    a, b, c = simulate(300, 5), simulate(300, 5), simulate(300, 6)
    for name, column in a.table.items():
        assert np.array_equal(column, b.table[name]), name
    assert np.array_equal(a.fraud_at, b.fraud_at)
    assert np.array_equal(a.outcomes.churned, b.outcomes.churned)
    assert a.segment_events(7) == b.segment_events(7)
    assert a.table["t"].size != c.table["t"].size or not np.array_equal(a.table["t"], c.table["t"])


def test_outcomes_are_plausible_and_follow_the_latent_traits():
    people = simulate(4000, 3)
    out = people.outcomes
    assert 0.2 < out.churned.mean() < 0.6
    assert 0.1 < out.purchased.mean() < 0.4
    assert 0.015 < out.is_fraudster.mean() < 0.035
    assert set(np.unique(out.response_channel)) == {-1, 0, 1, 2, 3}
    # the outcome labels come from the simulated behaviour, not from noise
    lapsed = people.traits["dropout_at"] < people.cutoff - 60 * 86400
    assert out.churned[lapsed].mean() > out.churned[~lapsed].mean() + 0.3
    buyers = people.traits["order_rate"] > np.quantile(people.traits["order_rate"], 0.8)
    assert out.purchased[buyers].mean() > 2 * out.purchased[~buyers].mean()
    answered = out.response_channel >= 0
    preferred = people.traits["preferred_channel_after"][answered]
    assert np.mean(out.response_channel[answered] == preferred) > 0.5
    # answers come near the preferred local hour
    gap = np.abs(out.response_hour[answered] - people.traits["preferred_hour"][answered]) % 24
    assert np.median(np.minimum(gap, 24 - gap)) <= 2.5


def test_fraudsters_show_the_fraud_signals(population, fields):
    fraud = population.outcomes.is_fraudster
    assert 40 < fraud.sum() < 120

    def feature(name):
        return np.array([float(f.get(f"computed.{name}", 0) or 0) for f in fields.at_fraud])

    for name in ("cards_24h", "geo_mismatch_24h", "ips_24h", "orders_24h", "shared_device_accounts_24h"):
        values = feature(name)
        assert values[fraud].mean() > 1.5 * values[~fraud].mean() + 0.1, name
    # The fraud moment reads the profile of the account that placed the order (identity's default rules:
    # one user id per person), so what a ring shows across its accounts - sign-ups, places - shows only
    # in part there; the other accounts on its device show in shared_device_accounts_24h.
    for name in ("countries_24h", "accounts_24h"):
        values = feature(name)
        assert values[fraud].mean() > values[~fraud].mean(), name
    speed = feature("max_speed_kmh_24h")
    assert np.mean(speed[fraud] > 1000) > 3 * np.mean(speed[~fraud] > 1000)  # impossible travel
    age = np.array(
        [(at - f["computed.signed_up_at"]) / 86400 for f, at in zip(fields.at_fraud, population.fraud_at, strict=True)]
    )
    rings = population.traits["fraud_ring"]
    assert np.all(age[rings] < 3)  # ring accounts are hours old when they order


def test_local_hours_are_the_hours_computed_traits_see(population):
    rows = np.arange(0, population.table["t"].size, 97)
    for row in rows:
        zone = population.table["zone"][row]
        expected = local_hour(float(population.table["t"][row]), CITIES[zone].timezone)
        assert population.local_hour[row] == expected


def test_segment_events_are_valid_segment_calls(population):
    events = [e for person in range(50) for e in population.segment_events(person)]
    assert {e["type"] for e in events} == {"track", "identify", "page", "screen"}
    ids = [e["messageId"] for e in events]
    assert len(ids) == len(set(ids))
    for event in events:
        assert event.keys() >= REQUIRED
        assert ("event" in event) == (event["type"] == "track")
        assert ("traits" in event) == (event["type"] == "identify")
        assert {"ip", "timezone", "device", "location"} <= event["context"].keys()
        assert datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    orders = [e for e in events if e.get("event") == "Order Completed"]
    assert orders and all(
        {"order_id", "total", "currency", "card_fingerprint", "card_country", "items"} <= o["properties"].keys()
        for o in orders
    )
    names = {e.get("event") for e in events}
    assert {"Product Viewed", "Product Added", "Email Opened", "Signed Up"} <= names


def test_both_forms_agree_through_the_collector_and_the_profile_conversion(population):
    """Segment JSON parsed by the collector and converted by the profile service gives exactly the
    ProfileEvent the training pipeline applies."""
    for person in (0, 1, 2, int(np.flatnonzero(population.outcomes.is_fraudster)[0])):
        direct = population.profile_events(person)
        sent = population.segment_events(person)
        assert len(direct) == len(sent)
        for event, segment in zip(direct, sent, strict=True):
            parsed = parse_request(
                "batch",
                orjson.dumps({"batch": [segment]}),
                received_at=datetime(2026, 1, 1, tzinfo=UTC),
                source_id=event.source,
            )
            (proto,) = [e for _, e in parsed.valid()]
            resolved = events_pb2.ResolvedEvent(
                event=proto, person_id=population.person_id(person), identifiers=list(event.identifiers)
            )
            assert to_profile_event(resolved, needs_context=True) == event


def test_every_channel_and_kind_occurs():
    people = simulate(1500, 4)
    kinds = set(np.unique(people.table["kind"]).tolist())
    assert kinds == set(range(len(Kind.NAMES)))
    assert (people.outcomes.responses.sum(axis=0) > 0).all() and len(CHANNELS) == 4


def test_the_stream_is_everyone_in_time_order(population):
    stream = list(population.segment_stream(until=population.cutoff))
    assert len(stream) == sum(len(population.rows(p, population.cutoff)) for p in range(population.size))
    times = [e["timestamp"] for e in stream]
    assert times == sorted(times)


def test_a_regime_shift_changes_who_leaves_after_it_and_nothing_before_it():
    """App users start leaving at the change; people who had left before it are untouched; a population
    without a shift is the one it always was (the shift draws from its own generator)."""
    plain = simulate(2000, 9)
    change = (plain.start + plain.end) / 2
    shifted = simulate(2000, 9, regime=RegimeShift(change, app_factor=4.0, web_factor=0.4))
    assert np.array_equal(simulate(2000, 9).table["t"], plain.table["t"])
    before, after = plain.traits["dropout_at"], shifted.traits["dropout_at"]
    gone = before <= change
    assert np.array_equal(before[gone], after[gone])
    app = shifted.traits["app_user"]
    churn = shifted.outcomes.churned
    assert churn[app].mean() > 1.5 * churn[~app].mean()  # after the change, app users churn far more
    assert abs(plain.outcomes.churned[app].mean() - plain.outcomes.churned[~app].mean()) < 0.1  # before: alike


def _per_person(people, kinds, lo, hi) -> np.ndarray:
    """Events of `kinds` per person in [lo, hi) (arrays of instants, one per person)."""
    table = people.table
    person, t = table["person"], table["t"]
    hit = np.isin(table["kind"], kinds) & (t >= lo[person]) & (t < hi[person])
    return np.bincount(person[hit], minlength=people.size)


def test_frustrated_customers_fade_while_their_tickets_pile_up_and_quiet_spells_end():
    """Churners do not drop off a cliff: a frustrated customer's last weeks are quieter than the month before
    and busier with tickets; a customer's quiet spell is quieter than before it, and she comes back after."""
    people = simulate(6000, 4)
    traits, week = people.traits, 7 * 86400.0
    sessions, tickets = (Kind.PAGE, Kind.SCREEN), (Kind.TICKET,)
    tau, bad = traits["dropout_at"], traits["bad_experience"]
    # frustrated customers who left within the history, with a month of use before their fade
    left = traits["frustrated"] & (tau < people.cutoff) & (tau - 50 * week / 7 > traits["signup"])
    assert left.sum() > 100
    last_week = _per_person(people, sessions, tau - week, tau)[left]
    month_before = _per_person(people, sessions, tau - 50 * week / 7, tau - 20 * week / 7)[left]
    assert last_week.sum() / 7 < 0.6 * month_before.sum() / 30, "activity fades before they leave"
    late_tickets = _per_person(people, tickets, tau - 2 * week, tau)[left]
    assert late_tickets.mean() > 2.0, "tickets pile up as they go"
    # and plenty of customers file tickets and stay: tickets alone are no verdict
    stayed = bad & ~traits["frustrated"] & (traits["signup"] < people.cutoff - 365 * 86400.0)
    assert (
        _per_person(people, tickets, np.full(people.size, people.start), np.full(people.size, people.cutoff))[stayed]
        >= 3
    ).sum() > 50
    # a quiet spell: fewer sessions during it than in as long before it, and as many again after it
    dip_at, dip_days = traits["dip_at"], traits["dip_days"] * 86400.0
    spell = (
        traits["regular"]
        & (dip_at - dip_days > traits["signup"])
        & (dip_at + 2 * dip_days < np.minimum(tau, people.cutoff))
    )
    assert spell.sum() > 20
    before = _per_person(people, sessions, dip_at - dip_days, dip_at)[spell].sum()
    during = _per_person(people, sessions, dip_at, dip_at + dip_days)[spell].sum()
    after = _per_person(people, sessions, dip_at + dip_days, dip_at + 2 * dip_days)[spell].sum()
    assert during < 0.75 * before and after > 0.9 * before


def test_churn_risk_labels_a_lapse_a_month_on_not_an_absence_already_under_way():
    """`lapsed` is no event in the 60 days after the first 30 after the cutoff: customers active at the cutoff
    who leave within the month count, those already gone count too, and `churned` stays what it was."""
    people = simulate(3000, 3)
    out, table = people.outcomes, people.table
    person, t = table["person"], table["t"]
    late = (t >= people.cutoff + 30 * 86400.0) & (t < people.cutoff + 90 * 86400.0)
    assert np.array_equal(out.lapsed, np.bincount(person[late], minlength=people.size) == 0)
    assert np.all(out.lapsed[out.churned])
    soon = (t >= people.cutoff) & (t < people.cutoff + 30 * 86400.0)
    leaving = out.lapsed & (np.bincount(person[soon], minlength=people.size) > 0)
    assert leaving.sum() > 30


def test_identity_sharing_counts_the_other_accounts_on_a_device_in_the_day_before_each_event():
    """As identity's default rules count them (`ResolvedEvent.shared_with`): the device belongs to the
    first account seen on it; an event counts the others seen on it in the last day, the owner included,
    itself not; a device on one account only counts nothing."""
    minute, day = 60.0, 86_400.0
    times = [0.0, minute, 2 * minute, 3 * minute, 4 * minute, day + 1.5 * minute, 3 * day]
    accounts = [0, 1, 2, 0, 1, 0, 0]
    devices = [2, 2, 2, 2, 3, 2, 2]
    counts = [c.get("device_id", 0) for c in identity_sharing(times, accounts, devices)]
    assert counts == [0, 1, 2, 2, 0, 1, 0]  # device 3 is account 1's alone; a day on, only account 2 is recent


def test_the_fraud_moment_of_a_ring_reads_its_own_accounts_events_only(population):
    rings = [p for p in range(population.size) if population.traits["fraud_ring"][p]]
    several = [p for p in rings if population.fraud_events(p, population.cutoff) is not None]
    assert several, "some rings open several accounts"
    for person in several:
        events = population.fraud_events(person, population.cutoff)
        # its own account's events, and identity's "Identifier Shared" (nobody's user id) for accounts
        # that joined its device after it
        assert len({e.user_id for e in events if e.source != "identity"}) == 1
        assert {e.user_id for e in events if e.source == "identity"} <= {""}
        assert any(e.at == population.fraud_at[person] and e.name == "Order Completed" for e in events)
    single = next(
        p for p in range(population.size) if not (population.traits["fraud_ring"] | population.traits["family"])[p]
    )
    assert population.fraud_events(single, population.cutoff) is None


def test_identity_tells_the_accounts_already_on_a_device_of_each_account_that_joins_them():
    """As identity's default rules publish "Identifier Shared" (`Resolution.told`): each account new to a
    device in a day tells those seen with it in that day (its owner too) how many others they now share
    it with; the joining account is never told, an account back on it tells nobody."""
    minute, day = 60.0, 86_400.0
    times = [0.0, minute, 2 * minute, 3 * minute, 4 * minute, day + 2.5 * minute]
    accounts = [0, 1, 2, 1, 3, 1]
    devices = [2, 2, 2, 2, 3, 2]
    told = [(index, account, counts["device_id"]) for index, account, counts in identity_told(times, accounts, devices)]
    # account 2 joins (event 2): accounts 0 and 1 learn of it; account 3 is alone on device 3; a day on,
    # account 1 has been gone a day less 30 s - still noted - so its return tells nobody.
    assert told == [(1, 0, 1), (2, 0, 2), (2, 1, 2)]
