"""Journey documents: reading JSON and YAML, validation that reports every problem with node and field,
and the lifecycle of versions."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import Catalogue, JourneyInvalid, load_journey, parse_journey
from cdp_orchestration.domain.journey import Action, Delay, EventEntry, ScheduleEntry, Split, Wait
from cdp_orchestration.domain.lifecycle import State

EMAIL = {"channel": "email", "purpose": "Marketing", "template": {"subject": "Hi {{ traits.first_name }}"}}

CART = {
    "id": "abandoned-cart",
    "name": "Abandoned cart",
    "priority": 50,
    "category": "reminder",
    "entry": {"event": "Cart Abandoned", "where": "properties.total > 0"},
    "exit": [{"event": "Order Completed"}, {"condition": "traits.unsubscribed = true"}],
    "goal": {"event": "Order Completed", "within": "3d"},
    "nodes": [
        {"id": "wait", "type": "delay", "duration": "1h", "next": "remind"},
        {"id": "remind", "type": "action", **EMAIL, "category": "reminder", "next": "check"},
        {
            "id": "check",
            "type": "wait",
            "event": "Order Completed",
            "timeout": "2d",
            "next": "done",
            "timeout_next": "split",
        },
        {
            "id": "split",
            "type": "split",
            "variants": [
                {"name": "discount", "weight": 50, "next": "offer"},
                {"name": "control", "weight": 50, "control": True, "next": "done"},
            ],
        },
        {"id": "offer", "type": "action", **EMAIL, "category": "offer", "value": 10, "next": "done"},
        {"id": "done", "type": "exit"},
    ],
}

YAML = """
id: abandoned-cart
priority: 50
entry: {event: Cart Abandoned}
exit:
  - event: Order Completed
nodes:
  - id: remind
    type: action
    channel: email
    purpose: Marketing
    template:
      subject: "{{ traits.first_name }}, your cart"
