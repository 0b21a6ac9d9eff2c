"""The whole pipeline on a tiny population: it runs end to end, writes what the service loads, and one
seed gives the same figures (and the same files)."""

from __future__ import annotations

import json

from cdp_scoring.training.pipeline import REPORT, train_all


def _run(out) -> dict:
    report = train_all(
        seed=3, population=500, holdout=300, out_dir=out, workers=1, recovery_customers=3000, log=lambda _: None
    )
    report.pop("_built")
    return report


def test_same_seed_same_models(tmp_path):
    first = _run(tmp_path / "a")
    second = _run(tmp_path / "b")
    assert json.loads((tmp_path / "a" / REPORT).read_text()) == first
    assert first == second  # every figure, and the files' hashes
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([*(f"{m}.onnx" for m in first["models"]), REPORT])
    for name in first["models"]:
        assert (tmp_path / "a" / f"{name}.onnx").read_bytes() == (tmp_path / "b" / f"{name}.onnx").read_bytes()
