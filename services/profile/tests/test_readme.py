import json
import re
from pathlib import Path

from cdp_kit.settings import describe
from cdp_profile.domain import OPS, ComputedTrait
from cdp_profile.domain.computed import WHERE_OPERATORS
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
    roots = {trait.property.split(".")[0] for trait in examples if trait.property}
    assert roots >= {"$at", "$hour", "$context", "$user_id"}
    assert all(f"`{op}`" in README for op in OPS)


def test_the_where_operator_examples_are_valid_and_every_operator_is_documented():
    examples = [json.loads(text) for text in re.findall(r'`(\{"[^"]+": \{"\$.*?\}\})`', README)]
    assert len(examples) >= 5
    for where in examples:
        ComputedTrait("t", "count", where=where)
    assert [op for op in WHERE_OPERATORS if f"`{op}`" not in README] == []


def test_every_module_is_listed_where_the_code_is():
    """A newcomer finds a rule by its file name: the README's table names every module."""
    package = Path(__file__).resolve().parents[1] / "src" / "cdp_profile"
    (table,) = re.findall(r"## Where the code is\n(.*?)\n## ", README, flags=re.S)
    modules = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    assert sorted(m for m in modules if f"`{m}`" not in table) == []
    assert "`domain/`" in table
