"""The shared API budget: never over either limit, Retry-After honoured, the CRM's count respected,
and a restart resuming the same day."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_crm.domain.budget import DAY, MAX_RETRY_AFTER, ROLLING_RECHECK, Budget

T0 = 1_780_000_000.0  # a fixed moment, mid-day UTC


def _answered(budget, units, now):
    """A request whose answer came back at once: its grant is released when it was made."""
    reservation = budget.reserve(units, now)
    if reservation.granted:
        budget.release(reservation.ticket, now)
    return reservation


def _grant_all(budget, n, now):
    granted = 0
    while _answered(budget, 1, now).granted:
        granted += 1
        if granted > n:
            break
    return granted


def test_hubspot_burst_is_190_per_ten_seconds_and_says_when_to_come_back():
    budget = Budget.for_kind("hubspot", account="62515", margin=0.0)
    assert _grant_all(budget, 500, T0) == 190
    refused = budget.reserve(1, T0 + 1)
    assert not refused.granted and refused.reason == "burst" and refused.wait_until == T0 + 10
    assert budget.reserve(1, T0 + 10).granted


def test_a_wait_is_exactly_long_enough_for_a_larger_request():
    budget = Budget("a", "hubspot", burst=10, window=10.0, daily=None, margin=0.0)
    for i in range(10):
        assert _answered(budget, 1, T0 + i).granted
    refused = budget.reserve(3, T0 + 9.5)
    assert refused.wait_until == T0 + 12  # the grants of T0, T0+1 and T0+2 must have left the window
    assert not budget.reserve(3, T0 + 11.9).granted and budget.reserve(3, T0 + 12).granted


def test_the_daily_quota_holds_until_the_next_utc_day():
    # Zoho's is a calendar day (Salesforce's rolls: its own test below).
    budget = Budget("org", "zoho", burst=None, window=None, daily=5)
    assert _grant_all(budget, 10, T0) == 5
    refused = budget.reserve(1, T0 + 60)
    midnight = (int(T0 // DAY) + 1) * DAY
    assert refused.reason == "daily" and refused.wait_until == midnight
    assert budget.reserve(1, midnight).granted


def test_a_restart_resumes_the_day_instead_of_resetting_it():
    budget = Budget("org", "salesforce", burst=None, window=None, daily=5)
    for _ in range(4):
        _answered(budget, 1, T0)
    restored = Budget.from_state(budget.to_state())
    assert restored.reserve(1, T0 + 5).granted and not restored.reserve(1, T0 + 6).granted


def test_retry_after_blocks_every_grant_until_then_in_seconds_or_as_an_http_date():
    budget = Budget.for_kind("dynamics", account="org")
    budget.observe({"Retry-After": "30"}, T0)
    assert budget.reserve(1, T0 + 29).wait_until == T0 + 30 and budget.reserve(1, T0 + 30).granted
    when = dt.datetime.fromtimestamp(T0 + 120, dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    budget.throttled(T0 + 31, retry_after=when)
    refused = budget.reserve(1, T0 + 60)
    assert refused.reason == "retry_after" and refused.wait_until == T0 + 120


@pytest.mark.parametrize("value", ["999999999", "1e308", "Fri, 31 Dec 9999 23:59:59 GMT", float("inf")])
def test_a_retry_after_of_years_blocks_the_account_an_hour_not_for_ever(value):
    # A CRM (or a proxy in front of it) answering `Retry-After: 999999999` stopped every sync of the
    # account for 31 years - kept in the store, so a restart did not help.
    budget = Budget.for_kind("hubspot", account="62515")
    budget.observe({"Retry-After": value}, T0) if isinstance(value, str) else budget.throttled(T0, retry_after=value)
    assert not budget.reserve(1, T0 + MAX_RETRY_AFTER - 1).granted
    assert budget.reserve(1, T0 + MAX_RETRY_AFTER).granted


def test_a_budget_stored_blocked_for_years_is_read_back_blocked_an_hour_at_most():
    budget = Budget.for_kind("dynamics", account="org")
    budget.reserve(1, T0)
    state = budget.to_state()
    state["blocked_until"] = T0 + 999_999_999.0  # written before Retry-After was capped
    restored = Budget.from_state(state)
    assert restored.reserve(1, T0 + MAX_RETRY_AFTER).granted
    # A daily-limit block (until the next UTC day) is kept as it is.
    budget.throttled(T0, daily=True)
    assert Budget.from_state(budget.to_state()).reserve(1, T0 + 3 * 3600).wait_until == (int(T0 // DAY) + 1) * DAY


@pytest.mark.parametrize(
    "headers",
    [
        {"X-HubSpot-RateLimit-Remaining": "inf", "X-HubSpot-RateLimit-Max": "-inf"},
        {"X-HubSpot-RateLimit-Daily-Remaining": "1e400", "X-HubSpot-RateLimit-Daily": "nan"},
    ],
)
def test_limit_headers_that_are_not_numbers_are_ignored_not_raised(headers):
    # int(float("inf")) raises OverflowError, which no caller expects: one odd header from the CRM
    # failed the request that carried it.
    budget = Budget.for_kind("hubspot", account="62515")
    budget.observe(headers, T0)
    assert budget.reserve(1, T0).granted and budget.burst == 190 and budget.daily == 250_000


def test_a_429_without_a_hint_while_the_window_has_room_pauses_a_moment_not_a_whole_window():
    # A refusal whose own limit headers show room (a transient throttle, a fault): one second, then on.
    budget = Budget.for_kind("hubspot", account="62515", margin=0.0)
    assert budget.reserve(1, T0).granted
    budget.observe({"X-HubSpot-RateLimit-Remaining": "150", "X-HubSpot-RateLimit-Max": "190"}, T0 + 1)
    budget.throttled(T0 + 1)
    assert not budget.reserve(1, T0 + 1.5).granted
    assert budget.reserve(1, T0 + 2).granted  # it used to wait the whole window (T0 + 11)


def test_a_429_without_a_hint_when_the_crm_counts_the_window_full_waits_until_its_units_leave():
    budget = Budget.for_kind("hubspot", account="62515", margin=0.0)
    assert all(_answered(budget, 1, T0).granted for _ in range(100))
    # Another app used the rest: the refusal's headers say nothing is left.
    budget.observe({"X-HubSpot-RateLimit-Remaining": "0"}, T0 + 1)
    budget.throttled(T0 + 1)
    refused = budget.reserve(1, T0 + 5)
    assert not refused.granted and refused.reason == "burst"
    assert budget.reserve(1, T0 + 10).granted  # our oldest grants left the window


def test_a_daily_limit_answer_waits_for_the_next_day():
    budget = Budget.for_kind("hubspot", account="62515")
    budget.throttled(T0, daily=True)
    assert budget.reserve(1, T0 + 3600).wait_until == (int(T0 // DAY) + 1) * DAY


def test_a_full_rolling_salesforce_allocation_asks_again_soon_and_follows_the_crms_count():
    # Salesforce counts the last 24 hours, not a calendar day: calls are refused until that usage drops
    # below the allocation. Waiting for the next UTC midnight held writes up to a day while room freed.
    budget = Budget.for_kind("salesforce", account="00D", daily=100)
    budget.throttled(T0, daily=True)  # 403 REQUEST_LIMIT_EXCEEDED
    refused = budget.reserve(1, T0 + 60)
    assert not refused.granted and refused.wait_until == T0 + ROLLING_RECHECK  # not the next UTC midnight
    probe = budget.reserve(1, T0 + ROLLING_RECHECK)
    assert probe.granted
    assert not budget.reserve(1, T0 + ROLLING_RECHECK + 1).granted  # the others wait for its answer
    budget.release(probe.ticket, T0 + ROLLING_RECHECK + 2)
    budget.observe({"Sforce-Limit-Info": "api-usage=40/100"}, T0 + ROLLING_RECHECK + 2)  # a day-old use freed
    assert budget.status(T0 + ROLLING_RECHECK + 2)["daily_remaining"] == 60
    assert _grant_all(budget, 100, T0 + ROLLING_RECHECK + 3) == 60


def test_the_crm_counting_more_than_we_granted_lowers_what_is_left_never_raises_it():
    budget = Budget.for_kind("hubspot", account="62515", margin=0.0)
    budget.reserve(1, T0)
    # Another app on the same account used 150 of the window and most of the day.
    budget.observe(
        {
            "X-HubSpot-RateLimit-Remaining": "39",
            "X-HubSpot-RateLimit-Daily": "250000",
            "X-HubSpot-RateLimit-Daily-Remaining": "100",
        },
        T0,
    )
    assert budget.status(T0)["burst_remaining"] == 39 and budget.status(T0)["daily_remaining"] == 100
    budget.observe({"X-HubSpot-RateLimit-Remaining": "189", "X-HubSpot-RateLimit-Daily-Remaining": "249999"}, T0)
    assert budget.status(T0)["burst_remaining"] == 39 and budget.status(T0)["daily_remaining"] == 100


def test_a_lower_burst_allowance_reported_by_hubspot_is_adopted():
    budget = Budget.for_kind("hubspot", account="62515", margin=0.0)
    budget.observe({"X-HubSpot-RateLimit-Max": "100", "X-HubSpot-RateLimit-Remaining": "100"}, T0)
    assert _grant_all(budget, 500, T0) == 100


def test_salesforce_limit_info_sets_the_days_usage_and_the_orgs_allocation():
    budget = Budget.for_kind("salesforce", account="00D")
    budget.observe({"Sforce-Limit-Info": "api-usage=14990/15000"}, T0)
    status = budget.status(T0)
    assert status["daily_limit"] == 15000 and status["daily_remaining"] == 10
    assert _grant_all(budget, 100, T0) == 10


def test_dynamics_service_protection_remaining_is_respected():
    budget = Budget.for_kind("dynamics", account="org", margin=0.0)
    budget.observe({"x-ms-ratelimit-burst-remaining-xrm-requests": "2"}, T0)
    assert _grant_all(budget, 10, T0) == 2
    assert budget.reserve(1, T0).wait_until == T0 + 300


def test_a_clock_going_backwards_frees_nothing():
    budget = Budget("a", "hubspot", burst=2, window=10.0, daily=None, margin=0.0)
    budget.reserve(2, T0 + 100)
    assert not budget.reserve(1, T0 + 50).granted  # another replica's clock, behind


def test_a_request_larger_than_a_limit_is_refused_outright():
    with pytest.raises(ValueError):
        Budget.for_kind("hubspot", account="x").reserve(191, T0)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=30)),
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=0.5)),
        st.tuples(st.just("advance"), st.floats(min_value=9.5, max_value=11)),  # about one window
        st.tuples(st.just("reserve"), st.integers(min_value=1, max_value=7)),
        st.tuples(st.just("reserve"), st.integers(min_value=4, max_value=7)),
        st.tuples(st.just("arrive"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("answer"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("time_out"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("observe"), st.integers(min_value=0, max_value=20)),
        st.tuples(st.just("observe_crm"), st.just(0)),
        st.tuples(st.just("retry_after"), st.floats(min_value=0, max_value=5)),
        st.tuples(st.just("restart"), st.just(0)),
        st.tuples(st.just("refund_unsent"), st.integers(min_value=0, max_value=50)),
    ),
    min_size=20,
    max_size=200,
)


class Request:
    """One request as the CRM sees it: counted when it arrives - at any moment between our grant and
    its answer coming back, and never later than `hold` after the grant (the longest a request may be
    on its way, a timeout included)."""

    def __init__(self, ticket: str, units: int, granted: float) -> None:
        self.ticket, self.units, self.granted = ticket, units, granted
        self.arrived: float | None = None
        self.timed_out = False


@settings(max_examples=400, deadline=None)
@given(operations, st.floats(min_value=0, max_value=2 * DAY), st.sampled_from([0.0, 0.25]))
def test_property_neither_we_nor_the_crm_ever_count_over_the_burst_window_or_the_day(ops, start, margin):
    burst, window, daily, hold = 20, 10.0, 60, 40.0
    budget = Budget("a", "hubspot", burst=burst, window=window, daily=daily, margin=margin, hold=hold)
    now = T0 + start
    granted: list[tuple[float, int]] = []
    requests: list[Request] = []

    def crm_used(at: float) -> int:
        return sum(r.units for r in requests if r.arrived is not None and at - window < r.arrived <= at)

    for op, arg in ops:
        if op == "advance":
            now += arg
        elif op == "reserve":
            r = budget.reserve(arg, now)
            if r.granted:
                granted.append((now, arg))
                requests.append(Request(r.ticket, arg, now))
            else:
                assert r.wait_until > now
        elif op in ("arrive", "answer", "time_out", "refund_unsent"):
            # A request on its way reaches the CRM; its answer (or a failure: a 5xx, a dropped connection)
            # comes back, so it arrived by now; the client gives up waiting (it may arrive later still);
            # or it was never sent after all.
            waiting = [r for r in requests if r.ticket]
            if not waiting:
                continue
            request = waiting[arg % len(waiting)]
            if op == "refund_unsent":
                if request.arrived is None and not request.timed_out:
                    requests.remove(request)
                    granted.remove((request.granted, request.units))
                    budget.refund(request.ticket, now)
                continue
            if op in ("arrive", "answer") and request.arrived is None:
                request.arrived = min(now, request.granted + hold)
            if op == "answer" and not request.timed_out:
                budget.release(request.ticket, now)
                request.ticket = ""  # its answer is in: nothing more happens to it
            elif op == "time_out":
                request.timed_out = True
        elif op == "observe":
            budget.observe({"X-HubSpot-RateLimit-Remaining": str(arg)}, now)
        elif op == "observe_crm":
            # What the CRM's headers say: the window as it counts it.
            budget.observe({"X-HubSpot-RateLimit-Remaining": str(max(0, burst - crm_used(now)))}, now)
        elif op == "retry_after":
            budget.throttled(now, retry_after=arg)
        elif op == "restart":
            budget = Budget.from_state(budget.to_state())
    for request in requests:  # what is still on its way arrives at the end, or when it had to
        if request.arrived is None:
            request.arrived = min(now, request.granted + hold)
    # Our view: never more than the limits granted.
    for at, _ in granted:
        assert sum(n for t, n in granted if at - window < t <= at) <= burst
    days: dict[int, int] = {}
    for at, n in granted:
        days[int(at // DAY)] = days.get(int(at // DAY), 0) + n
    assert all(used <= daily for used in days.values())
    # The CRM's view: counted on arrival, later than the grant by any delay - never over either.
    arrivals = [(r.arrived, r.units) for r in requests if r.arrived is not None]
    for at, _ in arrivals:
        assert sum(n for t, n in arrivals if at - window < t <= at) <= burst, "the CRM counted over its window"
    crm_days: dict[int, int] = {}
    for at, n in arrivals:
        crm_days[int(at // DAY)] = crm_days.get(int(at // DAY), 0) + n
    assert all(used <= daily for used in crm_days.values()), "the CRM counted over its day"


@pytest.mark.parametrize(
    ("kind", "headers"),
    [
        ("hubspot", {"X-HubSpot-RateLimit-Daily": "0", "X-HubSpot-RateLimit-Daily-Remaining": "0"}),
        ("salesforce", {"Sforce-Limit-Info": "api-usage=3/0"}),
    ],
)
def test_a_daily_limit_of_zero_reported_by_the_crm_waits_for_the_next_day_not_raises(kind, headers):
    # A daily limit of 0 became the budget's own, and every later reservation raised ValueError ("can never
    # fit"): each batch failed and came again, every CRM's writes with it, instead of this CRM's waiting.
    budget = Budget.for_kind(kind, account="a")
    budget.observe(headers, T0)
    refused = budget.reserve(1, T0 + 60)
    assert not refused.granted and refused.reason == "daily"
    assert refused.wait_until == (int(T0 // DAY) + 1) * DAY
