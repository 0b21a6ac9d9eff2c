"""The feedback loop: the outcome events orchestration and the CRM connector post are what the labels read,
next best channel learns the channel people answered the platform's own messages on, and a journey's split
with a control group comes out as uplift data."""

from __future__ import annotations

import asyncio
import csv
import json

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import MemoryStore, Put
from cdp_orchestration.channels.outcomes import EVENT_NAMES, Feedback, track_event
from cdp_orchestration.channels.wire import CHANNELS as ORCHESTRATION_CHANNELS
from cdp_orchestration.domain.instance import Instance, Status, Step
from cdp_orchestration.domain.records import instance_record
from cdp_orchestration.journeys import JOURNEYS
from cdp_orchestration.state import INSTANCES
from cdp_profile.domain import ComputedTraits, ProfileEvent
from cdp_scoring.domain import ModelSpec
from cdp_training import feedback, learn
from cdp_training.__main__ import main
from cdp_training.labels import LabelSpec
from cdp_training.platformdata import apply_all
from cdp_training.pointintime import StoredProfile
from cdp_training.simulator import CHANNELS
from cdp_training.traits import COMPUTED_TRAITS

DAY = 86_400.0
T = 1_740_000_000.0  # the cut-off


def test_the_names_are_the_ones_orchestration_posts():
    assert set(feedback.MESSAGE_OUTCOMES) == set(EVENT_NAMES.values())
    assert set(feedback.MESSAGE_ANSWERS) <= set(EVENT_NAMES.values())
    assert set(feedback.JOURNEYS) and feedback.JOURNEYS == JOURNEYS and feedback.INSTANCES == INSTANCES
    # every orchestration channel that is a class under another name is mapped onto it
    assert {c for c in ORCHESTRATION_CHANNELS if c not in CHANNELS} >= set(feedback.CHANNEL_ALIASES)
    assert set(feedback.CHANNEL_ALIASES.values()) <= set(CHANNELS)


def outcome(person: str, n: int, name: str, channel: str, at: float) -> ProfileEvent:
    """An outcome event as orchestration posts it (its properties), as identity hands it to the profile."""
    kind = {v: k for k, v in EVENT_NAMES.items()}[name]
    event = track_event(Feedback(f"a{n}", kind, channel), person_id=person, user_id=f"u-{person}")
    return ProfileEvent(f"outcome:a{n}:{kind}", "track", name, at, "orchestration", event["properties"])


def stored(person: str, events: list[ProfileEvent]) -> StoredProfile:
    seen = ProfileEvent(f"{person}-visit", "page", "Home", T - 5 * DAY, "web")
    profile = apply_all(person, [seen, *events], ComputedTraits.from_dicts([]))
    return StoredProfile(person, profile.to_doc(), profile.timeline())


def test_next_best_channel_learns_the_channel_people_answer_the_platforms_messages_on():
    """An in-app message opened three times and an email clicked once: the person answers in-app. Orchestration
    says "inapp"; the model's class is "in_app". Delivered is not an answer."""
    label = LabelSpec.from_dict(learn.TRAINABLE["next_best_channel"].label)
    person = stored(
        "p1",
        [
            outcome("p1", 1, "Message Delivered", "email", T + DAY),
            outcome("p1", 2, "Message Clicked", "email", T + 2 * DAY),
            *(outcome("p1", 3 + k, "Message Opened", "inapp", T + (3 + k) * DAY) for k in range(3)),
        ],
    )
    assert label.label(person.timeline, T) == (float(CHANNELS.index("in_app")),)
    # a web push clicked is a push answer; only delivered messages: no answer, no row
    pushed = stored("p2", [outcome("p2", 9, "Message Clicked", "webpush", T + DAY)])
    assert label.label(pushed.timeline, T) == (float(CHANNELS.index("push")),)
    quiet = stored("p3", [outcome("p3", 10, "Message Delivered", "sms", T + DAY)])
    assert label.label(quiet.timeline, T) is None


def test_aliases_are_checked_by_name():
    base = {"kind": "channel_answered", "window": "30d", "events": [{"name": "Message Opened"}], "property": "channel"}
    base["classes"] = ["email", "in_app"]
    with pytest.raises(InvalidArgument) as caught:
        LabelSpec.from_dict({**base, "aliases": {"inapp": "push"}})
    assert caught.value.field == "label.aliases.inapp"
    with pytest.raises(InvalidArgument) as caught:
        LabelSpec.from_dict({"kind": "no_activity", "window": "30d", "aliases": {"a": "b"}})
    assert caught.value.field == "label.aliases"
    spec = LabelSpec.from_dict({**base, "aliases": {"inapp": "in_app"}})
    assert LabelSpec.from_dict(spec.to_dict()) == spec


JOURNEY = {
    "versions": {
        "1": {
            "id": "winback",
            "nodes": [
                {"id": "start", "type": "split", "variants": [
                    {"name": "email", "weight": 50, "next": "send"},
                    {"name": "holdout", "weight": 50, "control": True},
                ]},
                {"id": "send", "type": "action", "channel": "email"},
            ],
        }
    }
}  # fmt: skip


