"""A person's history in orchestration is kept for a stated period (CDP_ORCHESTRATION_HISTORY_DAYS), not until
the person is deleted: send records, decisions and ended instances older than it are swept, newer ones stay,
a running instance stays whatever its age, and an ended one whose goal can still be reached stays too. A
period shorter than an action or a trigger can be delivered again is refused at start (day-2 trial).
The in-app inbox, approvals and Enroll answers, kept until a deletion before, have periods too: a message
CDP_ORCHESTRATION_INBOX_DAYS (90) after it was added, a decided approval and an Enroll answer
CDP_ORCHESTRATION_HISTORY_DAYS after they were decided or given; a pending approval stays."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.orchestration.v1 import orchestration_pb2_grpc
from cdp_kit.bus import Bus, events_resolved_stream, profiles_stream, segments_stream
from cdp_kit.settings import SettingsError, load_settings
from cdp_kit.storage import Put, open_store
from cdp_orchestration.channels.inapp import COLLECTION as INBOX
from cdp_orchestration.history import HistorySweeper
from cdp_orchestration.settings import OrchestrationSettings
from cdp_orchestration.state import APPROVALS, DECISIONS, ENROLLMENTS, INSTANCES, PERSONS, SENDS
from cdp_testing.metrics import MetricsCapture

from .test_api import SLOW, definition, profile, served

DAY = 86_400.0
ENV = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}
# One in-app message, no approval: the instance ends once the action is decided.
NOTE = {
    "id": "note",
    "version": 1,
    "name": "Note",
    "priority": 10,
    "category": "offer",
    "timezone": "UTC",
    "entry": {"api": True},
    "reentry": "always",
    "max_concurrent": 5,
    "nodes": [
        {
            "id": "hello",
            "type": "action",
            "channel": "inapp",
            "purpose": "Marketing",
            "template": {"title": "Hello", "body": "Hi {{ traits.first_name }}"},
        }
    ],
}


@pytest.fixture
async def service(nats_server, tmp_path):
    async with _serving(nats_server, tmp_path) as served:
        yield served


@contextlib.asynccontextmanager
async def _serving(nats_server, tmp_path, **overrides):
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    async with served(nats_server, tmp_path, **overrides) as (channel, runtime):
        yield orchestration_pb2_grpc.OrchestrationServiceStub(channel), runtime


async def _history(store, person: str) -> dict[str, list]:
    return {
        "sends": [r.doc for r in await store.find(SENDS, "person_id", person)],
        "decisions": [r.doc async for r in store.scan_all(DECISIONS, prefix=f"{person}:")],
        "instances": [r.doc for r in await store.find(INSTANCES, "person_id", person)],
    }


async def test_history_older_than_the_period_is_swept_newer_stays_and_a_running_instance_stays(service):
    stub, runtime = service
    store = runtime.parts["store"]
    for journey in (NOTE, SLOW):
        await stub.CreateJourney(pb.CreateJourneyRequest(definition=definition(journey)))
        await stub.PublishJourney(pb.PublishJourneyRequest(journey_id=journey["id"]))
    await profile(runtime, "p_ada", first_name="Ada")
    for journey in ("note", "slow"):
        entered = await stub.Enroll(pb.EnrollRequest(journey_id=journey, person_id="p_ada", idempotency_key=journey))
        assert entered.entered
    for _ in range(300):
        history = await _history(store, "p_ada")
        ended = [i for i in history["instances"] if i["status"] == "ended"]
        if ended and [s for s in history["sends"] if s["status"] != "pending"]:
            break
        await asyncio.sleep(0.05)
    assert {i["journey_id"]: i["status"] for i in history["instances"]} == {"note": "ended", "slow": "running"}
    assert [d["kind"] for d in history["decisions"]] == ["sent"]
    [send] = history["sends"]
    assert send["channel"] == "inapp"
    started = time.time()

    metrics = MetricsCapture("orchestration")
    # (The inbox's own period, CDP_ORCHESTRATION_INBOX_DAYS, set to the history's here: one horizon to cross.)
    sweeper = HistorySweeper(
        store, days=400, inbox_days=400, meter=metrics.telemetry.meter, clock=lambda: started + 399 * DAY
    )
    # Within the period: everything stays.
    assert sum((await sweeper.sweep()).values()) == 0
    assert await _history(store, "p_ada") == history

    # Past it: the send record, the decision and the ended instance go; the running instance stays, as does
    # the person record (what the re-entry rules and the caps read).
    sweeper.clock = lambda: started + 401 * DAY
    # (The in-app message and both Enroll answers go with them.)
    assert await sweeper.sweep() == {SENDS: 1, DECISIONS: 1, INSTANCES: 1, INBOX: 1, APPROVALS: 0, ENROLLMENTS: 2}
    left = await _history(store, "p_ada")
    assert left["sends"] == [] and left["decisions"] == []
    assert [(i["journey_id"], i["status"]) for i in left["instances"]] == [("slow", "running")]
    assert await store.get(PERSONS, "p_ada") is not None
    assert sum((await sweeper.sweep()).values()) == 0  # nothing is deleted twice
    _, points = metrics.collected()["cdp.orchestration.history.swept"]
    assert {p.attributes["collection"]: p.value for p in points} == {
        SENDS: 1,
        DECISIONS: 1,
        INSTANCES: 1,
        INBOX: 1,
        ENROLLMENTS: 2,
    }


async def test_an_ended_instance_whose_goal_can_still_be_reached_stays_and_every_page_is_swept(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'history.db'}")
    now = 1_900_000_000.0
    old = now - 500 * DAY

    def instance(status: str, ended_at: float | None, goal_until: float | None = None) -> dict:
        return {
            "person_id": "p_bo",
            "journey_id": "j",
            "status": status,
            "ended_at": ended_at,
            "goal_until": goal_until,
        }

    try:
        await store.bulk_write(
            [Put(INSTANCES, f"ended-{n}", instance("ended", old)) for n in range(5)]
            + [
                Put(INSTANCES, "watching-goal", instance("ended", old, goal_until=now - 10 * DAY)),
                Put(INSTANCES, "goal-closed-long-ago", instance("ended", old, goal_until=old + DAY)),
                Put(INSTANCES, "ended-lately", instance("ended", now - 30 * DAY)),
                Put(INSTANCES, "running-for-years", instance("running", None)),
                Put(INSTANCES, "no-end-time", instance("ended", None)),
                Put(DECISIONS, "p_bo:old", {"kind": "sent", "at": old}),
                Put(DECISIONS, "p_bo:~entry:j", {"kind": "not_entered", "at": now - DAY}),
                Put(SENDS, "a-old", {"person_id": "p_bo", "status": "accepted", "at": old}),
                Put(SENDS, "a-new", {"person_id": "p_bo", "status": "accepted", "at": now - DAY}),
            ]
        )
        # Two records a page: the sweep goes on page after page until the collection's end.
        sweeper = HistorySweeper(store, days=400, clock=lambda: now, page=2)
        assert await sweeper.sweep() == {SENDS: 1, DECISIONS: 1, INSTANCES: 6, INBOX: 0, APPROVALS: 0, ENROLLMENTS: 0}
        assert {r.key async for r in store.scan_all(INSTANCES)} == {
            "watching-goal",
            "ended-lately",
            "running-for-years",
            "no-end-time",
        }
        assert {r.key async for r in store.scan_all(DECISIONS)} == {"p_bo:~entry:j"}
        assert {r.key async for r in store.scan_all(SENDS)} == {"a-new"}
    finally:
        await store.close()


def test_the_default_period_is_a_year_and_a_margin():
    assert load_settings(OrchestrationSettings, ENV).history_days == 400


@pytest.mark.parametrize(
    ("environ", "floor"),
    [
        ({"CDP_ORCHESTRATION_HISTORY_DAYS": "7"}, "30"),  # below the dead-letter stream's 30 days
        ({"CDP_ORCHESTRATION_HISTORY_DAYS": "35", "CDP_ORCHESTRATION_RETENTION_DAYS": "40"}, "40"),
    ],
)
def test_a_period_below_what_can_be_delivered_again_is_refused_at_start_naming_the_setting(environ, floor):
    environ = {"CDP_ORCHESTRATION_TOMBSTONE_DAYS": "50", **environ}
    with pytest.raises(SettingsError) as refused:
        load_settings(OrchestrationSettings, {**ENV, **environ})
    [problem] = [p for p in refused.value.problems if "HISTORY" in p]
    assert problem.startswith("CDP_ORCHESTRATION_HISTORY_DAYS=") and f"at least {floor}" in problem


async def test_the_service_sweeps_what_aged_out_while_it_was_down_once_it_starts(nats_server, tmp_path):
    """The sweep runs in the service (every replica, from its start), at the configured period."""
    long_ago = time.time() - 401 * DAY
    store = open_store(f"sqlite:///{tmp_path / 'orchestration.db'}")
    await store.bulk_write(
        [
            Put(SENDS, "a-old", {"person_id": "p_cy", "status": "accepted", "at": long_ago}),
            Put(SENDS, "a-recent", {"person_id": "p_cy", "status": "accepted", "at": time.time() - 399 * DAY}),
        ]
    )
    await store.close()
    async with _serving(nats_server, tmp_path) as (_, runtime):
        store = runtime.parts["store"]
        for _ in range(300):
            if await store.get(SENDS, "a-old") is None:
                break
            await asyncio.sleep(0.05)
        assert {r.key async for r in store.scan_all(SENDS)} == {"a-recent"}


def _message(person: str, action_id: str, created: float, read: float | None = None) -> Put:
    """An in-app message as the in-app channel stores it (`channels/inapp.py`)."""
    doc = {
        "person_id": person,
        "action_id": action_id,
        "title": "Hi",
        "body": "for you",
        "url": "",
        "data": {},
        "created_at_ms": int(created * 1000),
        "read_at_ms": None if read is None else int(read * 1000),
    }
    return Put(INBOX, f"{person}/{action_id}", doc)


def _approval(action_id: str, state: str, requested: float, expires: float | None, decided: float | None) -> Put:
    doc = {
        "action_id": action_id,
        "journey_id": "j",
        "person_id": "p_bo",
        "state": state,
        "requested_at": requested,
        "expires_at": expires,
        "decided_at": decided,
        "decided_by": "ops@example.com" if state in ("approved", "rejected") else "",
        "note": "",
    }
    return Put(APPROVALS, action_id, doc)


async def test_inbox_messages_decided_approvals_and_enroll_answers_age_out_pending_approvals_stay(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'history.db'}")
    now = 1_900_000_000.0
    metrics = MetricsCapture("orchestration")
    try:
        await store.bulk_write(
            [
                # The inbox: 90 days from when the message was added, read or not.
                _message("p_bo", "m-old-unread", now - 91 * DAY),
                _message("p_bo", "m-old-read", now - 120 * DAY, read=now - 2 * DAY),
                _message("p_bo", "m-recent", now - 89 * DAY, read=now - 88 * DAY),
                # Approvals: CDP_ORCHESTRATION_HISTORY_DAYS (400) from the answer or the expiry.
                _approval("a-approved-long-ago", "approved", now - 500 * DAY, now - 499 * DAY, now - 401 * DAY),
                _approval("a-expired-long-ago", "expired", now - 500 * DAY, now - 450 * DAY, now - 450 * DAY),
                _approval("a-rejected-lately", "rejected", now - 500 * DAY, now - 10 * DAY, now - 399 * DAY),
                _approval("a-pending", "pending", now - 500 * DAY, now + DAY, None),
                _approval("a-pending-no-expiry", "pending", now - 900 * DAY, None, None),
                # A pending one whose expiry passed a period ago (decided without its record being closed).
                _approval("a-pending-expired-long-ago", "pending", now - 900 * DAY, now - 401 * DAY, None),
                # Enroll answers: CDP_ORCHESTRATION_HISTORY_DAYS from the answer.
                Put(ENROLLMENTS, "j:old", {"entered": True, "instance_id": "i1", "reason": "", "at": now - 401 * DAY}),
                Put(ENROLLMENTS, "j:new", {"entered": True, "instance_id": "i2", "reason": "", "at": now - 399 * DAY}),
            ]
        )
        sweeper = HistorySweeper(store, days=400, inbox_days=90, meter=metrics.telemetry.meter, clock=lambda: now)
        assert await sweeper.sweep() == {
            SENDS: 0,
            DECISIONS: 0,
            INSTANCES: 0,
            INBOX: 2,
            APPROVALS: 3,
            ENROLLMENTS: 1,
        }
        assert {r.key async for r in store.scan_all(INBOX)} == {"p_bo/m-recent"}
        assert {r.key async for r in store.scan_all(APPROVALS)} == {
            "a-rejected-lately",
            "a-pending",
            "a-pending-no-expiry",
        }
        assert {r.key async for r in store.scan_all(ENROLLMENTS)} == {"j:new"}
        assert sum((await sweeper.sweep()).values()) == 0  # nothing is deleted twice
        _, points = metrics.collected()["cdp.orchestration.history.swept"]
        assert {p.attributes["collection"]: p.value for p in points} == {INBOX: 2, APPROVALS: 3, ENROLLMENTS: 1}
    finally:
        await store.close()


def test_the_default_inbox_period_is_ninety_days():
    assert load_settings(OrchestrationSettings, ENV).inbox_days == 90


@pytest.mark.parametrize("days", ["6", "0", "-1"])
def test_an_inbox_period_below_a_week_is_refused_at_start_naming_the_setting(days):
    with pytest.raises(SettingsError) as refused:
        load_settings(OrchestrationSettings, {**ENV, "CDP_ORCHESTRATION_INBOX_DAYS": days})
    [problem] = [p for p in refused.value.problems if "INBOX" in p]
    assert problem.startswith(f"CDP_ORCHESTRATION_INBOX_DAYS={days} is invalid") and "at least 7" in problem


async def test_the_service_sweeps_the_inbox_approvals_and_enroll_answers_at_the_configured_periods(
    nats_server, tmp_path
):
    """The service's sweep covers them (every replica, from its start)."""
    now = time.time()
    store = open_store(f"sqlite:///{tmp_path / 'orchestration.db'}")
    await store.bulk_write(
        [
            _message("p_cy", "m-old", now - 31 * DAY),
            _message("p_cy", "m-new", now - 29 * DAY),
            _approval("a-old", "approved", now - 402 * DAY, now - 401 * DAY, now - 401 * DAY),
            _approval("a-pending", "pending", now - 402 * DAY, now + DAY, None),
            Put(ENROLLMENTS, "j:old", {"entered": False, "instance_id": "", "reason": "x", "at": now - 401 * DAY}),
            Put(ENROLLMENTS, "j:new", {"entered": False, "instance_id": "", "reason": "x", "at": now - DAY}),
        ]
    )
    await store.close()
    async with _serving(nats_server, tmp_path, inbox_days=30.0) as (_, runtime):
        store = runtime.parts["store"]
        for _ in range(300):
            if await store.get(ENROLLMENTS, "j:old") is None:
                break
            await asyncio.sleep(0.05)
        assert {r.key async for r in store.scan_all(INBOX)} == {"p_cy/m-new"}
        assert {r.key async for r in store.scan_all(APPROVALS)} == {"a-pending"}
        assert {r.key async for r in store.scan_all(ENROLLMENTS)} == {"j:new"}