"""

CATALOGUE = Catalogue(
    events=frozenset({"Cart Abandoned", "Order Completed"}),
    fields=frozenset({"traits.first_name", "traits.unsubscribed"}),
    purposes=frozenset({"Marketing"}),
)


def problems(document: dict, catalogue: Catalogue | None = None) -> list[tuple[str | None, str]]:
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(document, catalogue)
    return [(p.node, p.path) for p in caught.value.problems]


def with_nodes(*nodes: dict, **extra: object) -> dict:
    return {"id": "j", "entry": {"api": True}, "nodes": list(nodes), **extra}


def test_a_valid_journey_reads_into_its_model() -> None:
    journey = parse_journey(CART, CATALOGUE)
    assert (journey.id, journey.version, journey.priority, journey.start) == ("abandoned-cart", 1, 50, "wait")
    assert isinstance(journey.entry, EventEntry) and journey.entry.event.names == {"Cart Abandoned"}
    assert isinstance(journey.nodes["wait"], Delay) and journey.nodes["wait"].seconds == 3600
    assert isinstance(journey.nodes["check"], Wait) and journey.nodes["check"].timeout_next == "split"
    split = journey.nodes["split"]
    assert isinstance(split, Split) and [v.control for v in split.variants] == [False, True]
    offer = journey.nodes["offer"]
    assert isinstance(offer, Action) and (offer.category, offer.value) == ("offer", 10.0)
    assert journey.goal is not None and journey.goal.within == 3 * 86400
    assert journey.document is CART


def test_json_and_yaml_forms_read_the_same() -> None:
    from_yaml = load_journey(YAML, CATALOGUE, form="yaml")
    from_json = load_journey(orjson.dumps(from_yaml.document), CATALOGUE)
    assert from_json.nodes["remind"].template.source == {"subject": "{{ traits.first_name }}, your cart"}
    assert from_json.document == from_yaml.document
    with pytest.raises(JourneyInvalid) as caught:
        load_journey("id: [", form="yaml")
    assert caught.value.field == "journey"


def test_every_problem_is_reported_at_once_with_node_and_field() -> None:
    # Problems name the node and the field within it (the API's Problem), and the full path.
    document = with_nodes(
        {"id": "a", "type": "action", "channel": "email", "template": {"b": "x"}, "next": "b"},  # no purpose
        {"id": "b", "type": "delay", "duration": "soon", "next": "nowhere"},
        {"id": "c", "type": "exit"},  # unreachable
    )
    assert problems(document) == [
        ("a", "nodes.a.purpose"),
        ("b", "nodes.b.duration"),
        ("b", "nodes.b.next"),
        ("c", "nodes.c.id"),
    ]
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(document)
    error = caught.value
    assert isinstance(error, InvalidArgument) and error.field == "nodes.a.purpose"
    assert "nodes.c.id: cannot be reached" in error.message and "consent purpose" in error.message


def test_a_loop_without_a_wait_is_rejected_and_one_with_a_delay_is_not() -> None:
    loop = with_nodes(
        {"id": "a", "type": "action", **EMAIL, "next": "b"},
        {"id": "b", "type": "branch", "branches": [{"if": "scores.x > 1", "next": "a"}], "else": "c"},
        {"id": "c", "type": "exit"},
    )
    assert problems(loop) == [("a", "nodes.a.next")]
    with pytest.raises(JourneyInvalid, match="a -> b -> a without a delay or wait"):
        parse_journey(loop)
    self_loop = with_nodes(
        {"id": "s", "type": "split", "variants": [{"name": "x", "weight": 1, "next": "s"}, {"name": "y", "weight": 1}]}
    )
    assert problems(self_loop) == [("s", "nodes.s.next")]
    delayed = with_nodes(
        {"id": "a", "type": "action", **EMAIL, "next": "d"},
        {"id": "d", "type": "delay", "duration": "1d", "next": "b"},
        {"id": "b", "type": "branch", "branches": [{"if": "scores.x > 1", "next": "a"}]},
    )
    assert parse_journey(delayed).nodes["b"].otherwise is None


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (with_nodes({"id": "d", "type": "delay", "until": "9am"}), [("d", "nodes.d.until")]),
        (with_nodes({"id": "d", "type": "delay", "duration": "1h", "until": "09:00"}), [("d", "nodes.d.duration")]),
        (with_nodes({"id": "w", "type": "wait", "event": "X"}), [("w", "nodes.w.timeout")]),
        (
            with_nodes({"id": "w", "type": "wait", "condition": "traits.x >", "timeout": "1d"}),
            [("w", "nodes.w.condition")],
        ),
        (with_nodes({"id": "x", "type": "teleport"}), [("x", "nodes.x.type")]),
        (with_nodes({"id": "x", "type": "exit"}, {"id": "x", "type": "exit"}), [("x", "nodes.x.id")]),
        (with_nodes({"id": "a", "type": "action", **EMAIL, "channel": "fax"}), [("a", "nodes.a.channel")]),
        (with_nodes({"id": "a", "type": "action", **EMAIL, "on_cap": "skip"}), [("a", "nodes.a.on_cap")]),
        (with_nodes({"id": "a", "type": "action", **EMAIL, "expires_after": "soon"}), [("a", "nodes.a.expires_after")]),
        (
            with_nodes({"id": "a", "type": "action", **EMAIL, "template": {"b": "{% if %}"}}),
            [("a", "nodes.a.template.b")],
        ),
        (
            with_nodes({"id": "a", "type": "action", **EMAIL, "template": {"b": "{{ user.name }}"}}),
            [("a", "nodes.a.template.b")],
        ),
        (
            with_nodes(
                {"id": "s", "type": "split", "variants": [{"name": "a", "weight": 0}, {"name": "b", "weight": 1}]}
            ),
            [("s", "nodes.s.variants[0].weight")],
        ),
        (
            with_nodes(
                {
                    "id": "s",
                    "type": "split",
                    "variants": [
                        {"name": "a", "weight": 1, "control": True},
                        {"name": "b", "weight": 1, "control": True},
                    ],
                }
            ),
            [("s", "nodes.s.variants")],
        ),
        (with_nodes({"id": "x", "type": "exit"}, timezone="Europe/Atlantis"), [("", "timezone")]),
        (
            with_nodes({"id": "x", "type": "exit"}, entry={"schedule": {"cron": "61 * * * *", "segment": "vip"}}),
            [("", "entry.schedule.cron")],
        ),
        (
            with_nodes({"id": "x", "type": "exit"}, entry={"event": "X", "where": "properties.total >> 1"}),
            [("", "entry.where")],
        ),
        (with_nodes({"id": "x", "type": "exit"}, reentry={"cooldown": "0s"}), [("", "reentry.cooldown")]),
        (with_nodes({"id": "x", "type": "exit"}, goal={"event": "X"}), [("", "goal.within")]),
        (with_nodes({"id": "x", "type": "exit"}, start="y"), [("", "start")]),
        (with_nodes({"id": "x", "type": "exit"}, colour="blue"), [("", "colour")]),
        ({"id": "j", "nodes": [{"id": "x", "type": "exit"}]}, [("", "entry")]),
    ],
)
def test_bad_parts_are_named(document: dict, expected: list) -> None:
    assert problems(document) == expected


def test_an_action_chooses_what_a_full_cap_does_and_how_long_it_stays_worth_sending() -> None:
    journey = parse_journey(with_nodes({"id": "a", "type": "action", **EMAIL, "on_cap": "drop", "expires_after": "6h"}))
    action = journey.nodes["a"]
    assert (action.on_cap, action.expires_after) == ("drop", 6 * 3600)
    assert parse_journey(with_nodes({"id": "a", "type": "action", **EMAIL})).nodes["a"].on_cap == "defer"
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(with_nodes({"id": "a", "type": "action", **EMAIL, "on_cap": "skip"}))
    (problem,) = caught.value.problems
    assert (problem.node, problem.field) == ("a", "on_cap") and "'defer'" in problem.message


def test_entry_fields_in_conditions_need_an_entry_that_supplies_them() -> None:
    nodes = [
        {"id": "b", "type": "branch", "branches": [{"if": "entry.total > 100", "next": "a"}]},
        {"id": "a", "type": "action", **EMAIL, "template": {"b": "{{ entry.cart_url }}"}},
    ]
    exits = [{"id": "big", "condition": "entry.total > 1000"}]
    for entry in ({"event": "Cart Abandoned"}, {"api": True}):
        # An event's properties or an Enroll call's: known only when they come, never checked by the catalogue.
        journey = parse_journey(with_nodes(*nodes, entry=entry, exit=exits), Catalogue(fields=frozenset()))
        assert journey.nodes["b"].branches[0][0].entry_fields == {"entry.total"}
    for entry in ({"segment": "vip"}, {"schedule": {"cron": "0 9 * * 1", "segment": "vip"}}):
        with pytest.raises(JourneyInvalid) as caught:
            parse_journey(with_nodes(*nodes, entry=entry, exit=exits))
        found = [(p.node, p.path) for p in caught.value.problems]
        assert found == [("", "exit[0].condition"), ("b", "nodes.b.branches[0].if"), ("a", "nodes.a.template")]
        assert "entry.total" in caught.value.problems[0].message
        assert "segment or schedule entry" in caught.value.problems[0].message
    # An event entry's own condition reads the event's properties too, beside the person's fields.
    own = with_nodes(nodes[1], entry={"event": "Cart Abandoned", "if": "entry.total > 2 * traits.avg_order"})
    assert parse_journey(own).entry.condition.entry_fields == {"entry.total"}


def test_an_unknown_event_is_named_by_node_and_field_wherever_it_is_written() -> None:
    document = with_nodes(
        {"id": "w", "type": "wait", "event": "Order Complete", "timeout": "1d", "next": "b"},
        {"id": "b", "type": "branch", "branches": [{"if": 'performed("Cart Abandonned", within 1d)', "next": "x"}]},
        {"id": "x", "type": "exit"},
        entry={"event": "Cart Abandoned"},
        exit=[{"event": "Order Canceled"}, {"condition": 'count("Refnd") > 1'}],
        goal={"event": "Order Complete", "within": "1d"},
    )
    assert problems(document, CATALOGUE) == [
        ("", "exit[0].event"),
        ("", "exit[1].condition"),
        ("", "goal.event"),
        ("w", "nodes.w.event"),
        ("b", "nodes.b.branches[0].if"),
    ]
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(document, CATALOGUE)
    assert "'Refnd' is not a known event" in str(caught.value)
    # Without a catalogue event names are not checked (a journey may name an event nobody has sent yet).
    assert parse_journey(document).id == "j"


def test_the_catalogue_catches_unknown_events_fields_segments_and_purposes() -> None:
    document = {
        **CART,
        "entry": {"event": "Cart Abandonned"},
        "exit": [{"condition": "traits.unsubscribd = true"}],
        "nodes": [
            {
                "id": "remind",
                "type": "action",
                **EMAIL,
                "purpose": "Marketting",
                "template": {"subject": "{{ traits.frist_name }}"},
                "next": "w",
            },
            {"id": "w", "type": "wait", "condition": 'in_segment("vipp")', "timeout": "1d", "next": "a"},
            {"id": "a", "type": "action", **EMAIL, "template": {"b": "hi"}, "rank_by": "scores.conversoin"},
        ],
    }
    catalogue = Catalogue(CATALOGUE.events, CATALOGUE.fields, frozenset({"vip"}), CATALOGUE.purposes)
    assert problems(document, catalogue) == [
        ("", "entry.event"),
        ("", "exit[0].condition"),
        ("remind", "nodes.remind.purpose"),
        ("remind", "nodes.remind.template"),
        ("w", "nodes.w.condition"),
        ("a", "nodes.a.rank_by"),
    ]
    # Without a catalogue the same names are not checked.
    assert parse_journey(document).id == "abandoned-cart"


def test_scheduled_entry_and_computed_traits_for_aggregate_conditions() -> None:
    journey = parse_journey(
        with_nodes(
            {
                "id": "b",
                "type": "branch",
                "branches": [{"if": 'count("Order Completed", within 30d) >= 3', "next": "x"}],
            },
            {"id": "x", "type": "exit"},
            entry={"schedule": {"cron": "0 9 * * 1", "segment": "vip"}},
        ),
        Catalogue(fields=frozenset()),  # generated computed traits are not catalogue fields
    )
    assert isinstance(journey.entry, ScheduleEntry) and journey.entry.segment == "vip"
    (definition,) = journey.computed_traits
    assert definition["op"] == "count" and definition["event_names"] == ["Order Completed"]


def test_lifecycle_draft_active_paused_archived_with_immutable_versions() -> None:
    v1 = parse_journey(CART)
    record = lifecycle.create(v1)
    assert record.state is State.DRAFT and not record.accepts_entries
    record = lifecycle.publish(record)
    assert record.state is State.ACTIVE and record.accepts_entries and record.live is v1
    with pytest.raises(InvalidArgument, match="must be 2"):
        lifecycle.save_draft(record, v1)  # version 1 is published: it cannot be saved again
    v2 = parse_journey({**CART, "version": 2, "priority": 60})
    record = lifecycle.save_draft(record, v2)
    assert record.live is v1  # a draft changes nothing that runs
    record = lifecycle.pause(lifecycle.publish(record))
    assert record.state is State.PAUSED and not record.accepts_entries
    assert record.versions[1] is v1 and record.live is v2
    with pytest.raises(FailedPrecondition):
        lifecycle.pause(record)
    record = lifecycle.archive(lifecycle.resume(record))
    assert record.state is State.ARCHIVED
    for move in (lifecycle.resume, lifecycle.publish, lifecycle.pause):
        with pytest.raises(FailedPrecondition):
            move(record)
    with pytest.raises(FailedPrecondition):
        lifecycle.save_draft(record, parse_journey({**CART, "version": 3}))
    with pytest.raises(FailedPrecondition, match="no draft"):
        lifecycle.publish(lifecycle.resume(lifecycle.pause(lifecycle.publish(lifecycle.create(v1)))))


def test_an_action_without_a_category_takes_the_journeys() -> None:
    journey = parse_journey({**with_nodes({"id": "a", "type": "action", **EMAIL}), "category": "transactional"})
    assert journey.nodes["a"].category == "transactional"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
KEYS = [
    "id",
    "type",
    "next",
    "entry",
    "nodes",
    "event",
    "where",
    "duration",
    "until",
    "timeout",
    "variants",
    "branches",
    "channel",
    "template",
    "purpose",
    "exit",
    "goal",
    "reentry",
    "condition",
    "if",
    "else",
]


def _mutate(document: object, path: list[object], value: object) -> object:
    """The document with the value at `path` (as far as it leads) replaced."""
    if not path:
        return value
    step, rest = path[0], path[1:]
    if isinstance(document, dict):
        key = step if isinstance(step, str) else (sorted(document)[step % len(document)] if document else "x")
        return {**document, key: _mutate(document.get(key), rest, value)}
    if isinstance(document, list) and document and isinstance(step, int):
        index = step % len(document)
        return [*document[:index], _mutate(document[index], rest, value), *document[index + 1 :]]
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.lists(st.integers(0, 10) | st.sampled_from(KEYS), max_size=4), value=JSON)
def test_any_broken_journey_is_rejected_with_named_problems_never_a_crash(path: list[object], value: object) -> None:
    document = _mutate(orjson.loads(orjson.dumps(CART)), path, value)
    try:
        parse_journey(document, CATALOGUE)
    except JourneyInvalid as error:
        assert error.problems and all(p.path and p.message for p in error.problems)


def test_a_problem_names_the_node_and_the_field_within_it() -> None:
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(with_nodes({"id": "wait_purchase", "type": "wait", "event": "X", "timeout": "soon"}))
    (problem,) = caught.value.problems
    assert (problem.node, problem.field, problem.path) == ("wait_purchase", "timeout", "nodes.wait_purchase.timeout")
    assert caught.value.field == "nodes.wait_purchase.timeout"
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey({**with_nodes({"id": "x", "type": "exit"}), "entry": {"event": 5}})
    (problem,) = caught.value.problems
    assert (problem.node, problem.field) == ("", "entry.event")


CRM = {
    "id": "a",
    "type": "action",
    "channel": "crm",
    "purpose": "Service",
    "template": {"kind": "case", "subject": "s"},
}


def test_a_crm_action_lists_the_profile_fields_its_task_carries() -> None:
    listed = parse_journey(with_nodes({**CRM, "signals": ["scores.churn_risk", "computed.tickets_30d", "traits.plan"]}))
    assert listed.nodes["a"].signals == ("scores.churn_risk", "computed.tickets_30d", "traits.plan")
    assert parse_journey(with_nodes(CRM)).nodes["a"].signals == ()  # the person's top scores, when sent
    scores = Catalogue(names={"scores": frozenset({"churn_risk"})})
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(with_nodes({**CRM, "signals": ["scores.churn_risk", "scores.churn_rsik"]}), scores)
    (problem,) = caught.value.problems
    assert (problem.node, problem.field) == ("a", "signals[1]")
    assert "scores.churn_rsik" in problem.message and "not a known profile field" in problem.message


@pytest.mark.parametrize(
    ("node", "field"),
    [
        ({**CRM, "signals": "scores.churn_risk"}, "nodes.a.signals"),
        ({**CRM, "signals": ["scores.churn_risk", "churn_risk"]}, "nodes.a.signals[1]"),
        ({**CRM, "signals": ["scores.churn_risk", 3]}, "nodes.a.signals[1]"),
        ({**CRM, "signals": ["entry.total"]}, "nodes.a.signals[0]"),
        ({**CRM, "signals": ["traits.plan", "traits.plan"]}, "nodes.a.signals[1]"),
        ({**CRM, "signals": [f"traits.t{i}" for i in range(21)]}, "nodes.a.signals"),
        ({"id": "a", "type": "action", **EMAIL, "signals": ["traits.plan"]}, "nodes.a.signals"),
    ],
)
def test_bad_signals_are_named_by_node_and_field(node: dict, field: str) -> None:
    assert problems(with_nodes(node)) == [("a", field)]


def messages(document: dict) -> list[str]:
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(document)
    return [p.message for p in caught.value.problems]


def test_a_step_missing_both_of_its_choices_says_it_has_neither_and_one_with_both_says_not_both() -> None:
    # "not both" for a wait with neither sent a marketer looking for a second field that was not there.
    assert messages(with_nodes({"id": "w", "type": "wait", "timeout": "1h"})) == [
        'a wait needs "event" or "condition"; it has neither'
    ]
    both = {"id": "w", "type": "wait", "event": "X", "condition": "traits.a = 1", "timeout": "1h"}
    assert messages(with_nodes(both)) == ['a wait needs "event" or "condition", not both']
    assert messages(with_nodes({"id": "d", "type": "delay"})) == [
        'a delay needs "duration" (like "1h") or "until" (like "09:00"); it has neither'
    ]


def test_an_action_without_a_purpose_says_none_is_given_and_that_exempt_categories_name_one_too() -> None:
    # "None is not one" for a transactional action read as if transactional actions could not be sent.
    action = {"id": "a", "type": "action", "channel": "email", "category": "transactional", "template": {"body": "x"}}
    [message] = messages(with_nodes(action))
    assert "none is given" in message and "exempt category too" in message and "None" not in message