def instance(n: int, variant: str, *, converted: bool, goal_until: float) -> dict:
    entered = T + n * 60.0
    return instance_record(
        Instance(
            id=f"i{n}",
            journey_id="winback",
            version=1,
            person_id=f"p{n}",
            status=Status.RUNNING,
            entered_at=entered,
            variants={"start": variant},
            goal_until=goal_until,
            converted_at=entered + DAY if converted else None,
            steps=(Step("start", entered, "entered"), Step("start", entered + 1, f"variant:{variant}")),
        )
    )


@pytest.fixture
def orchestration() -> MemoryStore:
    store = MemoryStore()
    people = [
        # treated: 3 of 4 converted; control: 1 of 4; one treated person's goal window is still open
        *(instance(n, "email", converted=n < 3, goal_until=T + 7 * DAY) for n in range(4)),
        *(instance(n, "holdout", converted=n == 4, goal_until=T + 7 * DAY) for n in range(4, 8)),
        instance(8, "email", converted=False, goal_until=T + 400 * DAY),
    ]
    ops = [Put(JOURNEYS, "winback", JOURNEY), *(Put(INSTANCES, doc["id"], doc) for doc in people)]
    asyncio.run(store.bulk_write(ops))
    return store


def test_a_split_with_a_control_group_is_uplift_data(orchestration):
    data = asyncio.run(feedback.uplift_rows(orchestration, "winback", now=T + 30 * DAY))
    summary = data.summary()
    assert summary["arms"]["treatment"] == {"rows": 4, "outcomes": 3, "rate": 0.75}
    assert summary["arms"]["control"] == {"rows": 4, "outcomes": 1, "rate": 0.25}
    assert summary["uplift"] == 0.5 and summary["skipped"]["outcome_not_yet_known"] == 1
    assert {(r.variant, r.treatment) for r in data.rows} == {("email", 1), ("holdout", 0)}
    assert all(r.assigned_at == T + int(r.person_id[1:]) * 60.0 + 1 for r in data.rows)


def test_the_outcome_can_be_any_event_on_the_profile_within_a_window(orchestration):
    """Orders within 7 days of the assignment; one too late, and the window must have been observed."""
    order = lambda p, at: ProfileEvent(f"{p}-o{at}", "track", "Order Completed", at, "web", {"total": 10})  # noqa: E731
    profiles = [
        stored("p0", [order("p0", T + 2 * DAY)]),
        stored("p1", [order("p1", T + 9 * DAY)]),  # after the window
        stored("p2", [order("p2", T - DAY)]),  # before the assignment: a feature, not an outcome
        *(stored(f"p{n}", []) for n in (3, 5, 6, 7)),
        stored("p4", [order("p4", T + DAY)]),
        stored("p9", [order("p9", T + 40 * DAY)]),  # someone else: the store has observed 40 days
    ]
    spec = {"events": [{"name": "Order Completed"}], "window": "7d"}
    data = asyncio.run(feedback.uplift_rows(orchestration, "winback", outcome=spec, profiles=profiles))
    outcomes = {r.person_id: r.outcome for r in data.rows}
    assert outcomes["p0"] == 1 and outcomes["p1"] == 0 and outcomes["p4"] == 1 and outcomes["p5"] == 0
    assert outcomes["p2"] == 0 and data.skipped["no_profile"] == 1  # p8 has no profile
    # a model's features as known at each person's assignment: p0's order came after it
    features = ModelSpec.from_dict(
        {
            "name": "orders",
            "version": "1",
            "features": [{"name": "orders_total", "path": "computed.orders_total"}],
            "outputs": [{"score": "x", "output": "y"}],
            "computed_traits": [COMPUTED_TRAITS["orders_total"]],
        }
    )
    data = asyncio.run(
        feedback.uplift_rows(orchestration, "winback", outcome=spec, profiles=profiles, features=features)
    )
    assert data.feature_names == ["orders_total"]
    known = {r.person_id: r.features for r in data.rows}
    assert known["p0"] == [0.0] and known["p2"] == [1.0] and known["p4"] == [0.0]
    assert data.table()[0]["orders_total"] in (0.0, 1.0)
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(feedback.uplift_rows(orchestration, "winback", outcome=spec))
    assert caught.value.field == "store"
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(feedback.uplift_rows(orchestration, "winback", node="send"))
    assert caught.value.field == "node"


def test_uplift_data_command_writes_the_rows(orchestration, tmp_path, monkeypatch, capsys):
    async def open_and_read(url: str, journey: str, *, store_url: str | None, **kwargs):
        assert url == "memory://" and store_url is None
        return await feedback.uplift_rows(orchestration, journey, now=T + 30 * DAY, **kwargs)

    monkeypatch.setattr("cdp_training.feedback.export", open_and_read)
    out = tmp_path / "winback.csv"
    code = main(["uplift-data", "--orchestration-store", "memory://", "--journey", "winback", "--out", str(out)])
    assert code == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {row["treatment"] for row in rows} == {"0", "1"}
    assert json.loads(capsys.readouterr().out.split("\n", 1)[0])["uplift"] == 0.5
