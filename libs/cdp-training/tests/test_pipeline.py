"""The whole pipeline on a tiny population: it runs end to end, in-process and as `python -m
cdp_training`, and one seed gives the same figures and the same bytes (even with another
PYTHONHASHSEED, which changes set and dict iteration inside the converters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cdp_training.pipeline import REPORT, train_all

# 250 + 150 people: what the bytes depend on (a converter's uuid graph name, opsets in set order) does not
# grow with the population, and every model still trains on them; 500 + 300 spent twice as long computing
# traits for the same check.
ARGS = {"seed": 3, "population": 250, "holdout": 150}


# Two whole trainings, one in a subprocess (bounded at 300 s itself): pure CPU, ~24 s on a quiet machine at
# 500 + 300 people, and it hit the suite's 120 s twice in a helper's runs with two busy loops added to the
# load. Nothing waits on it.
@pytest.mark.timeout(420)
def test_same_seed_same_files(tmp_path):
    first = train_all(**ARGS, out_dir=tmp_path / "a", workers=1, recovery_customers=3000, log=lambda _: None)
    first.pop("_built")
    assert json.loads((tmp_path / "a" / REPORT).read_text()) == first
    command = [sys.executable, "-m", "cdp_training", "--out", str(tmp_path / "b"), "--workers", "1"]
    command += ["--recovery-customers", "3000", *(f"--{k}={v}" for k, v in ARGS.items())]
    done = subprocess.run(
        command, env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode in (0, 1), done.stderr  # 1: some floor missed, expected on 250 people
    assert "churn_risk.auc" in done.stdout
    assert json.loads((tmp_path / "b" / REPORT).read_text()) == first
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([*(f"{m}.onnx" for m in first["models"]), REPORT])
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
