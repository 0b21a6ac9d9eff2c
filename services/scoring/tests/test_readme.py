"""The README cannot rot: every variable is documented and the spec example is a valid spec."""

import json
import re
from pathlib import Path

from cdp_kit.settings import describe
from cdp_scoring.domain import FeatureAssembler, ModelSpec
from cdp_scoring.settings import ScoringSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_variable_is_documented_in_the_readme():
    assert [var for var, _default, _help in describe(ScoringSettings) if f"`{var}`" not in README] == []


def test_the_spec_example_is_a_valid_spec():
    (example,) = re.findall(r"```json\n(.*?)```", README, flags=re.S)
    spec = ModelSpec.from_dict(json.loads(example))
    assert spec.score_names == ("churn_risk",)
    row = FeatureAssembler(spec).row({"computed.orders_90d": 2, "traits.plan": "pro"}, now=0.0)
    assert row[0] == 2.0 and row[1] == 365.0 and row[3] == 1.0
