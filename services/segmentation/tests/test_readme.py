"""The README cannot rot: every variable is documented and every example definition parses, in both forms."""

import json
import re
from pathlib import Path

from cdp_kit.settings import describe
from cdp_segmentation.domain import compile_segment, from_json, parse, to_json
from cdp_segmentation.settings import SegmentationSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_variable_is_documented_in_the_readme():
    assert [var for var, _default, _help in describe(SegmentationSettings) if f"`{var}`" not in README] == []


def test_every_text_example_parses_and_the_tree_example_is_the_same_language():
    (texts,) = re.findall(r"```text\n(.*?)```", README, flags=re.S)
    for line in texts.strip().splitlines():
        compile_segment(parse(line))
    (tree,) = re.findall(r"```json\n(.*?)```", README, flags=re.S)
    node = from_json(json.loads(tree))
    assert from_json(to_json(node)) == node
    [trait] = compile_segment(node).computed_traits
    assert trait["where"] == {"total": {"$gt": 50}} and trait["window"] == "30d"


def test_the_compiled_example_in_the_prose_is_what_the_compiler_writes():
    (written,) = re.findall(r"becomes the definition\s+`(\{.*?\})`", README, flags=re.S)
    compiled = compile_segment(parse('count(event = "Order Completed" and properties.total > 50, within 30d) >= 1'))
    [definition] = compiled.computed_traits
    assert definition["name"].startswith("seg_")
    wanted = {k: v for k, v in definition.items() if k != "name"}
    assert json.loads(written.replace("\n", " ")) == {k: v for k, v in wanted.items() if k != "event_type"}
