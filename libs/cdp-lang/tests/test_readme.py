"""The README cannot rot: its Python example runs and every example condition compiles, in both forms."""

import re
from pathlib import Path

import pytest

from cdp_lang import SegmentSyntaxError, compile_condition

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_python_example_runs():
    (example,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    exec(compile(example, "README.md", "exec"), {})


def test_every_example_condition_compiles_and_reads_back_from_json():
    (texts,) = re.findall(r"```text\n(.*?)```", README, flags=re.S)
    lines = texts.strip().splitlines()
    assert len(lines) >= 10
    for line in lines:
        condition = compile_condition(line)
        assert compile_condition(condition.to_json()).node == condition.node, line


def test_the_error_quoted_in_the_readme_is_the_one_given():
    (quoted,) = re.findall(r"`(condition: line \d+, column \d+: .*?)`", README)
    with pytest.raises(SegmentSyntaxError) as error:
        compile_condition('traits.plan = "pro" and\n  traits.age >> 3')
    assert str(error.value) == quoted
