"""Templates: profile fields in, a missing field is an error naming it, never a blank."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_orchestration.domain.templates import MissingField, compile_template
from cdp_orchestration.domain.view import PersonView

PERSON = PersonView(
    "p1",
    {
        "traits.first_name": "Ada",
        "traits.address": {"city": "Berlin"},
        "computed.orders_90d": 3,
        "scores.churn_risk": 0.25,
        "consent.purpose:Marketing": True,
    },
)


def test_renders_profile_fields_by_root() -> None:
    template = compile_template(
        {
            "subject": "{{ traits.first_name }}, {{ computed.orders_90d }} orders",
            "body": "{{ traits.address.city }} {{ '%.0f%%' % (scores.churn_risk * 100) }} {{ consent['purpose:Marketing'] }}",
        },
        "template",
    )
    assert template.render(PERSON) == {"subject": "Ada, 3 orders", "body": "Berlin 25% True"}
    assert template.fields == {
        "traits.first_name",
        "computed.orders_90d",
        "traits.address",
        "scores.churn_risk",
        "consent.purpose:Marketing",
    }


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("Hi {{ traits.nickname }}", "traits.nickname"),
        ("{{ traits.address.street }}", "traits.address.street"),
        ("{% if traits.vip %}VIP{% endif %}", "traits.vip"),
        ("{{ scores.clv * 2 }}", "scores.clv"),
    ],
)
def test_a_missing_field_is_an_error_naming_it_never_a_blank(text: str, field: str) -> None:
    template = compile_template({"body": text}, "template")
    with pytest.raises(MissingField) as caught:
        template.render(PERSON)
    assert (caught.value.field, caught.value.part) == (field, "body")
    assert "Ada" not in str(caught.value)


def test_a_null_value_counts_as_missing_and_templates_may_guard_optional_fields() -> None:
    with pytest.raises(MissingField):
        compile_template({"b": "{{ traits.first_name }}"}, "t").render(PersonView("p", {"traits.first_name": None}))
    guarded = compile_template(
        {"b": "Hi {{ traits.nickname | default('there') }}{% if traits.vip is defined %}, VIP{% endif %}"}, "t"
    )
    assert guarded.render(PERSON) == {"b": "Hi there"}


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"body": "{{ traits.first_name "}, "t.body"),
        ({"body": "{{ email }}"}, "t.body"),
        ({"html": '<a href="{{ traits.website | ur }}">x</a>'}, "t.html"),  # no such filter: a typo of url
        ({"body": 3}, "t.body"),
        ({}, "t"),
        ("Hi", "t"),
    ],
)
def test_bad_templates_are_rejected_when_compiled_naming_the_part(source: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_template(source, "t")
    assert caught.value.field == field


def test_the_sandbox_keeps_templates_away_from_python_internals() -> None:
    template = compile_template({"b": "{{ traits.first_name.__class__.__mro__ }}"}, "t")
    with pytest.raises(MissingField):
        template.render(PERSON)


def test_entry_properties_render_as_entry_fields_and_are_named_when_missing() -> None:
    template = compile_template({"body": "{{ traits.first_name }}: {{ entry.cart_url }}"}, "t")
    assert (template.fields, template.entry_fields) == ({"traits.first_name"}, {"entry.cart_url"})
    assert template.render(PERSON, {"cart_url": "https://shop.example/c/1"}) == {
        "body": "Ada: https://shop.example/c/1"
    }
    with pytest.raises(MissingField) as caught:
        template.render(PERSON, {})
    assert caught.value.field == "entry.cart_url"


def test_numbers_render_as_people_write_them_and_an_author_can_still_format_them() -> None:
    # Profiles and event properties carry every number as a double: 399 arrives as 399.0.
    person = PersonView("p", {"computed.orders_90d": 3.0, "scores.churn_risk": 0.1 + 0.2, "traits.balance": -12.5})
    template = compile_template(
        {
            "body": "{{ computed.orders_90d }} orders, {{ entry.price }} EUR, risk {{ scores.churn_risk }}, "
            "{{ traits.balance }}, {{ entry.price * 1.1 }}",
            "formatted": "{{ '%.2f' | format(entry.price) }} {{ entry.count | int }} {{ entry.price | round(1) }}",
        },
        "t",
    )
    rendered = template.render(person, {"price": 399.0, "count": 2.0})
    assert rendered["body"] == "3 orders, 399 EUR, risk 0.3, -12.5, 438.9"
    assert rendered["formatted"] == "399.00 2 399"


def test_values_in_an_html_part_are_escaped_and_the_authors_markup_is_kept() -> None:
    # A person who signs up as this can reach every email a journey sends them.
    hostile = '<a href="https://evil.example">Reset your password</a><script>steal()</script>'
    person = PersonView("p", {"traits.first_name": hostile, "computed.orders_90d": 3.0})
    template = compile_template(
        {
            "subject": "Hi {{ traits.first_name }}",
            "body": "Hi {{ traits.first_name }}, your cart: {{ entry.cart_url }}",
            "html": "<p>Hi <b>{{ traits.first_name }}</b>, {{ computed.orders_90d }} orders. "
            '<a href="{{ entry.cart_url }}">Your cart</a></p>',
        },
        "t",
    )
    rendered = template.render(person, {"cart_url": "https://shop.example/c?a=1&b=2"})
    assert rendered["html"] == (
        "<p>Hi <b>&lt;a href=&#34;https://evil.example&#34;&gt;Reset your password&lt;/a&gt;"
        "&lt;script&gt;steal()&lt;/script&gt;</b>, 3 orders. "
        '<a href="https://shop.example/c?a=1&amp;b=2">Your cart</a></p>'
    )
    # Text parts (the email's plain part, SMS, push, webhook) carry the value as it is: they are not HTML.
    assert rendered["subject"] == f"Hi {hostile}"
    assert rendered["body"] == f"Hi {hostile}, your cart: https://shop.example/c?a=1&b=2"


def test_a_missing_field_in_an_html_part_is_still_named() -> None:
    template = compile_template({"html": "<p>{{ traits.nickname }}</p>"}, "t")
    with pytest.raises(MissingField) as caught:
        template.render(PERSON)
    assert (caught.value.field, caught.value.part) == ("traits.nickname", "html")


HOSTILE_LINKS = [
    "javascript:alert(document.cookie)",
    "JavaScript:alert(1)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "java\nscript:alert(1)",
    "\x01javascript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD5zdGVhbCgpPC9zY3JpcHQ+",
    "vbscript:msgbox(1)",
    "//evil.example/login",
    "/account",
    "https:evil.example",
    "https:\\\\evil.example",
    "mailto:ceo@shop.example",
    "",
    "https://[::1",
]


@pytest.mark.parametrize("link", HOSTILE_LINKS)
def test_a_link_a_person_wrote_reaches_an_href_only_as_a_web_url(link: str) -> None:
    # Escaping alone keeps `javascript:` intact: `| url` is what makes a person's link safe to click.
    person = PersonView("p", {"traits.website": link})
    template = compile_template(
        {"html": '<a href="{{ traits.website | url }}">Your site</a>', "url": "{{ traits.website | url }}"}, "t"
    )
    assert template.render(person) == {"html": '<a href="#">Your site</a>', "url": "#"}


def test_a_web_url_passes_the_url_filter_as_written_and_escaped_in_html() -> None:
    person = PersonView("p", {"traits.website": "HTTPS://Shop.example/c?a=1&b=<2>", "computed.orders_90d": 3.0})
    template = compile_template(
        {
            "html": '<a href="{{ traits.website | url }}">Site</a><a href="{{ entry.cart | url }}">Cart</a>',
            "url": "{{ traits.website | url }}",
            "body": "{{ computed.orders_90d | url }}",
        },
        "t",
    )
    rendered = template.render(person, {"cart": "http://shop.example/cart"})
    assert rendered["html"] == (
        '<a href="HTTPS://Shop.example/c?a=1&amp;b=&lt;2&gt;">Site</a><a href="http://shop.example/cart">Cart</a>'
    )
    assert rendered["url"] == "HTTPS://Shop.example/c?a=1&b=<2>"
    assert rendered["body"] == "#"  # a number is no link


def test_a_missing_field_through_the_url_filter_is_named_not_a_hash() -> None:
    template = compile_template({"html": '<a href="{{ traits.website | url }}">x</a>'}, "t")
    with pytest.raises(MissingField) as caught:
        template.render(PERSON)
    assert (caught.value.field, caught.value.part) == ("traits.website", "html")
