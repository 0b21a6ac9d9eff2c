"""Point-in-time training sets: a row at cut-off T holds what the platform knew at T, and its label what
happened after. The story: one customer, Ada, whose life goes on after T."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import MemoryStore
from cdp_profile.domain import ComputedTraits, Profile, ProfileEvent, Retention
from cdp_scoring.domain import ModelSpec
from cdp_training.labels import LabelSpec
from cdp_training.platformdata import apply_all, write_people, write_population, write_profiles
from cdp_training.pointintime import (
    _doc_at,
    iter_profiles,
    profile_at,
    read_profiles,
    training_set,
    training_set_from_store,
)
from cdp_training.simulator import simulate
from cdp_training.traits import COMPUTED_TRAITS, ENGAGEMENT_FEATURES, traits_for

DAY = 86_400.0
T = 1_750_000_000.0

SPEC = ModelSpec.from_dict(
    {
        "name": "churn_risk",
        "version": "2.0.0",
        "features": ENGAGEMENT_FEATURES,
        "outputs": [{"score": "churn_risk", "output": "probabilities", "index": 1}],
        "computed_traits": traits_for(ENGAGEMENT_FEATURES),
    }
)
CHURN = {"kind": "no_activity", "window": "90d"}
# the shipped churn_risk's label: lapsed a month on, no activity in (T + 30d, T + 90d]
LAPSE = {"kind": "no_activity", "after": "30d", "window": "60d"}
PURCHASE = {"kind": "goal_event", "window": "30d", "events": [{"name": "Order Completed"}]}


def track(n: str, name: str, at: float, **properties) -> ProfileEvent:
    return ProfileEvent(n, "track", name, at, "web", properties=properties)


def identify(n: str, at: float, consent: dict | None = None, **traits) -> ProfileEvent:
    return ProfileEvent(n, "identify", "", at, "web", traits=traits, consent=consent or {})


def page(n: str, at: float) -> ProfileEvent:
    return ProfileEvent(n, "page", "Home", at, "web")


ADA_BEFORE = [
    identify("a1", T - 200 * DAY, {"channel:email": True}, plan="free"),
    track("a2", "Signed Up", T - 200 * DAY + 1),
    page("a3", T - 20 * DAY),
    track("a4", "Order Completed", T - 10 * DAY, total=40.0),
    track("a5", "Support Ticket Opened", T - 5 * DAY),
    page("a6", T - 1 * DAY),
]
# Everything after T that a leaking feature would pick up: more orders and sessions (counts, revenue,
# last order), a plan change (traits), email consent withdrawn (consent), an event a second after T.
ADA_AFTER = [
    track("a7", "Order Completed", T + 1, total=900.0),
    page("a8", T + 2 * DAY),
    identify("a9", T + 3 * DAY, {"channel:email": False}, plan="pro"),
    track("a10", "Order Completed", T + 4 * DAY, total=500.0),
    track("a11", "Product Viewed", T + 5 * DAY),
]
# Bob goes quiet at T; Cy only arrives after T; Dee's last event is the end of the observed data.
BOB = [identify("b1", T - 100 * DAY, plan="plus"), page("b2", T - 50 * DAY)]
CY = [identify("c1", T + 10 * DAY, plan="free")]
DEE = [page("d1", T - 30 * DAY), page("d2", T + 120 * DAY)]
DEFINITIONS = list(COMPUTED_TRAITS.values())


async def _profiles(people: dict[str, list[ProfileEvent]]):
    store = MemoryStore()
    await write_people(store, people, DEFINITIONS)
    return await read_profiles(store)


async def test_events_after_the_cutoff_never_reach_a_row_at_the_cutoff():
    everything = await _profiles({"ada": ADA_BEFORE + ADA_AFTER, "bob": BOB, "cy": CY, "dee": DEE})
    known_at_t = await _profiles({"ada": ADA_BEFORE, "bob": BOB, "dee": DEE[:1]})
    end = T + 120 * DAY
    full = training_set(everything, spec=SPEC, label=CHURN, cutoff=T)
    past_only = training_set(known_at_t, spec=SPEC, label=CHURN, cutoff=T, until=end)

    assert full.person_ids == ["ada", "bob", "dee"]  # cy did not exist at T
    assert full.skipped_unborn == 1
    np.testing.assert_array_equal(full.X, past_only.X)  # the future changed no feature, bit for bit
    assert full.fields == past_only.fields
    ada = dict(zip([f.name for f in SPEC.features], full.X[0].tolist(), strict=True))
    assert ada["orders_total"] == 1 and ada["revenue_365d"] == 40.0 and ada["avg_order_value"] == 40.0
    assert ada["days_since_last_order"] == pytest.approx(10.0)
    assert ada["days_since_last_session"] == pytest.approx(1.0)
    assert ada["consent_email"] == 1.0
    assert ada["plan"] == 0.0  # "free" as at T, not "pro"
    assert ada["tickets_90d"] == 1
    # the labels do read the future: ada stayed active, bob churned, dee came back within 90 days? no: 120
    assert full.y[:, 0].tolist() == [0.0, 1.0, 1.0]
    assert past_only.y[:, 0].tolist() == [1.0, 1.0, 1.0]


async def test_the_same_store_and_cutoff_give_the_same_rows_and_data_hash():
    people = {"ada": ADA_BEFORE + ADA_AFTER, "bob": BOB, "dee": DEE}
    one = training_set(await _profiles(people), spec=SPEC, label=PURCHASE, cutoff=T)
    two = training_set(await _profiles(dict(reversed(people.items()))), spec=SPEC, label=PURCHASE, cutoff=T)
    assert one.data_hash == two.data_hash
    assert one.y[:, 0].tolist() == [1.0, 0.0, 0.0]  # an order within 30 days of T: ada only
    other_label = training_set(await _profiles(people), spec=SPEC, label=CHURN, cutoff=T)
    assert other_label.data_hash != one.data_hash


async def test_labels_of_each_kind_are_read_from_the_window_after_the_cutoff():
    events = [
        page("x1", T - 5 * DAY),
        track("x2", "Email Opened", T + DAY, channel="email"),
        track("x3", "SMS Clicked", T + 2 * DAY, channel="sms"),
        track("x4", "SMS Clicked", T + 3 * DAY, channel="sms"),
        track("x5", "Case Closed", T + 4 * DAY, resolution="resolved"),
        track("x6", "Order Completed", T + 5 * DAY, total=30.0),
        track("x7", "Order Completed", T + 50 * DAY, total=20.0),
        track("x8", "Case Closed", T + 60 * DAY, resolution="fraud"),
        page("x9", T + 400 * DAY),
    ]
    profiles = await _profiles({"x": events})

    def label(spec: dict) -> list[float]:
        return training_set(profiles, spec=SPEC, label=spec, cutoff=T).y[0].tolist()

    fraud = {
        "kind": "label_event",
        "window": "30d",
        "events": [{"name": "Case Closed", "where": {"resolution": "fraud"}}],
    }
    assert label(fraud) == [0.0]  # the fraud case closed on day 60, outside 30 days
    assert label({**fraud, "window": "90d"}) == [1.0]
    clv = {
        "kind": "orders_and_value",
        "window": "365d",
        "events": [{"name": "Order Completed"}],
        "value_property": "total",
    }
    assert label(clv) == [2.0, 50.0]
    nbc = {
        "kind": "channel_answered",
        "window": "30d",
        "events": [{"name": "Email Opened"}, {"name": "SMS Clicked"}],
        "property": "channel",
        "classes": ["email", "sms", "push", "in_app"],
    }
    assert label(nbc) == [1.0]  # sms answered twice, email once
    # nobody answered in the 30 days after a later cut-off: no row rather than a made-up class
    later = training_set(profiles, spec=SPEC, label=nbc, cutoff=T + 100 * DAY)
    assert later.rows == 0 and later.skipped_unlabelled == 1


async def test_a_label_window_past_the_end_of_the_data_is_refused_naming_the_cutoff():
    profiles = await _profiles({"ada": ADA_BEFORE + ADA_AFTER})
    with pytest.raises(InvalidArgument) as caught:
        training_set(profiles, spec=SPEC, label=CHURN, cutoff=T)  # data ends 5 days after T
    assert caught.value.field == "cutoff"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"window": "30d"}, "label.kind"),
        ({"kind": "churn", "window": "30d"}, "label.kind"),
        ({"kind": "no_activity"}, "label.window"),
        ({"kind": "no_activity", "window": "soon"}, "label.window"),
        ({"kind": "goal_event", "window": "30d"}, "label.events"),
        ({"kind": "goal_event", "window": "30d", "events": [{"nme": "Order Completed"}]}, "label.events[0].nme"),
        ({"kind": "goal_event", "window": "30d", "events": [{"name": "A"}, {"type": "click"}]}, "label.events[1].type"),
        ({"kind": "label_event", "window": "30d", "events": [{"name": "A", "where": ["x"]}]}, "label.events[0].where"),
        ({"kind": "orders_and_value", "window": "1w", "events": [{"name": "Order Completed"}]}, "label.value_property"),
        ({"kind": "channel_answered", "window": "1w", "events": [{"name": "A"}], "property": "c"}, "label.classes"),
        ({"kind": "no_activity", "window": "1w", "horizon": "1w"}, "label.horizon"),
        ({"kind": "no_activity", "window": "60d", "after": "soon"}, "label.after"),
        ({"kind": "no_activity", "window": "60d", "after": "-30d"}, "label.after"),
        ({"kind": "no_activity", "window": "60d", "after": -1}, "label.after"),
        ({"kind": "no_activity", "window": "60d", "after": True}, "label.after"),
        ({"kind": "no_activity", "window": "60d", "after": float("inf")}, "label.after"),
    ],
)
def test_a_bad_label_spec_is_refused_naming_the_field(spec, field):
    with pytest.raises(InvalidArgument) as caught:
        LabelSpec.from_dict(spec)
    assert caught.value.field == field


def test_a_label_spec_reads_back_as_written():
    spec = {
        "kind": "label_event",
        "window": "90d",
        "events": [{"name": "Case Closed", "where": {"resolution": "fraud"}}],
    }
    assert LabelSpec.from_dict(spec).to_dict() == spec


def test_a_label_window_can_start_a_while_after_the_cutoff():
    lapse = LabelSpec.from_dict(LAPSE)
    assert (lapse.after, lapse.window, lapse.horizon) == (30 * DAY, 60 * DAY, 90 * DAY)
    assert lapse.to_dict() == LAPSE
    # no offset is the window right after the cut-off, written as it always was
    assert LabelSpec.from_dict({**LAPSE, "after": 0}).after == 0.0
    assert LabelSpec.from_dict({**LAPSE, "after": "0d"}).to_dict() == {"kind": "no_activity", "window": "60d"}
    assert LabelSpec.from_dict(CHURN).after == 0.0


async def test_a_label_with_a_start_offset_reads_only_its_window_and_features_only_up_to_the_cutoff():
    quiet = [page("q1", T - DAY)]
    # back inside the month of grace only: that is no answer to "lapsed a month on"
    grace = [*quiet, page("g2", T + 10 * DAY), track("g3", "Order Completed", T + 30 * DAY, total=9.0)]
    # back inside the window (its last instant counts, as every window's does)
    back = [*quiet, page("b2", T + 90 * DAY)]
    end = [page("z1", T - DAY), page("z2", T + 120 * DAY)]  # the store observes past T + 90d
    profiles = await _profiles({"back": back, "grace": grace, "quiet": quiet, "zend": end})
    lapse = training_set(profiles, spec=SPEC, label=LAPSE, cutoff=T)
    churn = training_set(profiles, spec=SPEC, label=CHURN, cutoff=T)
    assert lapse.person_ids == ["back", "grace", "quiet", "zend"]
    assert lapse.y[:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert churn.y[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # the grace month does count for "the next 90 days"
    # the rows of back, grace and quiet were all the same person at T
    np.testing.assert_array_equal(lapse.X[0], lapse.X[1])
    np.testing.assert_array_equal(lapse.X[1], lapse.X[2])


async def test_a_label_with_a_start_offset_is_known_only_once_offset_and_window_have_passed():
    profiles = await _profiles({"x": [page("x1", T - DAY), page("x2", T + 70 * DAY)]})
    # 70 days observed: enough for a 60-day window, not for one that starts 30 days after T
    assert training_set(profiles, spec=SPEC, label={**LAPSE, "after": 0}, cutoff=T).rows == 1
    with pytest.raises(InvalidArgument) as caught:
        training_set(profiles, spec=SPEC, label=LAPSE, cutoff=T)
    assert caught.value.field == "cutoff"
    assert "90d" in caught.value.message


async def test_a_merged_profile_gives_one_row_from_both_persons_events_before_the_cutoff():
    defs = ComputedTraits.from_dicts(DEFINITIONS)
    ada = apply_all("ada", ADA_BEFORE + ADA_AFTER, defs)
    web = apply_all("web", [track("w1", "Order Completed", T - 3 * DAY, total=60.0), page("w2", T + 200 * DAY)], defs)
    ada.merge(web, merge_id="m1", at=T + 6 * DAY, defs=defs, now=T + 6 * DAY)
    store = MemoryStore()
    await write_profiles(store, [ada])
    rows = training_set(await read_profiles(store), spec=SPEC, label=PURCHASE, cutoff=T)
    assert rows.person_ids == ["ada"]
    ada_row = dict(zip([f.name for f in SPEC.features], rows.X[0].tolist(), strict=True))
    assert ada_row["orders_total"] == 2 and ada_row["revenue_365d"] == 100.0  # both sides' orders before T
    assert ada_row["days_since_last_order"] == pytest.approx(3.0)


async def test_a_set_streamed_from_the_store_a_batch_at_a_time_is_the_whole_store_set():
    """Read 2 profiles at a time (each timeline by its origin's key prefix, so p1's read never takes
    p10's entries), with a merged profile among them: the same rows, labels and data hash."""
    defs = ComputedTraits.from_dicts(DEFINITIONS)
    ada = apply_all("ada", ADA_BEFORE + ADA_AFTER, defs)
    web = apply_all("web", [track("w1", "Order Completed", T - 3 * DAY, total=60.0), page("w2", T + 200 * DAY)], defs)
    ada.merge(web, merge_id="m1", at=T + 6 * DAY, defs=defs, now=T + 6 * DAY)
    others = {
        "p1": [page("p1a", T - 3 * DAY)],
        "p10": [track("p10a", "Order Completed", T - 2 * DAY, total=5.0), page("p10b", T + 3 * DAY)],
        "bob": BOB,
        "cy": CY,
    }
    store = MemoryStore()
    await write_profiles(store, [ada, *(apply_all(p, events, defs) for p, events in others.items())])
    whole = training_set(await read_profiles(store), spec=SPEC, label=PURCHASE, cutoff=T)
    streamed = await training_set_from_store(store, spec=SPEC, label=PURCHASE, cutoff=T, batch=2)
    assert streamed.person_ids == whole.person_ids == ["ada", "bob", "p1", "p10"]
    assert streamed.data_hash == whole.data_hash and streamed.observed_until == whole.observed_until
    assert streamed.fields == whole.fields and streamed.skipped_unborn == 1
    # rows built in worker processes while the store is read: the same set
    parallel = await training_set_from_store(store, spec=SPEC, label=PURCHASE, cutoff=T, batch=1, workers=2)
    assert parallel.data_hash == whole.data_hash and parallel.skipped_unborn == 1
    sizes = [len(batch) async for batch in iter_profiles(store, batch=2)]
    assert sizes == [2, 2, 1]  # the merged-away "web" record is not a profile of its own
    with pytest.raises(InvalidArgument) as caught:
        await training_set_from_store(store, spec=SPEC, label=CHURN, cutoff=T + 150 * DAY)
    assert caught.value.field == "cutoff"


async def test_building_a_set_gives_the_cycle_collector_back_as_it_found_it():
    """The collector is held off while a set is built (its full collections over every row kept alive
    cost half the work); afterwards it runs as before, with nothing left frozen, and a caller that had it
    off still has it off."""
    store = MemoryStore()
    await write_people(store, {"ada": ADA_BEFORE + ADA_AFTER, "bob": BOB, "dee": DEE}, DEFINITIONS)
    assert gc.isenabled()
    profiles = await read_profiles(store)
    training_set(profiles, spec=SPEC, label=CHURN, cutoff=T)
    await training_set_from_store(store, spec=SPEC, label=CHURN, cutoff=T)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        await training_set_from_store(store, spec=SPEC, label=CHURN, cutoff=T)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


async def test_each_trait_rebuilt_from_only_the_events_it_matches_is_what_the_whole_timeline_gives():
    """`profile_at` shows each trait's backfill only the entries of the events it matches: the same
    profile as the plain way (every trait's backfill over the whole timeline), for simulated customers
    and a merged profile, at cut-offs inside their lives."""
    population = simulate(60, 5)
    defs = ComputedTraits.from_dicts(DEFINITIONS)
    ada = apply_all("ada", ADA_BEFORE + ADA_AFTER, defs)
    web = apply_all("web", [track("w1", "Order Completed", T - 3 * DAY, total=60.0), page("w2", T + 200 * DAY)], defs)
    ada.merge(web, merge_id="m1", at=T + 6 * DAY, defs=defs, now=T + 6 * DAY)
    store = MemoryStore()
    await write_population(store, population, DEFINITIONS)
    await write_profiles(store, [ada])
    profiles = await read_profiles(store)
    traits = [defs.get(d["name"]) for d in defs.to_dicts()]
    for cutoff in (population.cutoff - 200 * DAY, population.cutoff, T):
        for stored in profiles:
            plain = Profile.from_doc(_doc_at(stored.doc, cutoff), [e for e in stored.timeline if e.at <= cutoff])
            for trait in traits:
                plain.backfill(trait, now=cutoff)
            grouped = profile_at(stored, defs, cutoff)
            assert grouped.view(now=cutoff, as_of=cutoff) == plain.view(now=cutoff, as_of=cutoff), stored.person_id
            assert grouped.to_doc() == plain.to_doc()  # the whole timeline is put back


# --- timelines the profile service cut short ---------------------------------------------------------------

WEEK_SPEC = ModelSpec.from_dict(
    {
        "name": "churn_risk",
        "version": "2.0.0",
        "features": [f for f in ENGAGEMENT_FEATURES if f["name"] == "sessions_7d"],
        "outputs": [{"score": "churn_risk", "output": "probabilities", "index": 1}],
        "computed_traits": traits_for([f for f in ENGAGEMENT_FEATURES if f["name"] == "sessions_7d"]),
    }
)


def _kept(person: str, events: list[ProfileEvent], max_events: int) -> Profile:
    """`person` as the profile service keeps them with CDP_PROFILE_TIMELINE_MAX_EVENTS=max_events."""
    defs = ComputedTraits.from_dicts(DEFINITIONS)
    profile = Profile.new(person, retention=Retention(max_events=max_events))
    for event in sorted(events, key=lambda e: (e.at, e.event_id)):
        profile.apply(event, defs, now=event.at)
    return profile


async def test_a_person_whose_timeline_retention_cut_short_gets_the_row_his_whole_history_gives():
    """Hal ordered three times long ago, then visited every day: with five events kept per person his
    orders are gone from the timeline, but the profile folded them into his timeline base. A model reading
    all-time traits gets his row exactly as from his whole history, and so does one reading a week; only a
    cut-off before the cut (his last dropped order) has no row, counted as truncated. Bob, under the cap,
    is untouched."""
    orders = [track(f"h{i}", "Order Completed", T - (100 - 10 * i) * DAY, total=30.0) for i in range(3)]
    visits = [page(f"hv{i}", T - (10 - i) * DAY) for i in range(5)]  # T-10d .. T-6d: covers the last week
    hal, bob = _kept("hal", orders + visits, 5), _kept("bob", BOB, 5)
    assert [e.event_id for e in hal.timeline()] == [f"hv{i}" for i in range(5)]  # the orders were dropped
    store = MemoryStore()
    await write_profiles(store, [hal, bob])
    profiles = await read_profiles(store)
    until = T + 200 * DAY
    uncapped = await _profiles({"hal": orders + visits})

    everything = training_set(profiles, spec=SPEC, label=CHURN, cutoff=T, until=until)
    whole = training_set(uncapped, spec=SPEC, label=CHURN, cutoff=T, until=until)
    assert everything.person_ids == ["bob", "hal"] and everything.skipped_truncated == 0
    np.testing.assert_array_equal(everything.X[1], whole.X[0])
    assert everything.fields[1] == whole.fields[0]  # orders in total, first order, revenue: all there
    streamed = await training_set_from_store(store, spec=SPEC, label=CHURN, cutoff=T, until=until)
    assert streamed.person_ids == ["bob", "hal"] and streamed.data_hash == everything.data_hash

    # sessions in the last 7 days: whole at T and at T - 5d alike (the week starts after the cut)
    for cutoff in (T, T - 5 * DAY):
        week = training_set(profiles, spec=WEEK_SPEC, label=CHURN, cutoff=cutoff, until=until)
        whole = training_set(uncapped, spec=WEEK_SPEC, label=CHURN, cutoff=cutoff, until=until)
        assert week.person_ids == ["bob", "hal"] and week.skipped_truncated == 0
        np.testing.assert_array_equal(week.X[1], whole.X[0])
    # ... but a cut-off before the cut: the base holds an order after it, the timeline not the ones before
    early = training_set(profiles, spec=SPEC, label=CHURN, cutoff=T - 85 * DAY, until=until)
    assert early.person_ids == ["bob"] and early.skipped_truncated == 1 and early.summary()["skipped_truncated"] == 1
    between = training_set(profiles, spec=SPEC, label=CHURN, cutoff=T - 75 * DAY, until=until)
    whole = training_set(uncapped, spec=SPEC, label=CHURN, cutoff=T - 75 * DAY, until=until)
    assert between.person_ids == ["bob", "hal"] and between.skipped_truncated == 0
    np.testing.assert_array_equal(between.X[1], whole.X[0])


async def test_a_person_an_older_release_cut_short_without_a_base_still_gets_no_row_that_would_be_wrong():
    """A profile stored before timeline bases, whose timeline retention had cut: a rebuild cannot know
    what was dropped, so a model reading all-time traits gets no row (counted), one whose window its kept
    history covers does."""
    orders = [track(f"h{i}", "Order Completed", T - (100 - 10 * i) * DAY, total=30.0) for i in range(3)]
    visits = [page(f"hv{i}", T - (10 - i) * DAY) for i in range(5)]
    hal = _kept("hal", orders + visits, 5)
    store = MemoryStore()
    await write_profiles(store, [hal])
    profiles = await read_profiles(store)
    for part in profiles[0].doc["parts"]:
        del part["base"]
    until = T + 200 * DAY
    everything = training_set(profiles, spec=SPEC, label=CHURN, cutoff=T, until=until)
    assert everything.person_ids == [] and everything.skipped_truncated == 1
    week = training_set(profiles, spec=WEEK_SPEC, label=CHURN, cutoff=T, until=until)
    assert week.person_ids == ["hal"] and week.skipped_truncated == 0
    early = training_set(profiles, spec=WEEK_SPEC, label=CHURN, cutoff=T - 5 * DAY, until=until)
    assert early.person_ids == [] and early.skipped_truncated == 1
