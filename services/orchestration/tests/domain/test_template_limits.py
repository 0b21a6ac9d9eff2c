"""Template limits: a journey's template cannot make orchestration spend gigabytes or hours, neither when a
journey is validated (compiling it) nor when its action is sent (rendering it in the event loop).

Each hostile template is compiled and rendered in a child process with a memory cap and a timeout, so a
missing limit fails the test in seconds instead of stopping the test run (or the machine) with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from cdp_orchestration.domain.templates import MissingField, compile_template
from cdp_orchestration.domain.view import PersonView

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))
    from cdp_kit.errors import InvalidArgument
    from cdp_orchestration.domain.templates import compile_template
    from cdp_orchestration.domain.template_limits import TemplateTooCostly
    from cdp_orchestration.domain.view import PersonView
    try:
        template = compile_template({"body": sys.argv[1]}, "nodes.welcome.template")
    except InvalidArgument as error:
        print(json.dumps({"refused": "validate", "field": error.field, "message": str(error)}))
        raise SystemExit
    try:
        out = template.render(PersonView("p_1", {"traits.name": "Ada"}), {"n": 3})
    except TemplateTooCostly as error:
        print(json.dumps({"refused": "render", "message": str(error)}))
        raise SystemExit
    print(json.dumps({"rendered": len(out["body"])}))
    """
)


def _run(source: str) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, source], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("compiling and rendering the template did not finish in 30 s")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


# Refused when the journey is validated: the text alone shows the cost.
STATIC = {
    "repeat": "{{ 'x' * 4000000000 }}",
    "repeat_300m": "{{ 'x' * 300000000 }}",
    "format_width": "{{ '%200000000d' | format(1) }}",
    "percent_width": "{{ '%200000000d' % 1 }}",
    "center": "{{ 'x' | center(200000000) }}",
    "power": "{{ 9 ** 999999999 }}",
    "str_format_width": "{{ '{:>999999999}'.format(1) }}",
    "nested_ranges": "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "recursive_loop": "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}",
}

# Refused when rendered: the cost depends on a value (entry.n is 3), so the text cannot show it.
DYNAMIC = {
    "repeat": "{{ 'x' * (entry.n * 1000000000) }}",
    "nested_loops": (
        "{% for a in range(entry.n * 10000) %}{% for b in range(entry.n * 10000) %}{% endfor %}{% endfor %}"
    ),
    "range": "{% for a in range(entry.n * 100000) %}x{% endfor %}",
    "doubling_concat": (
        "{% set ns = namespace(s='x') %}{% for i in range(entry.n * 30) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s | length }}"
    ),
    "doubling_plus": (
        "{% set ns = namespace(s='x') %}{% for i in range(entry.n * 30) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}{{ ns.s | length }}"
    ),
    "doubling_macro": (
        "{% macro f(s, n) %}{% if n %}{{ f(s | string ~ s | string, n - 1) }}{% else %}{{ s | length }}{% endif %}"
        "{% endmacro %}{{ f('x', entry.n * 20) }}"
    ),
    "branching_macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(entry.n * 10) }}"
    ),
    "ljust": "{{ 'x'.ljust(entry.n * 1000000000) }}",
    "join": "{{ range(entry.n * 30000) | join('x' * 100) }}",
    "indent": "{{ ('x\\n' * 1000) | indent(entry.n * 10000000) }}",
    "wordwrap": "{{ ('y ' * 400000) | wordwrap(1, wrapstring='-' * 100) }}",
    "batch": "{{ range(1) | batch(entry.n * 1000000000, 'x') | list | length }}",
    "printed": "{% for i in range(entry.n * 30000) %}{{ 'y' * 100 }}{% endfor %}",
    "set_block": "{% set x %}{% for i in range(99999) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}{{ x | length }}",
    "work": "{% set big = 'x' * 1000000 %}{% for i in range(entry.n * 30000) %}{{ big | wordcount }}{% endfor %}",
}


@pytest.mark.parametrize("source", STATIC.values(), ids=STATIC.keys())
def test_a_template_whose_text_is_over_a_limit_is_refused_at_validation(source: str) -> None:
    result = _run(source)
    assert result["refused"] == "validate", result
    assert result["field"] == "nodes.welcome.template.body"
    assert "docs/journeys/README.md" in result["message"]


@pytest.mark.parametrize("source", DYNAMIC.values(), ids=DYNAMIC.keys())
def test_a_render_over_a_limit_stops_with_an_error_naming_the_part(source: str) -> None:
    result = _run(source)
    assert result["refused"] == "render", result
    assert "template part 'body'" in result["message"]


def test_ordinary_templates_still_render_as_written() -> None:
    template = compile_template(
        {
            "subject": "Hi {{ traits.name }}",
            "body": (
                "{% for i in range(3) %}{{ i }},{% endfor %} {{ '%.2f' | format(3.14159) }} {{ '%5s|' % 'ab' }}"
                "{{ 'ab' * 2 }} {{ [1] + [2] }} {{ 'x' ~ traits.name }} {{ traits.name | center(7) }}"
                "{% set ns = namespace(a=1) %}{% set ns.a = ns.a + 1 %}{{ ns.a }}"
                "{% macro m(x) %}[{{ x }}]{% endmacro %}{{ m(2 ** 3) }} {{ range(3) | join('-') }}"
                "{{ '{:>4}'.format(7) }}"
            ),
            "html": "<p>{% for i in range(2) %}<b>{{ traits.name }}</b>{% endfor %}</p>",
        },
        "template",
    )
    assert template.render(PersonView("p_1", {"traits.name": "<Ada>"})) == {
        "subject": "Hi <Ada>",
        "body": "0,1,2, 3.14    ab|abab [1, 2] x<Ada>  <Ada> 2[8] 0-1-2   7",
        "html": "<p><b>&lt;Ada&gt;</b><b>&lt;Ada&gt;</b></p>",
    }


def test_a_list_is_not_changed_in_place() -> None:
    # list.extend in a loop doubles a list without any operator: the immutable sandbox hides the method, which
    # reads as a missing value (as Python's internals do), so the action fails instead of growing the list
    template = compile_template({"body": "{% set l = [1] %}{{ l.extend(l) }}"}, "template")
    with pytest.raises(MissingField, match="extend"):
        template.render(PersonView("p_1", {}))
