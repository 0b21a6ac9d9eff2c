import json
import re
from pathlib import Path

from cdp_kit.settings import describe
from cdp_profile.domain import OPS, ComputedTrait
from cdp_profile.settings import ProfileSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_variable_is_documented_in_the_readme():
    assert [var for var, _default, _help in describe(ProfileSettings) if f"`{var}`" not in README] == []


def test_the_computed_trait_example_is_a_valid_definition():
    (example,) = re.findall(r"```json\n(.*?)```", README, flags=re.S)
    trait = ComputedTrait.from_dict(json.loads(example))
    assert (trait.op, trait.window) == ("avg", 90 * 86_400)


def test_the_pseudo_path_and_fraud_examples_are_valid_definitions():
    examples = [ComputedTrait.from_dict(json.loads(text)) for text in re.findall(r"`(\{\"name\".*?\})`", README)]
    assert {trait.op for trait in examples} >= {"max_speed", "mismatch_count"}
    assert {trait.property.split(".")[0] for trait in examples} >= {"$at", "$hour", "$context", "$user_id"}
    assert all(f"`{op}`" in README for op in OPS)
