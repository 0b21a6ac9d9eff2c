"""The README cannot rot: every variable is documented and the spec example is a valid spec."""

import json
import math
import re
from pathlib import Path

from cdp_kit.settings import describe
from cdp_scoring.domain import FeatureAssembler, ModelSpec
from cdp_scoring.domain import spec as spec_module
from cdp_scoring.modelstore import SHIPPED
from cdp_scoring.runtime import load_model
from cdp_scoring.settings import ScoringSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_variable_is_documented_in_the_readme():
    assert [var for var, _default, _help in describe(ScoringSettings) if f"`{var}`" not in README] == []


def test_the_spec_example_is_a_valid_spec():
    (example,) = re.findall(r"```json\n(.*?)```", README, flags=re.S)
    spec = ModelSpec.from_dict(json.loads(example))
    assert spec.score_names == ("churn_risk",)
    row = FeatureAssembler(spec).row({"computed.sessions_30d": 2, "traits.plan": "pro"}, now=0.0)
    assert row[0] == 2.0 and math.isnan(row[1]) and row[2] == 0.0 and row[3] == 2.0


def test_the_spec_example_says_what_the_shipped_churn_model_predicts():
    """The example is the shipped churn_risk cut short: its version, features, traits and meaning (a lapse
    a month on, not the 1.0.0-era "no activity in the next 90 days"); the spec module's docstring agrees."""
    (example,) = re.findall(r"```json\n(.*?)```", README, flags=re.S)
    sample = ModelSpec.from_dict(json.loads(example))
    shipped = load_model((SHIPPED / "churn_risk.onnx").read_bytes()).spec
    assert sample.version == shipped.version
    assert [o.meaning for o in sample.outputs] == [o.meaning for o in shipped.outputs]
    assert set(sample.features) <= set(shipped.features)
    shipped_traits = {t["name"]: t for t in shipped.to_dict()["computed_traits"]}
    assert all(shipped_traits[t["name"]] == t for t in sample.to_dict()["computed_traits"])
    assert f'"meaning": "{shipped.outputs[0].meaning}"' in spec_module.__doc__
    assert "next 90 days" not in README and "next 90 days" not in spec_module.__doc__
