"""The platform's YAML reader: words people write as names stay names; true/false stay booleans."""

from __future__ import annotations

import pytest
import yaml

from cdp_kit.yamltext import YAMLError, load_yaml


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "y", "n", "On", "OFF", "Yes", "NO", "Y", "N"])
def test_yaml_1_1_boolean_words_stay_words(word: str) -> None:
    assert load_yaml(f"{word}: {word}\nlist: [{word}]") == {word: word, "list": [word]}


@pytest.mark.parametrize(("text", "value"), [("true", True), ("True", True), ("TRUE", True), ("false", False)])
def test_true_and_false_are_booleans(text: str, value: bool) -> None:
    assert load_yaml(f"flag: {text}") == {"flag": value}


def test_the_rest_of_yaml_reads_as_before() -> None:
    text = "n: 3\nx: 1.5\nnothing: null\ntilde: ~\nquoted: 'on'\nnames: [a, b]\nnested: {k: v}"
    assert load_yaml(text) == yaml.safe_load(text)


def test_the_documented_journey_entry_keeps_its_on_key() -> None:
    assert load_yaml("entry: {segment: vip, on: entered}") == {"entry": {"segment": "vip", "on": "entered"}}


def test_the_safe_loader_itself_is_left_alone() -> None:
    load_yaml("a: on")
    assert yaml.safe_load("a: on") == {"a": True}  # other readers in the process keep their own rules


def test_tags_that_build_objects_are_refused() -> None:
    with pytest.raises(YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']")


def test_bad_yaml_raises_yaml_error() -> None:
    with pytest.raises(YAMLError):
        load_yaml("a: [unclosed")
