"""The text form: every documented example parses to the tree it means, writes back canonically, and bad text
fails with the line, column, what was expected and what was found."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_segmentation.domain import (
    Aggregate,
    And,
    Condition,
    Date,
    EventCondition,
    EventPredicate,
    InSegment,
    Not,
    Now,
    Or,
    Performed,
    SegmentSyntaxError,
    from_json,
    parse,
    to_json,
    to_text,
)

DAY = 86_400.0

EXAMPLES = [
    'traits.plan = "pro" and scores.churn_risk > 0.7',
    'traits.country in ["DE", "AT", "CH"] and not consent.email = false',
    'traits.email contains "@example.com" or traits.name starts_with "Dr"',
    "traits.phone exists",
    "not traits.phone exists",
    "traits.created_at < now - 30d",
    "computed.last_order_at >= now - 7d and traits.trial_ends_at <= now + 3d",
    'traits.signup_date > date("2026-01-01")',
    'count(event = "Order Completed" and properties.total > 50, within 30d) >= 3',
    'performed("Login", within 14d)',
    'not performed("Login", within 14d)',
    'performed(event = "Page Viewed" and type = "page" and properties.path starts_with "/pricing")',
    'sum(properties.total, event = "Order Completed", within 90d) > 500',
    'in_segment("vip") and not in_segment("churned")',
    "scores.behaviour_cluster = 3",
    '(traits.plan = "pro" or traits.plan = "team") and scores.clv >= 100',
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_every_documented_example_parses_and_round_trips(text):
    node = parse(text)
    assert parse(to_text(node)) == node
    assert from_json(to_json(node)) == node
    assert to_text(parse(to_text(node))) == to_text(node)


def test_examples_mean_what_they_say():
    assert parse('traits.plan = "pro" and scores.churn_risk > 0.7') == And(
        (Condition(("traits", "plan"), "=", "pro"), Condition(("scores", "churn_risk"), ">", 0.7))
    )
    assert parse('traits.country in ["DE", "AT", "CH"] and not consent.email = false') == And(
        (
            Condition(("traits", "country"), "in", ("DE", "AT", "CH")),
            Not(Condition(("consent", "email"), "=", False)),
        )
    )
    assert parse("traits.created_at < now - 30d") == Condition(("traits", "created_at"), "<", Now(-30 * DAY))
    assert parse("traits.trial_ends_at <= now + 3d") == Condition(("traits", "trial_ends_at"), "<=", Now(3 * DAY))
    assert parse('traits.signup_date > date("2026-01-01")') == Condition(
        ("traits", "signup_date"), ">", Date("2026-01-01")
    )
    assert parse('count(event = "Order Completed" and properties.total > 50, within 30d) >= 3') == Aggregate(
        "count",
        EventPredicate(("Order Completed",), "track", (EventCondition(("properties", "total"), ">", 50),)),
        None,
        30 * DAY,
        ">=",
        3,
    )
    assert parse('performed("Login", within 14d)') == Performed(EventPredicate(("Login",)), 14 * DAY)
    assert parse('sum(properties.total, event = "Order Completed", within 90d) > 500') == Aggregate(
        "sum", EventPredicate(("Order Completed",)), ("properties", "total"), 90 * DAY, ">", 500
    )
    assert parse('in_segment("vip") and not in_segment("churned")') == And(
        (InSegment("vip"), Not(InSegment("churned")))
    )


def test_precedence_is_or_then_and_then_not():
    a, b, c = (Condition(("traits", name), "exists") for name in "abc")
    assert parse("traits.a exists or traits.b exists and traits.c exists") == Or((a, And((b, c))))
    assert parse("not traits.a exists and traits.b exists") == And((Not(a), b))
    assert parse("not (traits.a exists and traits.b exists)") == Not(And((a, b)))
    assert parse("(traits.a exists or traits.b exists) and traits.c exists") == And((Or((a, b)), c))
    # Explicit grouping of the same operator is kept, and written back with its parentheses.
    nested = parse("(traits.a exists and traits.b exists) and traits.c exists")
    assert nested == And((And((a, b)), c))
    assert to_text(nested) == "(traits.a exists and traits.b exists) and traits.c exists"


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ('performed(event = "Login")', 'performed("Login")'),
        ('performed("Login" and type = "track")', 'performed("Login")'),
        ('count(event in ["B", "A", "B"]) > 1', 'count(event in ["A", "B"]) > 1'),
        ("traits.x < now - 7d", "traits.x < now - 1w"),
        ("traits.x < now - 24h", "traits.x < now - 1d"),
        ("traits.x > -0.0", "traits.x > 0.0"),
        ("traits.x>=-5", "traits.x >= -5"),
        ("sum(properties.total, within 90m) > 1", "sum(properties.total, within 90m) > 1"),
        ("consent.purpose:email = true", "consent.purpose:email = true"),
        ('traits.`first name` = "Ada"', 'traits.`first name` = "Ada"'),
        ('traits.x = "say \\"hi\\" \\\\ \\u00e9\\n"', 'traits.x = "say \\"hi\\" \\\\ é\\n"'),
        ("traits.x = 1e-05", "traits.x = 1e-05"),
        ("traits.x = 2e3", "traits.x = 2000.0"),
    ],
)
def test_text_is_written_back_canonically(written, canonical):
    assert to_text(parse(written)) == canonical
    assert parse(canonical) == parse(written)


def test_literals_keep_their_type():
    assert parse("traits.x = 1") != parse("traits.x = 1.0")
    assert parse("traits.x = 1") != parse("traits.x = true")
    assert parse('traits.x = "1"') != parse("traits.x = 1")
    assert len({parse("traits.x = 1"), parse("traits.x = 1.0"), parse("traits.x = true")}) == 3
    assert parse("traits.x in [1, true]").value == (1, True)


def test_strings_escape_and_paths_quote():
    node = parse('traits.`first name`.`a:b` = "line\\nbreak \\"quoted\\""')
    assert node == Condition(("traits", "first name", "a:b"), "=", 'line\nbreak "quoted"')
    assert parse(to_text(node)) == node


def _error(text, field="expression"):
    with pytest.raises(SegmentSyntaxError) as caught:
        parse(text, field=field)
    return caught.value


@pytest.mark.parametrize(
    ("text", "at", "expected", "found"),
    [
        ('traits.email ends_with "@x.com"', "ends_with", "a comparison operator (=, !=, <", "'ends_with'"),
        ('traits.name = "Ada', '"Ada', "a closing '\"'", "end of input"),
        ('(traits.a = 1 or traits.b = 2 and performed("X")', None, "'and', 'or' or ')'", "end of input"),
        ('performed("Login", within 14d', None, "')'", "end of input"),
        ("traits.phone = null", "null", "a value", "'null'"),
        ('count(event = "A" or event = "B") > 1', "or", "',', 'and' or ')'", "'or'"),
        ('count(not event = "A") > 1', "not", "an event condition", "'not'"),
        ('performed(type = "page" and (properties.a = 1))', "(p", "an event condition", "'('"),
        ("foo.bar = 1", "foo.bar", "a field of traits, computed, consent or scores", "'foo.bar'"),
        ("properties.total > 5", "properties", "a field of traits, computed, consent or scores", "'properties.total'"),
        ("traits.created_at < now - 30x", "30x", "a duration like 30d", "'30x'"),
        ('performed("Login", within 30)', "30", "a duration like 30d", "'30'"),
        ('performed("Login", within 0d)', "0d", "a duration like 30d", "'0d'"),
        ("traits.a = 1 traits.b = 2", "traits.b", "'and', 'or' or end of input", "'traits.b'"),
        ("traits.a = 1)", ")", "'and', 'or' or end of input", "')'"),
        ("", None, "a condition", "end of input"),
        ("traits.x = now", "=", "<, <=, > or >= before now", "'='"),
        ('count("A") in [1, 2]', "in", "a comparison operator (=, !=, <, <=, >, >=)", "'in'"),
        ('count(event = "A" and event = "B") > 1', 'event = "B"', "at most one 'event' condition", "'event'"),
        ('performed(type = "web")', '"web"', "an event type", "'\"web\"'"),
        (
            "count(properties.total > 5 and properties.total > 6) > 1",
            "properties.total > 6",
            "conditions that can hold together",
            "'properties.total'",
        ),
        ("traits.x in []", "]", "a value (a string, a number, true or false)", "']'"),
        ('sum(traits.total, "A") > 1', "traits.total", "the property to sum, like properties.total", "'traits.total'"),
        ("traits.x > 1e999", "1e999", "a number a float can hold", "'1e999'"),
        ('traits.x = "a\\q"', "\\q", "an escape", "'\\\\q'"),
        ("traits. = 1", " = 1", "a field name after '.'", "' '"),
        ('traits.x < date("yesterday")', '"yesterday"', "an ISO-8601 date or time", "'\"yesterday\"'"),
        ("traits.x = @", "@", "a field, a value, an operator or a parenthesis", "'@'"),
        ("traits.x starts_with 5", "5", "a string (the prefix)", "'5'"),
        ("count(properties.x = now) > 1", "now", "a value (a string, a number, true or false)", "'now'"),
        ("traits = 1", "traits", "a field after 'traits.'", "'traits'"),
    ],
)
def test_errors_say_where_what_was_expected_and_what_was_found(text, at, expected, found):
    error = _error(text)
    position = len(text) if at is None else text.index(at)
    assert (error.line, error.column) == (1, position + 1), str(error)
    assert expected in error.expected, str(error)
    assert error.found == found, str(error)
    assert str(error).startswith(f"expression: line 1, column {position + 1}: expected {error.expected}, found ")


def test_errors_count_lines_and_columns():
    error = _error('traits.plan = "pro"\n  and traits.email ends_with "x"')
    assert (error.line, error.column) == (2, 20)
    assert error.found == "'ends_with'"
    error = _error("   \n\t ")
    assert (error.line, error.column, error.found) == (2, 3, "end of input")
    error = _error('traits.x = 1 or\ntraits.name = "open\n')
    assert (error.line, error.column, error.found) == (2, 15, "end of line")


def test_errors_carry_the_callers_field_and_a_hint():
    error = _error("traits.phone = null", field="segment.expression")
    assert isinstance(error, InvalidArgument)
    assert error.field == "segment.expression"
    assert "exists" in error.description
    assert "only 'and' combines" in _error('performed("A" or "B")').description
    assert "equality is a single '='" in _error("traits.a == 1").description
    assert "event fields" in _error("context.ip exists").description


def test_text_must_be_a_string():
    with pytest.raises(InvalidArgument) as caught:
        parse(None, field="expression")  # type: ignore[arg-type]
    assert caught.value.field == "expression"
