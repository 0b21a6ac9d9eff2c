"""What the platform's YAML reader refuses that PyYAML's safe loader lets through: a key written twice
(the first silently dropped), nesting deep enough to end in RecursionError, and aliases that expand a few
hundred bytes into a billion strings. Each is a YAMLError naming the line, which every caller already
reports as a document that is not valid YAML."""

from __future__ import annotations

import pytest

from cdp_kit.yamltext import MAX_DEPTH, YAMLError, load_yaml

LAUGHS = "\n".join(
    ["a0: &a0 [x,x,x,x,x,x,x,x,x,x]"]
    + [f"a{n}: &a{n} [{','.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 9)]
    + ["bomb: *a8"]
)


def refusal(text: str, **options) -> str:
    with pytest.raises(YAMLError) as refused:
        load_yaml(text, **options)
    return str(refused.value)


def test_a_key_written_twice_is_refused_naming_it_and_both_lines() -> None:
    text = "format: cdp-definitions\nsegments:\n  - id: a\nversion: 1\nsegments: []\n"
    message = refusal(text)
    assert "key 'segments' appears twice, on lines 2 and 5" in message


def test_a_key_written_twice_inside_a_list_item_is_refused() -> None:
    message = refusal("segments:\n  - id: a\n    definition: x\n    definition: y\n")
    assert "key 'definition' appears twice, on lines 3 and 4" in message


def test_a_journey_entry_written_twice_is_refused() -> None:
    message = refusal("id: j\nentry: {event: A}\nentry: {segment: vip, on: entered}\n")
    assert "key 'entry' appears twice" in message


def test_keys_that_only_look_alike_and_merge_keys_are_kept() -> None:
    assert load_yaml("1: a\n'1': b") == {1: "a", "1": "b"}
    text = "base: &base {channel: email, purpose: Marketing}\nnode:\n  <<: *base\n  channel: sms\n"
    assert load_yaml(text)["node"] == {"channel": "sms", "purpose": "Marketing"}


def test_nesting_past_the_bound_is_refused_naming_the_line_not_a_recursion_error() -> None:
    for text in ("x: " + "[" * 50_000, "x: " + "{a: " * 50_000):
        assert f"nested deeper than {MAX_DEPTH} levels on line 1" in refusal(text)
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert load_yaml(nested) is not None  # up to the bound reads as before


def test_aliases_that_expand_past_the_bound_are_refused() -> None:
    assert "expand to more than" in refusal(LAUGHS)
    assert "refers to itself" in refusal("a: &a [*a]")


def test_a_few_aliases_still_read_where_they_are_allowed() -> None:
    assert load_yaml("a: &a [x, y]\nb: *a\n") == {"a": ["x", "y"], "b": ["x", "y"]}


def test_a_document_that_holds_no_aliases_refuses_one_naming_it_and_its_line() -> None:
    message = refusal("a: &a [x, y]\nb: *a\n", aliases=False)
    assert "alias *a on line 2" in message
    assert "alias *a0 on line 2" in refusal(LAUGHS, aliases=False)
    assert load_yaml("a: [x, y]\nb: '*a'\n", aliases=False) == {"a": ["x", "y"], "b": "*a"}


@pytest.mark.parametrize("loader", ["_Loader", "_PythonLoader"])
def test_with_or_without_libyaml_the_same_checks_hold(loader: str) -> None:
    import yaml

    from cdp_kit import yamltext

    read = getattr(yamltext, loader)
    text = "a: on\nb: [x, {c: 1}]\nn: 007\nd: 2024-01-01\n"
    assert yaml.load(text, Loader=read) == yaml.load(text, Loader=yamltext._PythonLoader)
    assert yaml.load(text, Loader=read)["a"] == "on"
    with pytest.raises(YAMLError, match="key 'a' appears twice, on lines 1 and 2"):
        yaml.load("a: 1\na: 2\n", Loader=read)
    with pytest.raises(YAMLError, match=f"nested deeper than {MAX_DEPTH} levels"):
        yaml.load("x:\n" + "".join("  " * n + "- \n" for n in range(MAX_DEPTH + 5)), Loader=read)
    with pytest.raises(YAMLError, match="expand to more than"):
        yaml.load(LAUGHS, Loader=read)
